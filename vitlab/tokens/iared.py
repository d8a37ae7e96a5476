"""IA-RED² (Pan et al., "IA-RED²: Interpretability-Aware Redundancy Reduction for Vision Transformers", NeurIPS
2021): a multi-head interpreter before each group of blocks scores the patch tokens, the uninformative ones are
dropped (hierarchically: a dropped token stays dropped), and the interpreters are trained with REINFORCE.

No official code was released (the project page, people.csail.mit.edu/bpan/ia-red/, says "coming soon"); this is
our reading of the paper, with our choices marked:

* Interpreter (one per group, at `locations`): LN, then a per-head query (from the class token; the mean of the
  alive tokens without one) and per-head keys (every patch token), s_hi = sigmoid(q_h . k_hi / sqrt(d) + b_h); the
  keep probability is the mean over heads, p_i = mean_h s_hi. (Ours: the bias b_h, initialised to 3 so that a fresh
  interpreter keeps ~95 % of the tokens and fine-tuning starts near the unreduced model.)
* Policy: u_i ~ Bernoulli(p_i) while the interpreters train; at inference u_i = [p_i > threshold] (0.5). Dropped
  tokens are masked as keys while training (no gather; the class token sees exactly the kept tokens) and removed at
  inference (per-image counts, padded to the batch's largest and masked, as ATS is).
* Reward per image: R = 1 - rho^2 if the prediction is right, else -penalty, with rho the fraction of patch tokens
  executed, averaged over the reducible blocks (the budget term); the REINFORCE loss is
  -mean_b[(R_b - baseline) * sum_{groups, alive i} log pi(u_bi)] with pi(u) = p^u (1 - p)^(1 - u)
  (`reinforce_loss`; baseline 0 is the plain estimator, `baseline=True` subtracts the batch's mean reward).
* Training (`--recipe iared`): phase "policy" trains the interpreters with the backbone frozen; phase "backbone"
  then fine-tunes the backbone with the interpreters frozen and deterministic (the paper's optional second step).

The scores double as a saliency map: `vitlab explain CKPT --method iared` (registered in
vitlab.explain.iared) shows, per patch, the
product of its keep probabilities over the groups it reached (0 after it is dropped).
"""
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..recipes import Recipe, Step, register_recipe
from ..techniques import TechniqueError, format_technique
from .families import reducible_blocks, token_sequences
from .patch import ReducingBlockMixin, TokenReducingModel, TokenState, init_state, patch_model

__all__ = ["Interpreter", "IAREDReduction", "policy_log_prob", "iared_reward", "reinforce_loss", "executed_fraction",
           "IAREDTraining", "apply_iared"]


