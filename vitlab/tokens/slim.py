"""Self-slimmed ViT (Zong et al., "Self-slimmed Vision Transformer", ECCV 2022): the Token Slimming Module (TSM)
and Feature Recalibration Distillation (FRD).

Verified by reading the official code, github.com/Sense-X/SiT at f577808 (`models/lvvit.py`: TokenSlimmingModule,
ReverseTSM, LVViT.forward; `losses.py`: DistillationLoss; `exp/*/train.sh`: lambda_token = lambda_logits = 2, tau 1):

* TSM, at each stage boundary: N tokens -> M = int(N0 * keep_rate ** stage) tokens (N0: the patches; the official
  `keeped_patches`) by soft aggregation: A = softmax_over_N(scale * MLP(LN(x)))^T (M, N), x' = A x. Each of A's M
  rows is a convex combination of the N input tokens (row-stochastic). The class token (every prefix token here)
  bypasses the TSM. The official code slims after the last block of a stage; here the first block of the next
  stage slims its input (the same tensor), so `locations` are fractions of the reducible blocks as in EViT.
* FRD (`FRD`, a training recipe): a frozen copy of the un-slimmed model is the teacher; after every reducible block
  the student's patch tokens (the slimmed ones where that block's output is slimmed) go through a reverse TSM
  (LN, MLP over the token axis M -> N0, then a residual channel MLP) and are matched to the teacher's tokens by MSE,
  averaged over blocks (blocks before the first slimming compare directly, the official `nn.Identity`), plus a KL
  distillation of the logits: CE + lambda_token * MSE + lambda_logits * tau^2 KL(teacher || student).

keep_rate = 1 inserts no TSM (M = N at every stage: the model is the un-slimmed one; the official code would still
insert an N -> N mixing there, which is not the identity). The TSMs' weights are part of the checkpoint
(`blocks.k.token_slimming.*`); reverse TSMs are training-only and are not saved.
"""
import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from ..recipes import Recipe, Step, register_recipe
from ..techniques import TechniqueError, format_technique
from .families import reducible_blocks, token_sequences
from .patch import ReducingBlockMixin, TokenReducingModel, TokenState, init_state, patch_model

__all__ = ["TokenSlimming", "ReverseTSM", "SlimReduction", "slim_counts", "FRD", "frd_loss"]


