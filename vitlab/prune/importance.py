"""Importance criteria for pruning units (heads, MLP channel groups, blocks): pure functions of weights and gradients.

* `l1`, `l2`: magnitude of the unit's weights (Li et al., 2017).
* `taylor`: first-order Taylor estimate of the loss change when the unit's weights go to zero, |g_S . w_S| with g
  the gradient of the mean loss over the calibration images (Molchanov et al., 2019).
* `hessian`: NViT's Hessian-aware saliency (Yang et al., CVPR 2023, eq. 3-5): the second-order term
  1/2 w_S^T H w_S with H approximated by the empirical Fisher over calibration batches, i.e.
  1/2 * mean_b (g_b . w_S)^2 with g_b the gradient of batch b's mean loss. Checked in tests/prune/test_prune.py against an
  explicit Fisher matrix built from per-batch gradient vectors on a tiny model. Ranked globally across layers.
* `ablation`: loss increase on the calibration images when the unit is removed (its output columns zeroed, or the
  block replaced by the identity; stem and embedding groups: every slice zeroed), as in Michel et al. (NeurIPS
  2019, "Are Sixteen Heads Really Better than One?").

Calibration batches are image tensors, or (images, labels) pairs; without labels the unpruned model's own
predictions are the targets (so gradients are not zero at its optimum, unlike a self-KL loss).
"""
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .structure import Unit, Widths, _BLOCK_EMBED_DIM, _OUTER_EMBED_DIM, stem_layers

__all__ = ["CRITERIA", "unit_scores", "unit_dot", "calib_pairs", "model_unit_slices"]

CRITERIA = ("l1", "l2", "taylor", "hessian", "ablation")


