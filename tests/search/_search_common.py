"""Helpers the search tests share."""
import torch
import torch.nn as nn


def noisy(supernet_class: type[nn.Module], *args, seed: int = 0) -> nn.Module:
    """`supernet_class(*args)` built under `seed`, in eval mode, every parameter perturbed, so a wrong slice of a
    norm weight, a bias or the position embedding shows."""
    torch.manual_seed(seed)
    supernet = supernet_class(*args).eval()
    with torch.no_grad():
        for p in supernet.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return supernet