class TokenSlimming(nn.Module):
    """N tokens -> `keep` tokens: x' = A x with A = softmax over the N inputs of scale * MLP(LN(x)), transposed
    (official `TokenSlimmingModule`, hidden width dim * 0.5, learnable temperature `scale` starting at 1)."""

    def __init__(self, dim: int, keep: int, hidden_ratio: float = 0.5):
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.weight = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, keep))
        self.scale = nn.Parameter(torch.ones(1, 1, 1))
        for m in self.weight:
            if isinstance(m, nn.Linear):          # the official `_init_weights`
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def mixing(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M, N) row-stochastic aggregation weights for tokens x (B, N, C)."""
        return (self.weight(x) * self.scale).softmax(dim=1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixing(x) @ x                                    # (B, M, N) @ (B, N, C) -> (B, M, C)


class ReverseTSM(nn.Module):
    """M tokens -> N0 tokens for FRD (official `ReverseTSM`, MLP ratio 4): LN, an MLP over the token axis, then a
    residual MLP over channels."""

    def __init__(self, dim: int, kept: int, recovered: int, ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp1 = Mlp(kept, int(recovered * ratio), recovered)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp2 = Mlp(dim, int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp1(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # (B, C, M) -> (B, C, N0) -> (B, N0, C)
        return x + self.mlp2(self.norm2(x))


class SlimReduction:
    """Slim a block's input to `tsm`'s token count before it attends (prefix tokens kept); records the slimmed
    patch tokens (`last`) for FRD."""

    before_attention = True

    def __init__(self, tsm: TokenSlimming):
        self.tsm, self.active, self.last = tsm, True, None

    def merge_and_attend(self, block, x: torch.Tensor, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        p = state.num_prefix
        mix = self.tsm.mixing(x[:, p:])                              # (B, M, N - p)
        rest = mix @ x[:, p:]                                        # (B, M, C)
        if state.trace_source:                                       # soft sources: the same convex combination
            init_state(x, state, with_size=False)
            state.source = torch.cat([state.source[:, :p], mix @ state.source[:, p:]], dim=1)
        self.last = rest
        x = torch.cat([x[:, :p], rest], dim=1)
        return x, block.attn.attend(block.norm1(x))


def slim_counts(num_patches: int, keep_rate: float, stages: int) -> list[int]:
    """Patch tokens after each of `stages` slimmings: int(N0 * keep_rate ** s), s = 1..stages (official
    `keeped_patches`); errors when one would keep no token."""
    counts = [int(num_patches * keep_rate ** s) for s in range(1, stages + 1)]
    if counts and counts[-1] < 1:
        raise TechniqueError(f"slim:keep_rate={keep_rate} keeps no token after {stages} slimmings of {num_patches} "
                             "patches; raise keep_rate or give fewer locations")
    return counts


def slim_reductions(model: nn.Module) -> list[tuple[nn.Module, SlimReduction]]:
    """(block, reduction) for every slimming block of a slimmed model, in module order."""
    return [(m, m.reduction) for m in model.modules()
            if isinstance(m, ReducingBlockMixin) and isinstance(m.reduction, SlimReduction)]


class _Unslimmed:
    """Context: run a slimmed model with every TSM skipped (the un-slimmed backbone)."""

    def __init__(self, model: nn.Module):
        self.reductions = [r for _, r in slim_reductions(model)]

    def __enter__(self):
        for r in self.reductions:
            r.active = False

    def __exit__(self, *exc):
        for r in self.reductions:
            r.active = True


def _block_outputs(model: nn.Module, images: torch.Tensor, blocks: list[nn.Module]) -> tuple[Any, list]:
    """(model(images), each block's output as (B, N, C)); hooks removed afterwards."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.reshape(o.shape[0], -1, o.shape[-1])))
             for b in blocks]
    try:
        result = model(images)
    finally:
        for h in hooks:
            h.remove()
    return result, outs