def calib_pairs(model: nn.Module, calib: Iterable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches; image-only batches are labelled with the model's own predictions."""
    pairs = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in calib:
            if isinstance(batch, (tuple, list)):
                pairs.append((batch[0], batch[1]))
            else:
                pairs.append((batch, model(batch).argmax(-1)))
    model.train(was_training)
    return pairs


def _unit_slices(blk: nn.Module, unit: Unit, head_dim: int, num_heads: int) -> list[tuple[torch.Tensor, tuple]]:
    """(parameter, index) pairs that make up `unit` inside block `blk`."""
    attn, mlp = blk.attn, blk.mlp
    if unit.kind == "head":
        rows = [t * num_heads * head_dim + unit.index * head_dim + d for t in range(3) for d in range(head_dim)]
        cols = list(range(unit.index * head_dim, (unit.index + 1) * head_dim))
        out = [(attn.qkv.weight, (rows,)), (attn.proj.weight, (slice(None), cols))]
        if attn.qkv.bias is not None:
            out.append((attn.qkv.bias, (rows,)))
        return out
    if unit.kind == "mlp":
        ch = list(unit.channels)
        out = [(mlp.fc1.weight, (ch,)), (mlp.fc2.weight, (slice(None), ch))]
        if mlp.fc1.bias is not None:
            out.append((mlp.fc1.bias, (ch,)))
        return out
    return [(p, (...,)) for p in blk.parameters()]


def _at(dim: int, index: list[int]) -> tuple:
    return (slice(None),) * dim + (index,)


def model_unit_slices(model: nn.Module, unit: Unit, widths: Widths) -> list[tuple[torch.Tensor, tuple]]:
    """(parameter, index) pairs that make up `unit` in `model`: heads / MLP groups / blocks inside their block; a
    stem group's conv rows, GroupNorm weight and bias and the next conv's (or the patch projection's) input columns;
    an embedding group's slice of every parameter indexed by the residual width."""
    ch = list(unit.channels)
    if unit.kind == "stem":
        layers = stem_layers(model)
        conv, norm = layers[unit.block]
        nxt = layers[unit.block + 1][0] if unit.block + 1 < len(layers) else model.patch_embed.proj
        return [(conv.weight, _at(0, ch)), (norm.weight, _at(0, ch)), (norm.bias, _at(0, ch)),
                (nxt.weight, _at(1, ch))]
    if unit.kind == "embed":
        named = dict(model.named_parameters())
        out = [(named[n], _at(d, ch)) for n, d in _OUTER_EMBED_DIM.items() if n in named]
        for i in range(len(model.blocks)):
            out += [(named[f"blocks.{i}.{n}"], _at(d, ch)) for n, d in _BLOCK_EMBED_DIM.items()
                    if f"blocks.{i}.{n}" in named]
        return out
    return _unit_slices(model.blocks[unit.block], unit, widths.head_dim[unit.block], widths.num_heads[unit.block])


def unit_dot(model: nn.Module, units: list[Unit], widths: Widths, tensors: dict[int, torch.Tensor] | None = None,
             fn=None) -> torch.Tensor:
    """For each unit, sum over its parameters of fn(param, tensors[id(param)]) (e.g. g * w, |w|, w^2)."""
    out = []
    for u in units:
        total = 0.0
        for p, idx in model_unit_slices(model, u, widths):
            other = tensors[id(p)] if tensors is not None else None
            total = total + fn(p.detach()[idx], None if other is None else other[idx]).sum()
        out.append(total)
    return torch.stack([torch.as_tensor(t, dtype=torch.float64) for t in out])


def _batch_grads(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    return {id(p): p.grad.detach().clone() for p in model.parameters() if p.grad is not None}


def _loss(model: nn.Module, pairs) -> float:
    with torch.no_grad():
        total = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in pairs)
    return total / sum(len(y) for _, y in pairs)


@torch.no_grad()
def _ablate(model: nn.Module, unit: Unit, widths: Widths, pairs) -> float:
    if unit.kind in ("stem", "embed"):
        # every slice zeroed: exact removal for a stem group (its GroupNorm outputs 0, GELU(0) = 0); for embedding
        # channels the residual channel stays 0 but still counts in each LayerNorm's statistics
        slices = model_unit_slices(model, unit, widths)
        saved = [p[idx].clone() for p, idx in slices]
        for p, idx in slices:
            p[idx] = 0
        try:
            return _loss(model, pairs)
        finally:
            for (p, idx), v in zip(slices, saved):
                p[idx] = v
    blk = model.blocks[unit.block]
    if unit.kind == "block":
        model.blocks[unit.block] = nn.Identity()
        try:
            return _loss(model, pairs)
        finally:
            model.blocks[unit.block] = blk
    if unit.kind == "head":
        hd = widths.head_dim[unit.block]
        weight, idx = blk.attn.proj.weight, (slice(None), slice(unit.index * hd, (unit.index + 1) * hd))
    else:
        weight, idx = blk.mlp.fc2.weight, (slice(None), list(unit.channels))
    saved = weight[idx].clone()
    weight[idx] = 0
    try:
        return _loss(model, pairs)
    finally:
        weight[idx] = saved


def unit_scores(model: nn.Module, units: list[Unit], widths: Widths, criterion: str, calib=None) -> torch.Tensor:
    """One importance score per unit (higher = more important), float64."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown importance {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion == "l1":
        return unit_dot(model, units, widths, fn=lambda w, _: w.abs())
    if criterion == "l2":
        return unit_dot(model, units, widths, fn=lambda w, _: w.square()).sqrt()
    if calib is None:
        raise ValueError(f"importance {criterion!r} needs calibration images: pass calib= (CLI: --data SPEC "
                         "--split train), or use importance l1 / l2")
    pairs = calib_pairs(model, calib)
    if not pairs:
        raise ValueError(f"importance {criterion!r} got no calibration batches")
    was_training = model.training
    model.eval()  # dropout / drop-path off: scores of the model that gets pruned
    try:
        if criterion == "ablation":
            base = _loss(model, pairs)
            return torch.tensor([_ablate(model, u, widths, pairs) - base for u in units], dtype=torch.float64)
        n = sum(len(y) for _, y in pairs)
        first = torch.zeros(len(units), dtype=torch.float64)
        second = torch.zeros(len(units), dtype=torch.float64)
        for x, y in pairs:
            grads = _batch_grads(model, x, y)
            gw = unit_dot(model, units, widths, grads, fn=lambda w, g: w.double() * g.double())
            first += gw * len(y) / n          # g . w_S with g the gradient of the mean loss over all images
            second += gw.square() / len(pairs)
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return first.abs() if criterion == "taylor" else 0.5 * second
