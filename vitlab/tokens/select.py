"""Token selection math (EViT, Liang et al., ICLR 2022), as pure tensor functions.

Keep the tokens the class token attends to most; optionally fuse the rest into one token, their sum weighted by the
class attention they received (the official code's rule: the weights are not renormalized).
"""
import math

import torch

__all__ = ["num_kept", "evit_select"]


def num_kept(num_tokens: int, keep_rate: float) -> int:
    """Tokens kept of `num_tokens` non-prefix tokens: ceil(keep_rate * n), as the official code computes it."""
    return math.ceil(keep_rate * num_tokens)


def evit_select(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, num_prefix: int,
                fuse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keep the `keep` most attended non-prefix tokens of x (B, N, C); cls_attn (B, N - num_prefix).

    Returns the new x (prefix, kept tokens by decreasing attention, then the fused token if `fuse`), the kept
    indices (B, keep) into the non-prefix tokens, and the dropped indices (None when nothing is dropped).
    """
    B, N, C = x.shape
    rest = x[:, num_prefix:]
    order = cls_attn.argsort(dim=1, descending=True)           # (B, N - prefix)
    kept_idx, dropped_idx = order[:, :keep], order[:, keep:]
    kept = rest.gather(1, kept_idx[..., None].expand(-1, -1, C))
    parts = [x[:, :num_prefix], kept]
    if fuse and dropped_idx.shape[1] > 0:
        dropped = rest.gather(1, dropped_idx[..., None].expand(-1, -1, C))
        weights = cls_attn.gather(1, dropped_idx)[..., None]     # (B, dropped, 1)
        parts.append((dropped * weights).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1), kept_idx, dropped_idx
