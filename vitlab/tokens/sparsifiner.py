"""Sparsifiner (Wei et al., CVPR 2023): instance-dependent sparse attention from a low-rank connectivity predictor.

In every token-reducible block a lightweight predictor estimates, per head, which keys each query needs: queries and
keys are projected to a reduced width c = head_dim / reduce_c, the keys are compressed along the token axis to
K = N / reduce_n basis tokens, and the query's softmax over those K coefficients mixes K learned basis rows back to
an approximate attention row over all N keys. Each non-prefix query keeps its top-k keys (k = ceil(keep_rate x N));
prefix queries (the class token) attend densely. Attention is then computed on the kept connections only; here as
masked attention (logits of dropped keys set to -inf), which is the exact result of the sparse computation. Masked
attention executes the dense matmuls, so on CPU it is not faster: `sparsifiner_flops` counts what the sparse
computation costs (attention MACs x density, plus the predictor's own MACs).

The predictor learns only from the connectivity distillation loss (the mask is binary, no gradient passes through
it): the squared error, summed, between its approximate attention rows and the block's full attention, averaged over
blocks (official `losses.py`, `USE_ATTN_SELF_DISTILL` / `USE_ATTN_RECON` with MSE and reduction='sum'; the full
attention is detached here, as a teacher's would be, and so are the q and k the predictor reads: the official code
lets this term's gradient reach the backbone's q/k projections, where its size (a sum over B x H x N^2 entries)
swamps the task loss in a short fine-tune). `vitlab train --apply sparsifiner:... --recipe
sparsifiner:distill=0.01,dense_epochs=E` adds it to the training loss and trains the first E epochs with dense
attention (the official first phase, where the predictor learns before its masks are used).

Follows the official MaskPredictor and Attention (github.com/lim142857/Sparsifiner, commit 9a11e26,
src/models/sparsifiner.py): shared (over heads) projections proj_c_q / proj_c_k, token-axis compression proj_n and
basis proj_back_n (trunc-normal, std 0.02), softmax scale num_heads ** -0.5 on the reduced logits, top-k over the
approximate rows with budget ceil(keep_rate * N), dense class-token row. Left out: the official eval-time pruning of
small basis entries and coefficients (BASIS_THRESHOLD, BASIS_COEF.TOPK), so the predictor is counted dense here.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..recipes import Recipe, Step, register_recipe
from ..profiling import count_flops
from ..profiling.flops import FlopCount
from ..techniques import TechniqueError
from .patch import REDUCING_ATTENTION

__all__ = ["ConnectivityPredictor", "topk_connectivity", "sparsify_model", "ConnectivityDistill",
           "SparsifinerRecipe", "sparsifiner_flops", "sparse_attention_macs", "predictor_macs"]


class ConnectivityPredictor(nn.Module):
    """Low-rank connectivity predictor of one attention layer (the official `MaskPredictor`)."""

    def __init__(self, num_heads: int, head_dim: int, num_tokens: int, num_prefix: int, reduce_n: int,
                 reduce_c: int):
        super().__init__()
        self.num_prefix = num_prefix
        self.reduced_c = max(1, head_dim // reduce_c)
        self.reduced_n = max(1, num_tokens // reduce_n)
        self.scale = num_heads ** -0.5            # as the official code (qk_scale or num_heads ** -0.5)
        self.proj_q = nn.Linear(head_dim, self.reduced_c)
        self.proj_k = nn.Linear(head_dim, self.reduced_c)
        self.proj_n = nn.Parameter(torch.zeros(num_tokens, self.reduced_n))
        self.proj_back_n = nn.Parameter(torch.zeros(num_tokens, self.reduced_n))
        for p in (self.proj_n, self.proj_back_n):
            trunc_normal_(p, std=0.02)
        for lin in (self.proj_q, self.proj_k):
            trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Approximate attention (B, H, N - prefix, N) of the non-prefix queries from q, k (B, H, N, d)."""
        p = self.num_prefix
        q = self.proj_q(q[:, :, p:])                                   # (B, H, N - p, c)
        k = self.proj_k(k).transpose(-2, -1) @ self.proj_n             # (B, H, c, K): keys compressed over tokens
        coef = ((q @ k) * self.scale).softmax(dim=-1)                  # (B, H, N - p, K)
        return coef @ self.proj_back_n.t()                             # (B, H, N - p, N)


