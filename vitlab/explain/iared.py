"""`vitlab explain CKPT --method iared`: IA-RED²'s interpreter scores as a saliency map (the token-reduction side,
interpreters and REINFORCE, is vitlab.tokens.iared)."""
import torch
import torch.nn as nn

from ..tokens.iared import iared_reductions
from .core import ExplainError, register_method

__all__ = ["iared_saliency"]


@register_method("iared")
def iared_saliency(model: nn.Module, images: torch.Tensor, target: torch.Tensor, **options) -> torch.Tensor:
    """(B, h, w) per patch: the product of its keep probabilities over the groups it reached, 0 once dropped."""
    reductions = iared_reductions(model)
    if not reductions:
        raise ExplainError(f"--method iared reads IA-RED²'s interpreters, and this {type(model).__name__} has none: "
                           "explain a checkpoint trained with --apply iared (vitlab train --init CKPT --apply iared "
                           "--recipe iared)")
    grid = model.token_sequences[0].grid
    if grid is None:
        raise ExplainError(f"--method iared: {type(model).__name__}'s patch tokens form no grid to draw")
    for r in reductions:
        r.mask = True
    try:
        with torch.no_grad():
            model(images)
        score = torch.ones_like(reductions[0].record[0])
        for r in reductions:                                                  # hierarchical: masks keep positions
            probs, keep, alive = r.record
            score = score * torch.where(alive, probs, torch.zeros_like(probs))
    finally:
        for r in reductions:
            r.mask = False
    return score.reshape(len(images), *grid)                                  # (B, n) -> (B, h, w)
