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

    def destination() -> tuple[torch.Tensor, int]:
        """((B * N,) row of every input token in the flattened (B * (N - r), C) output, N - r): the merge as one
        index_add. Output order as `merge`: unmerged A tokens (in order), then B tokens."""
        with torch.no_grad():
            dev, t1, t2 = metric.device, (N + 1) // 2, N // 2
            n_unm = t1 - r
            dest = torch.empty(B, t1 + t2, dtype=torch.long, device=dev)
            dest_a, dest_b = dest[:, ::2], dest[:, 1::2]
            dest_a.scatter_(1, unm_idx[..., 0], torch.arange(n_unm, device=dev).expand(B, n_unm))
            dest_a.scatter_(1, src_idx[..., 0], n_unm + dst_idx[..., 0])
            dest_b.copy_(n_unm + torch.arange(t2, device=dev).expand(B, t2))
            return (dest + (N - r) * torch.arange(B, device=dev)[:, None]).flatten(), N - r

    if prefix_b == 0:   # with prefix tokens in B (distilled, registers) `merge` reorders them: keep the general path
        merge.destination = destination
    return merge


def merge_wavg(merge: Callable, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge x (B, N, C) as a size-weighted average; size (B, N, 1) counts the patches each token stands for.

    Computed as one index_add over all tokens (same result as `merge(x * size, "sum") / merge(size, "sum")`, up to
    the order of the float sums), which reads and writes x once instead of gathering, scattering and concatenating.
    """
    destination = getattr(merge, "destination", None)
    # tracing exporters (OpenVINO's convert_model, torch.jit.trace) mis-convert the in-place scatters into strided
    # views that `destination` builds (OpenVINO returned NaN): they get the gather/scatter_reduce form instead
    if destination is None or torch.jit.is_tracing():
        x = merge(x * size, mode="sum")
        size = merge(size, mode="sum")
        return x / size, size
    B, N, C = x.shape
    dest, n = destination()
    x = torch.zeros(B * n, C, dtype=x.dtype, device=x.device).index_add_(0, dest, (x * size).reshape(B * N, C))
    size = torch.zeros(B * n, 1, dtype=size.dtype, device=size.device).index_add_(0, dest, size.reshape(B * N, 1))
    return (x / size).view(B, n, C), size.view(B, n, 1)


def merge_source(merge: Callable, source: torch.Tensor) -> torch.Tensor:
    """Merge the source map (B, N, N0): row i marks the input tokens that token i stands for."""
    return merge(source, mode="amax")