class Interpreter(nn.Module):
    """The multi-head interpreter: keep probabilities (B, n) for the n patch tokens of x (B, p + n, C)."""

    def __init__(self, dim: int, heads: int, head_dim: int, init_bias: float = 2.0):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim)
        self.qk = nn.Linear(dim, 2 * heads * head_dim)
        self.bias = nn.Parameter(torch.full((heads,), init_bias))

    def forward(self, x: torch.Tensor, num_prefix: int, alive: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        H, d = self.heads, self.head_dim
        q, k = self.qk(self.norm(x)).reshape(B, N, 2, H, d).unbind(2)        # each (B, N, H, d)
        if num_prefix > 0:
            query = q[:, 0]                                                  # (B, H, d): the class token's
        else:
            w = alive.to(q.dtype)[..., None, None]                           # (B, n, 1, 1)
            query = (q * w).sum(1) / w.sum(1).clamp_min(1)
        logits = torch.einsum("bhd,bnhd->bhn", query, k[:, num_prefix:]) / d ** 0.5   # (B, H, n)
        return (logits + self.bias[None, :, None]).sigmoid().mean(dim=1)      # (B, n)


class IAREDReduction:
    """Score the block's input with its group's interpreter and drop tokens before the block attends.

    Modes: "sample" (Bernoulli actions, masked; while the policy trains), "mask" (thresholded, masked: token
    positions stay those of the input, for saliency maps) and "drop" (thresholded, removed; inference). `record`
    holds this forward's (probs, actions, alive) for the REINFORCE loss and the saliency map."""

    before_attention = True

    def __init__(self, interpreter: Interpreter, threshold: float):
        self.interpreter, self.threshold = interpreter, threshold
        self.active, self.sample_in_training, self.mask = True, False, False
        self.record: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def merge_and_attend(self, block, x: torch.Tensor, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        init_state(x, state)
        p = state.num_prefix
        alive = state.size[:, p:, 0] > 0                                     # (B, n): not dropped earlier
        probs = self.interpreter(x, p, alive)
        if block.training and self.sample_in_training:
            keep = torch.bernoulli(probs.detach()).bool() & alive
        else:
            keep = alive & (probs > self.threshold)
            # an image that would keep no patch keeps its most probable alive one (an average-pool head needs one)
            best = torch.where(alive, probs, -1.0).argmax(dim=1, keepdim=True)
            keep = keep | (torch.zeros_like(keep).scatter_(1, best, True) & ~keep.any(1, keepdim=True) & alive)
        self.record = (probs, keep, alive)
        if (block.training and self.sample_in_training) or self.mask:
            state.size = torch.cat([state.size[:, :p], state.size[:, p:] * keep[..., None].to(x.dtype)], dim=1)
            state.padded = True
        else:
            x = _gather_kept(x, keep, state)
        state.image_counts.append(keep.sum(dim=1))
        return x, block.attn.attend(block.norm1(x))


def _gather_kept(x: torch.Tensor, keep: torch.Tensor, state: TokenState) -> torch.Tensor:
    """x (B, p + n, C) with only its kept patch tokens (original order), padded to the batch's largest count;
    sizes (0 for padding) and sources follow."""
    p = state.num_prefix
    counts = keep.sum(dim=1)
    m = int(counts.max())
    idx = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :m]    # (B, m): kept first
    valid = keep.gather(1, idx)[..., None]                                            # (B, m, 1)
    state.padded = state.padded or bool((counts < m).any())
    for name in ("size", "source"):
        value = getattr(state, name)
        if value is not None:
            rest = value[:, p:].gather(1, idx[..., None].expand(-1, -1, value.shape[-1])) * valid.to(value.dtype)
            setattr(state, name, torch.cat([value[:, :p], rest], dim=1))
    return torch.cat([x[:, :p], x[:, p:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))], dim=1)


def iared_reductions(model: nn.Module) -> list[IAREDReduction]:
    """Every IA-RED² reduction of `model`, in module order."""
    return [m.reduction for m in model.modules()
            if isinstance(m, ReducingBlockMixin) and isinstance(m.reduction, IAREDReduction)]


# ------------------------------------------------------------------------------------------------ REINFORCE

