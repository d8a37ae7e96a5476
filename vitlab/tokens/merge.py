"""Token merging math (ToMe, Bolya et al., ICLR 2023), as pure tensor functions.

Bipartite soft matching: split the tokens alternately into sets A and B, link every A token to its most similar
B token (cosine similarity of the attention keys), keep the r strongest links, and merge each linked A token into
its B partner. Prefix tokens (class, distillation, registers) are never merged and stay first, in order.
"""
import math
from typing import Callable

import torch

__all__ = ["bipartite_soft_matching", "merge_wavg", "merge_source"]


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Callable[..., torch.Tensor]:
    """Return `merge(x, mode)` that merges `r` tokens of x (B, N, C) as the similarity of `metric` (B, N, d) says.

    The result has N - r tokens: the prefix tokens first (original order), then the unmerged A tokens, then B.
    """
    B, N, _ = metric.shape
    if r <= 0:
        return lambda x, mode="mean": x
    prefix_a, prefix_b = math.ceil(num_prefix / 2), num_prefix // 2
    with torch.no_grad():  # the matching is a discrete choice: no gradient flows through it
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)                       # (B, Na, Nb)
        scores[..., :prefix_a, :] = -math.inf                  # prefix tokens in A are never merged away
        scores[..., :, :prefix_b] = -math.inf                  # nothing merges into a prefix token in B
        node_max, node_idx = scores.max(dim=-1)                # (B, Na): each A token's best B partner
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :].sort(dim=-2).values     # unmerged A tokens, in original order
        src_idx = edge_idx[..., :r, :]                         # A tokens merged away
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if prefix_b == 0:
            return torch.cat([unm, dst], dim=1)
        # put the prefix tokens of B back between/after those of A, in their original order
        prefix = torch.stack([unm[:, :prefix_b], dst[:, :prefix_b]], dim=2).flatten(1, 2)  # (n, 2*prefix_b, c)
        if prefix_a > prefix_b:
            prefix = torch.cat([prefix, unm[:, prefix_b:prefix_a]], dim=1)
        return torch.cat([prefix, unm[:, prefix_a:], dst[:, prefix_b:]], dim=1)

    return merge


def merge_wavg(merge: Callable, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge x (B, N, C) as a size-weighted average; size (B, N, 1) counts the patches each token stands for."""
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: Callable, source: torch.Tensor) -> torch.Tensor:
    """Merge the source map (B, N, N0): row i marks the input tokens that token i stands for."""
    return merge(source, mode="amax")
