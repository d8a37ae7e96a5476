"""`prune_`: a plain timm ViT pruned in place to a `Prune` plan; and the `prune` technique's handler, which sends a dense
model to its backbone and any other family with a contract adapter to the dependency graph (vitlab.prune.graph)."""
from typing import Any, Callable

import torch.nn as nn

from ..record import record, update_record
from ..contract import has_adapter
from ..techniques import TechniqueNotApplicable, format_technique, register_handler
from .applicable import check_prunable
from .configs import Prune
from .graph import graph_prune_
from .plan import plan
from .structure import keep_channels, keep_indices, model_widths, prune_model_

__all__ = ["prune_"]


def prune_(model: nn.Module, cfg: Prune | None = None, *, calib=None) -> nn.Module:
    """Prune `model` (a timm VisionTransformer) in place to `cfg`'s target (default `Prune()`); return it.

    `calib`: image batches (or (images, labels) pairs) for the taylor / hessian / ablation criteria. The model
    afterwards records `vitlab.arch` of a `vl_pruned_vit` and `vitlab.prune` (the plan's summary).
    """
    cfg = cfg or Prune()
    removed, summary = plan(model, cfg, calib)
    if removed:
        w = model_widths(model)
        keep_blocks, heads, hidden = keep_indices(w, removed)
        stem, embed = keep_channels(w, removed)
        prune_model_(model, keep_blocks, heads, hidden, stem=stem, embed=embed)
    update_record(model, prune=summary)
    return model


# How a dense model is pruned (its backbone alone): vitlab.dense.apply registers `prune_dense_` here when vitlab.dense
# loads, which it has whenever a dense model exists (dense sits above prune).
_DENSE: dict[str, Callable[[nn.Module, Prune, Callable[[nn.Module], Any]], nn.Module]] = {}


def register_dense_prune(prune: Callable[[nn.Module, Prune, Callable[[nn.Module], Any]], nn.Module]) -> None:
    """Prune dense models with `prune(model, cfg, prune_backbone)`."""
    _DENSE["prune"] = prune


@register_handler(Prune)
def _apply_prune(model, cfg: Prune, calib=None):
    if record(model).dense is not None:   # a dense model: its backbone (vitlab.dense.apply)
        return _DENSE["prune"](model, cfg, lambda backbone: _apply_prune(backbone, cfg, calib=calib))
    technique = format_technique(cfg)
    try:
        check_prunable(model, technique)
    except TechniqueNotApplicable as plain_vit:
        if not has_adapter(model):
            raise plain_vit
        return graph_prune_(model, cfg, technique, calib=calib)   # any other family: the dependency graph
    return prune_(model, cfg, calib=calib)