def policy_log_prob(probs: torch.Tensor, actions: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """(B,) sum over alive tokens of log pi(u) = u log p + (1 - u) log(1 - p); probs, actions, alive (B, n)."""
    u = actions.to(probs.dtype)
    eps = torch.finfo(probs.dtype).tiny
    log_pi = u * probs.clamp_min(eps).log() + (1 - u) * (1 - probs).clamp_min(eps).log()
    return (log_pi * alive.to(probs.dtype)).sum(dim=1)


def iared_reward(correct: torch.Tensor, executed: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B,) R = 1 - executed^2 where the prediction is right, else -penalty."""
    return torch.where(correct, 1 - executed ** 2, torch.full_like(executed, -penalty))


def reinforce_loss(log_prob: torch.Tensor, reward: torch.Tensor, baseline: bool) -> torch.Tensor:
    """-mean_b[(R_b - b) log pi_b]: its gradient is the REINFORCE estimate of -grad E[R] (b: the batch mean reward
    when `baseline`, else 0)."""
    advantage = reward - reward.mean() if baseline else reward
    return -(advantage.detach() * log_prob).mean()


def executed_fraction(model: nn.Module) -> torch.Tensor:
    """(B,) fraction of patch tokens each image executes, averaged over the reducible blocks (from this forward's
    records; blocks before the first interpreter execute every patch)."""
    seq = model.token_sequences[0]
    n0 = seq.num_tokens - seq.num_prefix
    fractions, current = [], None
    for _, spec in reducible_blocks(model.token_sequences):
        red = spec.module.reduction
        if isinstance(red, IAREDReduction) and red.record is not None:
            current = red.record[1].sum(dim=1).to(red.record[0].dtype) / n0
        fractions.append(current)
    ref = next(f for f in fractions if f is not None)
    return torch.stack([torch.ones_like(ref) if f is None else f for f in fractions]).mean(dim=0)


@register_recipe("iared")
@dataclass
class IAREDTraining(Recipe):
    """Train a model with `iared` applied: phase "policy" (REINFORCE on the interpreters, backbone frozen) or
    "backbone" (fine-tune the backbone with the frozen interpreters dropping deterministically, plain CE)."""

    phase: str = "policy"
    penalty: float = 0.5          # -R for a wrong prediction
    baseline: bool = True         # subtract the batch's mean reward (variance reduction)

    def __post_init__(self):
        if self.phase not in ("policy", "backbone"):
            raise ValueError(f"phase is 'policy' or 'backbone', got {self.phase!r}")
        if self.penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {self.penalty}")

    def setup(self, model: nn.Module, train_set: Any, cfg: Any, rt: Any) -> None:
        reductions = iared_reductions(model)
        if not reductions:
            raise TechniqueError("--recipe iared trains IA-RED²'s interpreters; add --apply iared")
        if len(model.token_sequences) > 1:
            raise TechniqueError(f"--recipe iared supports models with one token sequence (its budget counts one); "
                                 f"{type(model).__name__} has {len(model.token_sequences)}")
        interpreters = [r.interpreter for r in reductions]
        policy = self.phase == "policy"
        model.requires_grad_(not policy)
        for interp in interpreters:
            interp.requires_grad_(policy)
        for r in reductions:
            r.sample_in_training = policy

    def loss(self, step: Step) -> torch.Tensor:
        if self.phase == "backbone":
            return step.default_loss()
        logits = step.train_model(step.images)
        with torch.no_grad():
            correct = logits.argmax(dim=-1) == step.targets
            reward = iared_reward(correct, executed_fraction(step.model), self.penalty)
        log_prob = sum(policy_log_prob(*r.record) for r in iared_reductions(step.model))
        return reinforce_loss(log_prob, reward, self.baseline)


def apply_iared(model: nn.Module, cfg) -> nn.Module:
    """Insert an interpreter (registered as `interpreter` in the block, so the checkpoint holds it) before each
    group starting at `cfg.locations` (fractions of the reducible blocks)."""
    if isinstance(model, TokenReducingModel):
        raise TechniqueError("the model already has a token-reduction technique; apply one per model")
    sequences = token_sequences(model, format_technique(cfg))
    blocks = reducible_blocks(sequences)
    at = {min(len(blocks) - 1, round(f * len(blocks))) for f in cfg.locations}
    where = {id(b.module): (i, j) for i, s in enumerate(sequences) for j, b in enumerate(s.blocks)}
    reductions = [[None] * len(s.blocks) for s in sequences]
    for k, (_, spec) in enumerate(blocks):
        if k not in at:
            continue
        block = spec.module
        heads = block.attn.num_heads
        dim = block.norm1.weight.shape[0]
        block.interpreter = Interpreter(dim, heads, cfg.head_dim or dim // heads).to(block.norm1.weight.device)
        i, j = where[id(block)]
        reductions[i][j] = IAREDReduction(block.interpreter, cfg.threshold)
    patch_model(model, sequences, reductions, trace_source=cfg.trace_source, prop_attn=False)
    model.token_sequences = sequences
    return model
