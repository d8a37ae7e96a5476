"""Adaptive Token Sampling (ATS; Fayyaz et al., ECCV 2022), as pure tensor functions plus the block adapter.

In an ATS block every non-prefix token j gets a significance score: the class token's attention to it (summed over
heads) times the norm of its value vector (all heads), normalized to sum to one. The scores are sorted ascending,
their cumulative sum (CDF) normalized to [0, 1], and K points spaced evenly from the smallest non-zero CDF value to 1
are mapped back through the inverse CDF (each to the token whose CDF value is nearest). Tokens hit at least once are
kept, so each image keeps its own number of tokens (<= K): the sampler spends tokens where the class token looks.
This is the rule of the official code (adaptivetokensampling/ATS, `libs/models/transformers/ats_block.py`:
`score_assignment_step`, `create_ys`, `inverse_transform_sampling`, `get_unique_indices`), re-written for vitlab's
timm blocks; `tests/tokens/test_tokens_ats_mctf.py` checks it against a transcription of those functions on hand-made scores
(the official repository is a SlowFast/Kinetics code base that does not build a timm model, so it is not run).

Per-image counts, padded: the kept tokens of each image come first (in their original order), and the batch is
padded to the largest count in it. Padding rows carry size 0 in `model.token_state.size`; the attention of the
following blocks adds log(size) to the keys, so padding gets no attention (fused SDPA keeps running, with a mask),
and average pooling weights it 0. Padding is executed: the FLOPs and time of a batch are those of batch x max count,
and `model.token_state.counts` records that executed count; `model.token_state.image_counts` holds the per-image
counts (B,) after each ATS block.
"""
import torch

from .patch import TokenState, class_attention, init_state

__all__ = ["ats_scores", "ats_sample", "ATSReduction"]


def ats_scores(cls_attn: torch.Tensor, v: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Significance scores (B, N - prefix): class attention summed over heads x value norm, normalized to sum 1.

    cls_attn: (B, H, N) attention from the class token; v: (B, H, N, d) values.
    """
    v_norm = v.transpose(1, 2).flatten(2).norm(dim=-1)             # (B, N): norm over all heads' values
    scores = (cls_attn.sum(dim=1) * v_norm)[:, num_prefix:]
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def ats_sample(scores: torch.Tensor, num_samples: int | torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-transform sampling of `num_samples` points: a (B, n) bool mask of the tokens that are kept.

    scores (B, n) >= 0; num_samples: an int or one count per image (B,); valid (B, n): False marks padding, which
    is never sampled and does not shift the CDF, so an image's result does not depend on the batch it is in.
    Deterministic (evenly spaced samples, as the official code at inference and training).
    """
    B, n = scores.shape
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    k = torch.as_tensor(num_samples, device=scores.device).expand(B)
    sorted_scores, order = torch.where(valid, scores, -1.0).sort(dim=1)   # ascending; padding first
    sorted_valid = sorted_scores >= 0
    cdf = sorted_scores.clamp_min(0).cumsum(dim=1)
    inf = torch.full_like(cdf, float("inf"))
    lo = torch.where(sorted_valid, cdf, inf).min(dim=1, keepdim=True).values
    hi = cdf.max(dim=1, keepdim=True).values
    ncdf = (cdf - lo) / (hi - lo).clamp_min(torch.finfo(cdf.dtype).tiny)
    ncdf = torch.where(sorted_valid, ncdf, -1e8)                         # padding is never the nearest
    # samples run from the smallest non-zero CDF value to 1 (official `create_ys`); images with fewer samples than
    # the batch's largest repeat their last sample (1.0), which collapses into a duplicate
    start = torch.where(ncdf > 0, ncdf, inf).min(dim=1, keepdim=True).values
    start = torch.where(torch.isinf(start), torch.ones_like(start), start)
    steps = torch.arange(int(k.max()), dtype=ncdf.dtype, device=ncdf.device)[None]
    t = (steps / (k[:, None] - 1).clamp_min(1)).clamp_max(1)
    ys = start * (1 - t) + t                                             # (B, K)
    picked = (ys[:, :, None] - ncdf[:, None, :]).abs().argmin(dim=2)     # (B, K): nearest CDF value, sorted position
    keep_sorted = torch.zeros(B, n, dtype=torch.bool, device=scores.device).scatter_(1, picked, True)
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted & sorted_valid)


class ATSReduction:
    """Keep the tokens that inverse-transform sampling of the significance scores hits (per image; padded)."""

    before_attention = False

    def __init__(self, keep_rate: float):
        self.keep_rate, self.scores = keep_rate, None
        self.active = True

    def observe(self, q, k, v, scale, attn_mask, state) -> None:
        queries = (state.size[..., 0] > 0).to(q.dtype) if state.padded else None   # padding rows do not vote
        cls_attn = class_attention(q, k, scale, attn_mask, state.num_prefix, queries)
        self.scores = ats_scores(cls_attn, v, state.num_prefix)

    def reduce(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        init_state(x, state)
        p = state.num_prefix
        valid = state.size[:, p:, 0] > 0                             # padding is never sampled
        counts = valid.sum(dim=1)
        num_samples = (self.keep_rate * counts).ceil().long().clamp(1)  # K per image: of its own tokens
        keep = ats_sample(self.scores, num_samples, valid)            # (B, n)
        self.scores = None
        counts = keep.sum(dim=1)
        m = int(counts.max())
        # kept tokens first, in their original order (a stable sort of the mask), then padding
        idx = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :m]   # (B, m)
        valid = keep.gather(1, idx)[..., None]                        # (B, m, 1)
        state.padded = state.padded or bool((counts < m).any())
        state.image_counts.append(counts)
        for name in ("size", "source"):
            value = getattr(state, name)
            if value is None:
                continue
            rest = value[:, p:].gather(1, idx[..., None].expand(-1, -1, value.shape[-1])) * valid.to(value.dtype)
            setattr(state, name, torch.cat([value[:, :p], rest], dim=1))
        rest = x[:, p:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :p], rest], dim=1)