def topk_connectivity(approx: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """Binary connectivity mask (B, H, N, N) from approximate rows (B, H, N - prefix, N): each non-prefix query keeps
    its `keep` highest-scoring keys; prefix queries keep every key."""
    B, H, R, N = approx.shape
    rows = torch.zeros(B, H, R, N, dtype=torch.bool, device=approx.device)
    rows.scatter_(-1, approx.detach().topk(keep, dim=-1, sorted=False).indices, True)
    dense = torch.ones(B, H, num_prefix, N, dtype=torch.bool, device=approx.device)
    return torch.cat([dense, rows], dim=2)


class SparsifinerAttentionMixin:
    """Attention whose non-prefix queries attend only to the keys the connectivity predictor keeps.

    Mixed over vitlab's reducing attention classes (`patch.REDUCING_ATTENTION`), which say how the model's own
    attention computes q, k, v (`qkv_heads`) and its output (`out`); the attention math here replaces `attend`."""

    predictor: ConnectivityPredictor
    keep: int
    dense: bool = False          # training phase 1: full attention (the predictor still learns from it)
    record: bool = False         # keep (approximate rows, full attention) for the distillation loss
    recorded: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    macs: Optional[tuple[int, int]] = None    # (dense, sparse) attention MACs of the last forward

    def attend(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise TechniqueError("sparsifiner replaces the attention mask with its own connectivity mask; call the "
                                 "model without attn_mask / is_causal")
        q, k, v = self.qkv_heads(x)                                    # each (B, H, N, d)
        B, H, N, d = q.shape
        p = self.predictor.num_prefix
        approx = self.predictor(q.detach(), k.detach())                # (B, H, N - p, N)
        logits = (q * self.scale) @ k.transpose(-2, -1)                # (B, H, N, N)
        if self.record:
            self.recorded = (approx, logits[:, :, p:].detach().softmax(dim=-1))
        if self.dense:
            attn = logits.softmax(dim=-1)
            kept = N * N
        else:
            mask = topk_connectivity(approx, self.keep, p)             # (B, H, N, N)
            attn = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            kept = p * N + (N - p) * self.keep
        self.macs = (2 * B * H * N * N * d, 2 * B * H * kept * d)      # q k^T and attn v, dense vs kept pairs
        out = self.attn_drop(attn) @ v                                 # (B, H, N, d)
        return self.out(out, x)


_CLASSES: dict[type, type] = {}


def _sparse_class(cls: type) -> type:
    reducing = REDUCING_ATTENTION[cls]
    if reducing not in _CLASSES:
        _CLASSES[reducing] = type(f"Sparsifiner{cls.__name__}", (SparsifinerAttentionMixin, reducing),
                                  {"__module__": __name__})
    return _CLASSES[reducing]


def sparsify_model(model: nn.Module, sequences: list, keep_rate: float, reduce_n: int, reduce_c: int) -> nn.Module:
    """Give every block of `sequences` (`families.TokenSequence`) a connectivity predictor and sparse attention."""
    for seq in sequences:
        n, p = seq.num_tokens, seq.num_prefix
        keep = math.ceil(keep_rate * n)
        for spec in seq.blocks:
            attn = spec.module.attn
            heads = attn.num_heads
            head_dim = getattr(attn, "head_dim", None) or attn.qkv.in_features // heads
            attn.__class__ = _sparse_class(type(attn))
            attn.keep = keep
            attn.predictor = ConnectivityPredictor(heads, head_dim, n, p, reduce_n, reduce_c).to(
                next(attn.parameters()).device)
    return model


def _sparse_attentions(model: nn.Module) -> list[SparsifinerAttentionMixin]:
    return [m for m in model.modules() if isinstance(m, SparsifinerAttentionMixin)]


class ConnectivityDistill:
    """The connectivity distillation term of Sparsifiner's training loss (see the module docstring), for the
    training loop: `with distill.step(global_step): out = model(x)`, then `loss + distill.loss()`."""

    def __init__(self, model: nn.Module, weight: float, dense_steps: int = 0):
        self.attentions = _sparse_attentions(model)
        if not self.attentions:
            raise TechniqueError("--recipe sparsifiner trains Sparsifiner's connectivity predictor, but the model "
                                 "has none: add --apply sparsifiner (e.g. --apply sparsifiner:keep_rate=0.25)")
        self.weight, self.dense_steps = weight, dense_steps

    @contextlib.contextmanager
    def step(self, global_step: int) -> Iterator[None]:
        """Record approximate and full attention in this forward; dense attention while `global_step` is in the
        dense phase."""
        for a in self.attentions:
            a.record, a.dense = True, global_step < self.dense_steps
        try:
            yield
        finally:
            for a in self.attentions:
                a.record, a.dense = False, False

    def loss(self) -> torch.Tensor:
        """weight x mean over blocks of sum((approximate rows - full attention rows) ** 2)."""
        terms = []
        for a in self.attentions:
            approx, full = a.recorded
            terms.append(F.mse_loss(approx, full, reduction="sum"))
            a.recorded = None
        return self.weight * torch.stack(terms).mean()


@register_recipe("sparsifiner")
@dataclass
class SparsifinerRecipe(Recipe):
    """Sparsifiner training: the step's loss plus `distill` x the connectivity distillation term (official weight
    0.01); the first `dense_epochs` epochs run dense attention (official phase 1: 5 of 50 epochs)."""

    distill: float = 0.01
    dense_epochs: float = 0.0

    def __post_init__(self):
        if self.distill < 0 or self.dense_epochs < 0:
            raise ValueError(f"distill and dense_epochs must be >= 0, got {self.distill} and {self.dense_epochs}")

    def setup(self, model: nn.Module, train_set: Any, cfg: Any, rt: Any) -> None:
        steps_per_epoch = len(train_set) // cfg.batch_size
        self._distill = ConnectivityDistill(model, self.distill, round(self.dense_epochs * steps_per_epoch))

    def loss(self, step: Step) -> torch.Tensor:
        with self._distill.step(step.global_step):
            loss = step.default_loss()
        return loss + self._distill.loss()


def predictor_macs(num_heads: int, head_dim: int, num_tokens: int, num_prefix: int, reduce_n: int,
                   reduce_c: int) -> int:
    """MACs of one predictor call per image: q and k projections, token compression of k, reduced logits, and the
    approximate rows (coefficients x basis)."""
    H, d, N, p = num_heads, head_dim, num_tokens, num_prefix
    c, K = max(1, d // reduce_c), max(1, N // reduce_n)
    return H * ((N - p) * d * c + N * d * c + c * N * K + (N - p) * c * K + (N - p) * K * N)


def sparse_attention_macs(model: nn.Module) -> tuple[int, int]:
    """(dense, sparse) attention MACs (q k^T and attn v) of the model's last forward, summed over blocks."""
    pairs = [a.macs for a in _sparse_attentions(model) if a.macs is not None]
    return sum(d for d, _ in pairs), sum(s for _, s in pairs)


def sparsifiner_flops(model: nn.Module, inputs: torch.Tensor) -> FlopCount:
    """MACs of `model(inputs)` as the sparse computation would cost: `count_flops` of the executed (masked, so
    dense) forward, predictor included, less the attention MACs of the dropped connections."""
    counted = count_flops(model, inputs)
    dense, sparse = sparse_attention_macs(model)
    saved = dense - sparse
    by_op = dict(counted.by_op)
    return FlopCount(macs=counted.macs - saved, flops=2 * (counted.macs - saved),
                     attention_macs=counted.attention_macs - saved, by_op=by_op)
