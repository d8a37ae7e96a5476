"""Multi-Criteria Token Fusion (MCTF; Lee et al., CVPR 2024), as pure tensor functions plus the block adapter.

Before the attention of an active block, `r` tokens are fused by bipartite matching whose score multiplies three
criteria: similarity of the tokens (((cos + 1) / 2) ** (1 / tau_sim)), informativeness (the inverse of the attention
each token receives, both ends, ** (1 / tau_info)) and size (inverse token sizes, ** (1 / tau_size)). Matching is
bidirectional: r // 2 tokens of set A merge into B, then r - r // 2 tokens of B merge into the unmerged A tokens.
Fused tokens are averaged weighted by attention received x size ("pooling_type 1"). "One-step-ahead attention":
the block's attention map, computed before the fusion, is itself fused (keys summed, queries averaged with the same
weights) and used as the attention of the fused tokens, so the block computes its map once. This follows the
official code (mlvlab/MCTF, `utils/mctf.py`, `models/modules/blocks.py`, `models/SA/MHSA.py`) at its evaluation
setting `--mctf_type [16,0,0,1,1,1,20,40,1,1,0]` (r=16, proportional attention, one-step-ahead, tau 1/20/40,
bidirectional, attention-weighted pooling) and `--activate_layer [1..11]` (every block but the first);
`tests/tokens/test_tokens_ats_mctf.py` compares vitlab with the official model's outputs (fixture in tests/fixtures/tokens/).

Cost: MCTF needs the full attention map (B, H, N, N) in every active block, as the official code does: the map is
materialized and multiplied with the values by plain matmuls, not by fused SDPA, and fusing it costs two more
passes over it. Its FLOPs are the unfused attention's (same MACs as SDPA's math) plus O(N^2) elementwise work; in
time it loses SDPA's fused kernel. Blocks that are not active keep fused attention.

Differences from the official code (none at the tested setting): prefix tokens (class, distillation, registers) are
protected in both sets (the official code protects the first rows of set A only, which for a distilled model is
the class token and patch 1, not the distillation token); LayerScale (`ls1`) is applied; only one-step-ahead
attention (the official setting; without it the official code fuses after the MLP instead). The paper's
token-reduction-consistency training loss is in `vitlab.tokens.consistency` (`vitlab train --token-consistency 3`).
"""
import math
from typing import Callable, Optional

import torch

from .patch import TokenState, init_state

__all__ = ["mctf_matching", "MCTFReduction"]


