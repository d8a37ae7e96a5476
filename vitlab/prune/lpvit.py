"""LPViT block-structured pruning of a ViT's Linear layers (Xu et al., ECCV 2024, "LPViT: Low-Power
Semi-structured Pruning for Vision Transformers"; official code github.com/Akimoto-Cris/LPViT, read for every
choice below, none of it copied).

    from vitlab.prune import LPViT
    model = vitlab.apply_(model, LPViT(sparsity=0.5, block=(16, 16)), calib=batches)   # or --apply lpvit:...

What the method does, step by step (the official `prune_vit.py` / `tools/pruners.py` pipeline):

1. Gradients. g_l = mean over calibration batches of dL/dW_l for every pruned Linear l, with L the mean squared
   logits (`loss="output"`, the code's "empirical output distortion" surrogate; `loss="ce"` uses cross-entropy).
2. Block ranking inside a layer: blocks of (rows, cols) = `block` of the (out, in) weight, scored by the mean of
   |w * g| over the block (first-order Taylor; `ranking="l1"`: mean |w|). Pruning a fraction a of a layer zeroes
   its lowest-scoring blocks: int((1 - a) * n_blocks) blocks survive, as in the code (but >= 1 for a < 1).
3. Distortion curve per layer, a = 0, 1/steps, ..., 1 (`steps=100`, the code's `maxdeadzones`):
   D_l(a) = mean((dW * g)^2) + 1/2 dW^T (g g^T + damp I) dW, dW = W_pruned - W, i.e. a first-order term plus the
   second-order Taylor term with the Hessian replaced by the (rank-one) Fisher of the mean gradient plus a small
   damping (`second_order`, `damp=1e-7`). Smoothed by a de-biased EMA (`smooth`).
4. Hardware-aware term (`power`): the power of layer l is modelled, as in the code, by its number of weight blocks
   times floor(in_features / 16); P_l(a) = that * (1 - a) counts the blocks that survive (the paper's goal:
   fewer surviving blocks = less power). The code adds P to D with the weight
   beta = mean_l max_a D_l'(a) / mean_l max_a |P_l'(a)| (slopes by a 5-point finite difference of span `h`; the
   code's automatic choice when --lambda_power > 0); `power` multiplies that beta (0: distortion only).
   NOTE: the released code evaluates its power curve at the *pruned* fraction a (its variable is named "survived"
   blocks but is `amount * blocks`), which would penalize pruning power-hungry layers; we follow the paper's
   stated objective (fewer surviving blocks) instead.
5. Per-layer sparsity by the equal-slope (Pareto) condition: for a common slope s each layer takes the a where its
   curve's slope meets s, in the Lagrangian form a_l = argmin_a D_l(a) - s * a (the official code has this form
   commented out beside a nearest-finite-difference rule; the second-order term makes curves non-convex, where
   only the Lagrangian form is well defined and monotone in s). Every layer keeps at least
   min(min_keep, (1 - sparsity) / 2) of its blocks, as in the code. s is bisected so that the overall sparsity of
   the pruned layers' weights meets `sparsity` (all these layers see the same tokens, so this is also their MAC
   fraction); the remaining gap between the two bracketing solutions is closed one grid step at a time.
6. Zero the chosen blocks (the model stays a plain timm model with dense weights; saved and reloaded as usual).

Checked in tests/prune/test_prune_lpvit.py: sparsity 0 is the identity; zeros come in whole aligned blocks; the reached
sparsity is within 0.01 of the target; `distortion` equals the explicit 1/2 dW^T (g g^T + damp I) dW + first-order
term; the gradients equal a direct autograd computation; layers with flatter curves (cheap to prune) and with
larger power weight get more sparsity; save/reload reproduces outputs.

Fine-tuning with the block mask held fixed: `vitlab train --init <lpvit checkpoint>` (vitlab.engine.train
`keep_zeros`, on by default for checkpoints `vitlab prune --apply lpvit:...` wrote). Not done from the paper:
hardware power measurement. On this CPU a block-sparse model is not faster: see BENCHMARKS.md.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..record import update_record
from ..techniques import Kind, TechniqueError, TechniqueNotApplicable, register_handler, register_technique

__all__ = ["LPViT", "LPViTError", "lpvit_prune_", "prunable_linears", "block_scores", "block_mask",
           "kept_blocks", "distortion", "distortion_curve", "smooth_curve", "derivative", "allocate",
           "layer_gradients", "power_weight", "block_sparsity"]

LAYERS = ("qkv", "proj", "fc1", "fc2")


class LPViTError(TechniqueError):
    """An LPViT request that cannot be met; the message names the value and what to change."""


@register_technique("lpvit", Kind.STRUCTURE, needs_calibration=lambda cfg: cfg.needs_calibration)
@dataclass(frozen=True)
class LPViT:
    """LPViT block-structured pruning of Linear layers (hardware-aware second-order objective, Xu et al. 2024)."""
    sparsity: float = 0.5                       # fraction of the pruned layers' weights zeroed, in whole blocks
    block: tuple[int, int] = (16, 16)           # (rows of out_features, cols of in_features); the paper's DeiT-S
    layers: tuple[str, ...] = LAYERS            # which Linear layers of every block are pruned
    ranking: Literal["taylor", "l1"] = "taylor"  # block score inside a layer: mean |w*g| (code default) or mean |w|
    loss: Literal["output", "ce"] = "output"    # gradient of mean(logits^2) (official code) or of cross-entropy
    second_order: bool = True                   # add 1/2 dW^T (g g^T + damp I) dW to the distortion
    power: float = 1.0                          # weight of the power term relative to the code's automatic beta
    steps: int = 100                            # points on each layer's distortion curve (maxdeadzones)
    smooth: float = 0.5                         # EMA weight smoothing the curves (code default; 0: no smoothing)
    h: int = 4                                  # finite-difference span for the curve slopes
    min_keep: float = 0.05                      # every layer keeps >= min(min_keep, (1-sparsity)/2) of its blocks
    damp: float = 1e-7                          # damping added to the Fisher's diagonal

    @property
    def needs_calibration(self) -> bool:
        return self.sparsity > 0

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity} must be in [0, 1): the fraction of weights zeroed "
                             "(0.5 = half)")
        if len(self.block) != 2 or any(int(b) != b or b < 1 for b in self.block):
            raise ValueError(f"block={self.block} must be two positive integers (rows, cols), e.g. block=16/16")
        bad = [name for name in self.layers if name not in LAYERS]
        if bad or not self.layers:
            raise ValueError(f"layers={self.layers}: choose a non-empty subset of {'/'.join(LAYERS)}")
        if self.steps < 4:
            raise ValueError(f"steps={self.steps} must be >= 4 (points on each distortion curve; paper: 100)")
        if not 0 <= self.smooth < 1:
            raise ValueError(f"smooth={self.smooth} must be in [0, 1) (EMA weight; 0 = no smoothing)")
        if self.power < 0:
            raise ValueError(f"power={self.power} must be >= 0 (0 turns the power term off)")
        if self.h < 1:
            raise ValueError(f"h={self.h} must be >= 1")
        if not 0 <= self.min_keep < 1:
            raise ValueError(f"min_keep={self.min_keep} must be in [0, 1)")
        if self.damp < 0:
            raise ValueError(f"damp={self.damp} must be >= 0")


# --------------------------------------------------------------------------------------------- pure functions

def block_scores(weight: torch.Tensor, grad: torch.Tensor | None, block: tuple[int, int],
                 ranking: str = "taylor") -> torch.Tensor:
    """(out/bh, in/bw) score of every weight block: mean |w*g| ("taylor") or mean |w| ("l1") over the block."""
    bh, bw = block
    x = (weight * grad).abs() if ranking == "taylor" else weight.abs()
    rows, cols = x.shape
    return x.reshape(rows // bh, bh, cols // bw, bw).mean(dim=(1, 3))   # (rows/bh, cols/bw)


def _expand(block_keep: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    return block_keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def kept_blocks(amount: float, n: int) -> int:
    """Blocks a layer of n blocks keeps when a fraction `amount` is pruned: int((1 - amount) * n) as in the official
    code, but at least one while amount < 1 (so a small layer is never removed whole by rounding)."""
    keep = int((1 - amount) * n + 1e-9)
    return max(keep, 1) if amount < 1 else keep


def block_mask(scores: torch.Tensor, amount: float, block: tuple[int, int]) -> torch.Tensor:
    """Weight-shaped 0/1 mask keeping the `kept_blocks(amount, n_blocks)` highest-scoring blocks."""
    keep = kept_blocks(amount, scores.numel())
    flat = torch.zeros(scores.numel(), dtype=torch.bool)
    flat[scores.flatten().argsort(descending=True)[:keep]] = True
    return _expand(flat.view_as(scores), block)


def distortion(weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, *, second_order: bool = True,
               damp: float = 1e-7) -> float:
    """LPViT's per-layer distortion of zeroing weight * (1 - mask): first-order term mean((dW*g)^2) plus, with
    `second_order`, 1/2 dW^T (g g^T + damp I) dW = 1/2 (g.dW)^2 + damp/2 |dW|^2."""
    dw = -(weight * (~mask.bool())).double()
    g = grad.double()
    value = (dw * g).square().mean()
    if second_order:
        value = value + 0.5 * (g * dw).sum().square() + 0.5 * damp * dw.square().sum()
    return float(value)


def distortion_curve(weight: torch.Tensor, grad: torch.Tensor, block: tuple[int, int], *, steps: int = 100,
                     ranking: str = "taylor", second_order: bool = True, damp: float = 1e-7
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(amounts, D) at amounts 0, 1/steps, ..., 1: `distortion` of each block mask, by cumulative sums over the
    blocks in pruning order (equal to calling `distortion(weight, grad, block_mask(...))` at every amount)."""
    bh, bw = block
    rows, cols = weight.shape
    scores = block_scores(weight, grad, block, ranking).flatten()
    wg = (weight.double() * grad.double()).reshape(rows // bh, bh, cols // bw, bw)
    w2 = weight.double().square().reshape(rows // bh, bh, cols // bw, bw)
    order = scores.argsort(descending=True).flip(0)             # pruning order: lowest score first
    s = wg.sum(dim=(1, 3)).flatten()[order]                    # g . w over each block
    q = wg.square().sum(dim=(1, 3)).flatten()[order]           # sum (w g)^2 over each block
    r = w2.sum(dim=(1, 3)).flatten()[order]                    # |w|^2 over each block
    zero = torch.zeros(1, dtype=torch.float64)
    cs, cq, cr = (torch.cat([zero, t.cumsum(0)]) for t in (s, q, r))   # index k: first k blocks pruned
    n = scores.numel()
    amounts = torch.arange(steps + 1, dtype=torch.float64) / steps
    pruned = torch.tensor([n - kept_blocks(a, n) for a in amounts.tolist()])
    dist = cq[pruned] / weight.numel()
    if second_order:
        dist = dist + 0.5 * cs[pruned].square() + 0.5 * damp * cr[pruned]
    return amounts, dist


def smooth_curve(y: torch.Tensor, weight: float) -> torch.Tensor:
    """De-biased exponential moving average (TensorBoard's smoothing, as the official code uses)."""
    if weight == 0:
        return y.clone()
    out, last = torch.empty_like(y), 0.0
    for i, v in enumerate(y.tolist()):
        last = last * weight + (1 - weight) * v
        out[i] = last / (1 - weight ** (i + 1))
    return out


def derivative(x: torch.Tensor, y: torch.Tensor, h: int = 4) -> torch.Tensor:
    """dy/dx at x[0..n-2]: 5-point stencil with step h//2 grid points where it fits, else central / forward
    differences (the official code's `derivative_approx`, with its uneven-stencil edge case made symmetric)."""
    n = len(x)
    out = torch.empty(n - 1, dtype=torch.float64)
    for i in range(n - 1):
        d = min(h // 2, i // 2, (n - 1 - i) // 2)
        if d >= 1:
            out[i] = (-y[i + 2 * d] + 8 * y[i + d] - 8 * y[i - d] + y[i - 2 * d]) / (12 * (x[i + d] - x[i]))
        elif 1 <= i < n - 1:
            out[i] = (y[i + 1] - y[i - 1]) / (x[i + 1] - x[i - 1])
        else:
            out[i] = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
    return out


def power_weight(weight_shape: tuple[int, int], block: tuple[int, int]) -> float:
    """The code's per-layer power model: number of weight blocks x floor(in_features / 16) (at least 1)."""
    rows, cols = weight_shape
    return (rows // block[0]) * (cols // block[1]) * max(1, cols // 16)


def _pruned_blocks(a: float, n: int) -> int:
    return n - kept_blocks(a, n)


def _reached(chosen: list[float], n_blocks: list[int], sizes: list[int]) -> float:
    pruned = sum(_pruned_blocks(a, n) * (size // n) for a, n, size in zip(chosen, n_blocks, sizes))
    return pruned / sum(sizes)


def _lagrangian_pick(amounts: torch.Tensor, curves: list[torch.Tensor], s: float) -> list[int]:
    return [int((c - s * amounts).argmin()) for c in curves]


def allocate(amounts: torch.Tensor, curves: list[torch.Tensor], n_blocks: list[int], sizes: list[int],
             target: float, *, min_keep: float = 0.05, iters: int = 100) -> list[float]:
    """Per-layer pruned fractions by the equal-slope (Pareto) condition, in its Lagrangian form: for a common
    slope s every layer takes a = argmin_a D_l(a) - s * a (where its curve's slope crosses s; the form the official
    code has commented out beside its nearest-derivative rule, which is ill-posed on the non-convex curves the
    second-order term gives). s is bisected so the weighted sparsity (block counts as rounded by `block_mask`)
    meets `target`; the last gap between the two bracketing solutions is closed by moving the layers on which they
    differ, one grid step at a time. Every layer keeps >= min(min_keep, (1 - target) / 2) of its blocks.
    Layers whose curves rise slowly (cheap to prune) get more sparsity."""
    cap = 1 - min(min_keep, (1 - target) / 2)
    ok = int((amounts <= cap + 1e-9).sum())
    a, curves = amounts[:ok], [c[:ok] for c in curves]
    span = max(float((c.max() - c.min()) / (a[1] - a[0])) for c in curves) + 1.0
    lo, hi = -span, span
    low = _lagrangian_pick(a, curves, lo)
    high = _lagrangian_pick(a, curves, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        pick = _lagrangian_pick(a, curves, mid)
        if _reached([float(a[i]) for i in pick], n_blocks, sizes) < target:
            lo, low = mid, pick
        else:
            hi, high = mid, pick
    # low reaches < target, high >= target: step the layers where they differ toward high until target is met
    idx = list(low)
    for layer in sorted(range(len(idx)), key=lambda k: high[k] - low[k]):
        while idx[layer] < high[layer] and _reached([float(a[i]) for i in idx], n_blocks, sizes) < target:
            idx[layer] += 1
    chosen = [float(a[i]) for i in idx]
    return chosen


def block_sparsity(weight: torch.Tensor, block: tuple[int, int]) -> float:
    """Fraction of `weight`'s (bh x bw) blocks that are entirely zero."""
    bh, bw = block
    rows, cols = weight.shape
    nz = weight.reshape(rows // bh, bh, cols // bw, bw).ne(0).any(dim=3).any(dim=1)
    return float(1 - nz.float().mean())


# ---------------------------------------------------------------------------------------------- model adapter

def prunable_linears(model: nn.Module, layers=LAYERS) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the chosen Linear layers of every transformer block (`model.blocks[i].attn/.mlp`)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TechniqueNotApplicable("lpvit", model, "it has no `blocks`; lpvit supports models whose `blocks` hold "
                                     "attn.qkv/proj and mlp.fc1/fc2 Linear layers (timm VisionTransformer, vl_* ViTs)")
    out = []
    for i, blk in enumerate(blocks):
        for name in layers:
            parent = getattr(blk, "attn" if name in ("qkv", "proj") else "mlp", None)  # spectral blocks: no attn
            mod = getattr(parent, name, None)
            if isinstance(mod, nn.Linear):
                out.append((f"blocks.{i}.{'attn' if name in ('qkv', 'proj') else 'mlp'}.{name}", mod))
    if not out:
        raise TechniqueNotApplicable("lpvit", model, f"no Linear layers named {'/'.join(layers)} in its `blocks`; "
                                     "lpvit supports models whose `blocks` hold attn.qkv/proj and mlp.fc1/fc2 Linear "
                                     "layers (timm VisionTransformer, vl_* ViTs)")
    return out


def _check_block(linears, block) -> None:
    bh, bw = block
    for name, mod in linears:
        rows, cols = mod.weight.shape
        if rows % bh or cols % bw:
            g_rows = math.gcd(*[m.weight.shape[0] for _, m in linears])
            g_cols = math.gcd(*[m.weight.shape[1] for _, m in linears])
            raise LPViTError(f"lpvit: block={bh}/{bw} does not divide {name}'s weight {rows}x{cols} (out x in); "
                             f"every pruned layer needs rows divisible by the block's rows and columns by its "
                             f"columns: the largest block that fits all layers is {g_rows}/{g_cols} "
                             f"(e.g. block={math.gcd(g_rows, 16)}/{math.gcd(g_cols, 16)})")


def layer_gradients(model: nn.Module, linears, calib, loss: str = "output") -> list[torch.Tensor]:
    """Mean over calibration batches of d loss_b / d W for every layer in `linears` (model in eval mode).

    loss "output": mean(logits^2) (the official code); "ce": cross-entropy with the batch's labels (image-only
    batches are labelled with the model's own predictions)."""
    batches = list(calib)
    if not batches:
        raise LPViTError("lpvit got no calibration batches")
    was_training = model.training
    model.eval()
    grads = [torch.zeros_like(m.weight, dtype=torch.float64) for _, m in linears]
    try:
        for batch in batches:
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            model.zero_grad(set_to_none=True)
            logits = model(x)
            if loss == "ce":
                target = logits.argmax(-1).detach() if y is None else y
                value = F.cross_entropy(logits, target)
            else:
                value = logits.square().mean()
            value.backward()
            for g, (_, m) in zip(grads, linears):
                g += m.weight.grad.double() / len(batches)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return grads


def lpvit_prune_(model: nn.Module, cfg: LPViT | None = None, *, calib=None, **kwargs) -> nn.Module:
    """Zero whole weight blocks of `model`'s block Linear layers by LPViT (in place); return the model.

    `calib`: image batches or (images, labels) pairs (needed unless sparsity=0). `kwargs` override `cfg`'s fields.
    Records `model.vitlab.lpvit`: per-layer pruned fractions, the reached sparsity and beta.
    """
    cfg = dataclasses.replace(cfg or LPViT(), **kwargs)
    block = tuple(int(b) for b in cfg.block)
    linears = prunable_linears(model, cfg.layers)
    _check_block(linears, block)
    if cfg.sparsity == 0:
        update_record(model, lpvit={"sparsity": 0.0, "layers": {n: 0.0 for n, _ in linears}})
        return model
    if calib is None:
        raise LPViTError("lpvit needs calibration images for its gradients: pass calib= (CLI: vitlab bench/measure "
                         "--apply lpvit:... --data SPEC, calibrating on --calib-split train)")
    grads = layer_gradients(model, linears, calib, cfg.loss)
    curves, n_blocks, sizes, pw = [], [], [], []
    for (_, mod), g in zip(linears, grads):
        w = mod.weight.detach()
        amounts, dist = distortion_curve(w, g, block, steps=cfg.steps, ranking=cfg.ranking,
                                         second_order=cfg.second_order, damp=cfg.damp)
        curves.append(smooth_curve(dist, cfg.smooth))
        n_blocks.append((w.shape[0] // block[0]) * (w.shape[1] // block[1]))
        sizes.append(w.numel())
        pw.append(power_weight(tuple(w.shape), block))
    beta = 0.0
    if cfg.power > 0:
        max_slope = sum(float(derivative(amounts, c, cfg.h).max()) for c in curves) / len(curves)
        beta = cfg.power * max_slope / (sum(pw) / len(pw))
        curves = [c + beta * p * (1 - amounts) for c, p in zip(curves, pw)]
    chosen = allocate(amounts, curves, n_blocks, sizes, cfg.sparsity, min_keep=cfg.min_keep)
    with torch.no_grad():
        for (_, mod), g, a in zip(linears, grads, chosen):
            scores = block_scores(mod.weight.detach(), g, block, cfg.ranking)   # float64, as in the curve
            mod.weight.mul_(block_mask(scores, a, block).to(mod.weight.dtype))
    update_record(model, lpvit={"sparsity": _reached(chosen, n_blocks, sizes), "target": cfg.sparsity, "beta": beta,
                                "layers": {n: a for (n, _), a in zip(linears, chosen)}})
    return model


@register_handler(LPViT)
def _apply_lpvit(model, cfg: LPViT, calib=None):
    return lpvit_prune_(model, cfg, calib=calib)