def frd_loss(student_tokens: list[torch.Tensor], teacher_tokens: list[torch.Tensor], rtsms: nn.ModuleList,
             student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token term: mean over blocks of MSE(rtsm_j(s_j), t_j); logit term: tau^2 KL(teacher || student) per image),
    the official `DistillationLoss` with distillation_type 'frd' before its lambdas."""
    token = sum(F.mse_loss(r(s), t) for r, s, t in zip(rtsms, student_tokens, teacher_tokens)) / len(rtsms)
    logits = F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                      reduction="batchmean", log_target=True) * tau * tau
    return token, logits


@register_recipe("frd")
@dataclass
class FRD(Recipe):
    """Feature Recalibration Distillation for a model with `slim` applied: `--apply slim:keep_rate=0.5 --recipe frd`.
    The teacher is the model as it starts (its weights before any step, every TSM skipped), frozen."""

    token_weight: float = 2.0        # official --lambda-token
    logits_weight: float = 2.0       # official --lambda-logits
    tau: float = 1.0                 # official --distillation-tau
    ratio: float = 4.0               # reverse TSM MLP width ratio (official 4; on a tiny model it costs more than
                                     # the model itself: ratio=1 trains ~2x faster)

    def __post_init__(self):
        if self.token_weight < 0 or self.logits_weight < 0 or self.tau <= 0 or self.ratio <= 0:
            raise ValueError(f"frd needs token_weight, logits_weight >= 0 and tau, ratio > 0, got {self.token_weight}, "
                             f"{self.logits_weight}, {self.tau}, {self.ratio}")

    def setup(self, model: nn.Module, train_set: Any, cfg: Any, rt: Any) -> None:
        pairs = slim_reductions(model)
        if not pairs:
            raise TechniqueError("--recipe frd distils a slimmed model; add --apply slim:keep_rate=0.5")
        if len(model.token_sequences) > 1:
            raise TechniqueError(f"--recipe frd supports models with one token sequence; {type(model).__name__} has "
                                 f"{len(model.token_sequences)} (train its slimmed branches with plain CE instead)")
        self.label_smoothing = getattr(cfg, "label_smoothing", 0.0)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self._teacher_ctx = _Unslimmed(self.teacher)
        self.blocks = [spec.module for _, spec in reducible_blocks(model.token_sequences)]
        self.teacher_blocks = [spec.module for _, spec in reducible_blocks(self.teacher.token_sequences)]
        self.slimmed_at = {id(block): red for block, red in pairs}
        # patch tokens after each block (the slimmed count where the next block slims), and the reverse TSMs
        seq = model.token_sequences[0]
        n0 = seq.num_tokens - seq.num_prefix
        counts, n = [], n0
        for k, block in enumerate(self.blocks):
            nxt = self.blocks[k + 1] if k + 1 < len(self.blocks) else None
            if nxt is not None and id(nxt) in self.slimmed_at:
                n = self.slimmed_at[id(nxt)].tsm.weight[-1].out_features
            counts.append(n)
        dim = pairs[0][1].tsm.weight[0].normalized_shape[0]
        self.rtsms = nn.ModuleList([ReverseTSM(dim, c, n0, self.ratio) if c < n0 else nn.Identity() for c in counts])
        self.rtsms.to(next(model.parameters()).device)
        self.num_prefix = seq.num_prefix

    def parameters(self) -> list[nn.Parameter]:
        return list(self.rtsms.parameters())

    def loss(self, step: Step) -> torch.Tensor:
        logits, outs = _block_outputs(step.train_model, step.images, self.blocks)
        p = self.num_prefix
        student = []
        for k, out in enumerate(outs):     # the slimmed tokens where the next block slims this output (official)
            nxt = self.blocks[k + 1] if k + 1 < len(self.blocks) else None
            red = self.slimmed_at.get(id(nxt)) if nxt is not None else None
            student.append(red.last if red is not None else out[:, p:])
        with torch.no_grad(), self._teacher_ctx:
            teacher_logits, teacher_outs = _block_outputs(self.teacher, step.images, self.teacher_blocks)
        token, kl = frd_loss(student, [t[:, p:] for t in teacher_outs], self.rtsms, logits, teacher_logits, self.tau)
        if step.soft is not None:
            ce = torch.sum(-step.soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            ce = F.cross_entropy(logits, step.targets, label_smoothing=self.label_smoothing)
        return ce + self.token_weight * token + self.logits_weight * kl


def slim_stage_blocks(depth: int, locations: tuple[float, ...]) -> list[int]:
    """The reducible blocks (0-based, execution order) whose input is slimmed: round(f * depth) per location
    (block 0 slims the patch tokens straight from the embedding)."""
    return sorted({min(depth - 1, round(f * depth)) for f in locations})


def apply_slim(model: nn.Module, cfg) -> nn.Module:
    """Insert a TSM (registered as `token_slimming` in the slimming block, so the checkpoint holds it) at each of
    `cfg.locations`; stage s of a token sequence keeps int(N0 * keep_rate ** s) of its N0 patch tokens."""
    if isinstance(model, TokenReducingModel):
        raise TechniqueError("the model already has a token-reduction technique; apply one per model")
    sequences = token_sequences(model, format_technique(cfg))
    blocks = reducible_blocks(sequences)
    at = set(slim_stage_blocks(len(blocks), cfg.locations)) if cfg.keep_rate < 1 else set()
    where = {id(b.module): (i, j) for i, s in enumerate(sequences) for j, b in enumerate(s.blocks)}
    reductions = [[None] * len(s.blocks) for s in sequences]
    stage = [0] * len(sequences)
    for k, (i, spec) in enumerate(blocks):
        if k not in at:
            continue
        stage[i] += 1
        seq, block = sequences[i], spec.module
        keep = slim_counts(seq.num_tokens - seq.num_prefix, cfg.keep_rate, stage[i])[-1]
        weight = block.norm1.weight
        block.token_slimming = TokenSlimming(weight.shape[0], keep, cfg.hidden_ratio).to(weight.device)
        reductions[where[id(block)][0]][where[id(block)][1]] = SlimReduction(block.token_slimming)
    patch_model(model, sequences, reductions, trace_source=cfg.trace_source, prop_attn=False)
    model.token_sequences = sequences
    return model