def mctf_matching(metric: torch.Tensor, attn: Optional[torch.Tensor], size: Optional[torch.Tensor], r: int,
                  num_prefix: int, tau_sim: float, tau_info: float, tau_size: float,
                  bidirection: bool) -> Callable[..., torch.Tensor]:
    """Return `merge(x, mode)` that fuses `r` of the N tokens of x (..., N, C) as MCTF's matching says.

    metric (B, N, C): the tokens; attn (B, H, N, N) the attention map (informativeness); size (B, N, 1).
    The result has N - r tokens: set A's survivors first (prefix tokens first, in order), then set B's.
    """
    B, N, _ = metric.shape
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    prefix_a, prefix_b = math.ceil(num_prefix / 2), num_prefix // 2
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim) if tau_sim else torch.ones(
            B, a.shape[1], b.shape[1], device=a.device, dtype=a.dtype)
        if tau_info > 0 and attn is not None:
            info = 1 / attn.mean(dim=(1, 2))                            # (B, N): inverse attention received
            info = info / info.max(dim=1, keepdim=True).values
            scores = scores * (info[:, ::2, None] * info[:, None, 1::2]) ** (1 / tau_info)
        if tau_size and size is not None:
            inv = 1 / size
            inv = inv / inv.max(dim=1, keepdim=True).values
            scores = scores * (inv[:, ::2] * inv[:, 1::2].transpose(1, 2)) ** (1 / tau_size)
        scores[..., :prefix_a, :] = -math.inf                           # prefix tokens in A are never merged away
        scores[..., :, :prefix_b] = -math.inf                           # nothing merges into a prefix token in B
        t1, t2 = scores.shape[1:]
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r1:, :].sort(dim=1).values              # unmerged A tokens, in original order
        src_idx = edge_idx[..., :r1, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if bidirection:
            # B tokens choose among the unmerged A tokens (prefix rows of A are -inf columns here)
            new_scores = scores.gather(dim=-2, index=unm_idx.expand(-1, -1, t2)).transpose(1, 2)
            node_max2, node_idx2 = new_scores.max(dim=-1)
            edge_idx2 = node_max2.sort(dim=-1, descending=True).indices[..., None]
            unm_idx2 = edge_idx2[..., r2:, :]
            src_idx2 = edge_idx2[..., :r2, :]
            dst_idx2 = node_idx2[..., None].gather(dim=-2, index=src_idx2)

    def expand(idx: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
        # idx (B, n, 1) -> (B, *middle, n, C) for x (B, *middle, T, C)
        view = idx.view(idx.shape[0], *([1] * (x.dim() - 3)), n, 1)
        return view.expand(*x.shape[:-2], n, x.shape[-1])

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        unm = src.gather(-2, expand(unm_idx, src, t1 - r1))
        moved = src.gather(-2, expand(src_idx, src, r1))
        dst = dst.scatter_reduce(-2, expand(dst_idx, dst, r1), moved, reduce=mode)
        if not bidirection:
            return torch.cat([unm, dst], dim=-2)
        unm2 = dst.gather(-2, expand(unm_idx2, dst, t2 - r2))
        moved2 = dst.gather(-2, expand(src_idx2, dst, r2))
        unm = unm.scatter_reduce(-2, expand(dst_idx2, unm, r2), moved2, reduce=mode)
        return torch.cat([unm, unm2], dim=-2)

    if num_prefix <= 1:
        return merge        # the class token is A's first survivor: already first
    # several prefix tokens (distillation, registers) end up in both sets: move them back to the front, in order
    with torch.no_grad():
        pos = torch.arange(N, device=metric.device, dtype=metric.dtype).expand(B, N)[..., None]
        first = merge(pos, "amin")[..., 0]                              # (B, N - r): smallest input index per token
        rank = torch.arange(first.shape[1], device=metric.device, dtype=metric.dtype) + num_prefix
        perm = torch.where(first < num_prefix, first, rank).argsort(dim=1)

    def merge_prefix_first(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        out = merge(x, mode)
        view = perm.view(B, *([1] * (out.dim() - 3)), perm.shape[1], 1)
        return out.gather(-2, view.expand(*out.shape[:-2], perm.shape[1], out.shape[-1]))

    return merge_prefix_first


class MCTFReduction:
    """Fuse `r` tokens of one block's input (MCTF), then attend with the fused one-step-ahead attention map."""

    before_attention = True

    def __init__(self, r: int, tau_sim: float, tau_info: float, tau_size: float, bidirection: bool):
        self.r, self.tau_sim, self.tau_info, self.tau_size = r, tau_sim, tau_info, tau_size
        self.bidirection = bidirection
        self.active = r > 0

    def merge_and_attend(self, block, x: torch.Tensor, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused x (B, N - r, C), attention output for it (B, N - r, C) before ls1/drop_path)."""
        attn_mod = block.attn
        init_state(x, state)
        p = state.num_prefix
        N = x.shape[1]
        size = state.size
        h = block.norm1(x)
        r = self.r
        if N - r < 10:                                                 # the official floor of 10 tokens
            r = N - 10
        r = max(0, min(r, (N - p) // 2))
        if r == 0:                                                     # nothing to fuse: plain (fused) attention
            return x, attn_mod.attend(h)
        # the attention map of the unfused tokens (with proportional attention), computed once; through the
        # attention seam's logits and mix (vitlab.attention), which carry a later quantization's sites
        q, k = attn_mod.qk(h)                                          # (B, H, N, d) each
        logits = attn_mod.logits(q, k, size.log()[:, None, None, :, 0] if state.prop_attn else None)
        attn = logits.softmax(dim=-1)                                  # (B, H, N, N)
        merge = mctf_matching(x, attn, size, r, p, self.tau_sim, self.tau_info, self.tau_size, self.bidirection)
        # attention-weighted pooling ("pooling_type 1"): weight = attention received x size / max size
        with torch.no_grad():
            attn_m = attn.mean(dim=(1, 2))[..., None]                  # (B, N, 1)
        weight = attn_m * (size / size.amax(dim=1, keepdim=True))
        norm = merge(weight, "sum")
        x = merge(x * weight, "sum") / norm
        attn = merge(attn[..., None], "sum")[..., 0]                   # keys summed: (B, H, N, N - r)
        attn = merge(attn * weight[:, None], "sum") / norm[:, None]    # queries averaged: (B, H, N - r, N - r)
        if state.trace_source:
            state.source = merge(state.source, "amax")
        with torch.no_grad():
            state.size = merge(size, "sum")
        h = block.norm1(x)
        out = attn_mod.mix(attn, attn_mod.v(h))                        # (B, H, N - r, d)
        return x, attn_mod.out(out, h)
