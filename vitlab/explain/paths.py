"""A ViT as an explicit ensemble of paths (Chang et al., ICCV 2023, "Revisiting Vision Transformer from the View of
Path Ensemble"): per-path analysis, path pruning and EnsembleScale.

A pre-norm block computes x + a(x) and then + f(x + a(x)), so the last block's output is exactly a sum of
paths, x_L = x_0 + sum_l (a_l + f_l): the embedding (length 0) and each block's attention (length 2l-1) and MLP
(length 2l) branch outputs, each of which also feeds every longer path through the residual stream. Pooling (class
token, or the mean of the patch tokens) is linear, so the pooled feature is the sum of the pooled paths, and

    logits = head(fc_norm(norm(sum_p w_p * y_p)))           (w = 1: the unchanged model, tested exactly)

The paper's two functions of a path (feeding the classifier directly / feeding longer paths) separate here: a weight
w_p only changes what path p gives the classifier; every path still feeds the longer ones. `path_report` measures
each path alone and left out; `prune_paths` removes, greedily on held-out images, the direct contributions whose
removal lowers the loss (the paper's path pruning of paths that "pull down the performance"); `ensemble_scale`
learns w (the paper's EnsembleScale) on cached path features with everything else frozen. The paper's long-to-short
self-distillation (a training recipe) is not implemented.

No official code was found; the decomposition is exact (tests/test_paths.py), the selection rules are this module's.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from ..errors import TechniqueNotApplicable

__all__ = ["path_names", "path_features", "ensemble_logits", "path_report", "prune_paths", "ensemble_scale"]

SUPPORTED = "timm VisionTransformers of pre-norm Blocks (ls1/ls2 branches) with global_pool 'token' or 'avg'"


def _check(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TechniqueNotApplicable("paths", model, f"it is not a timm VisionTransformer; paths supports {SUPPORTED}")
    if model.global_pool not in ("token", "avg") or getattr(model, "attn_pool", None) is not None:
        raise TechniqueNotApplicable("paths", model, f"global_pool={model.global_pool!r}; paths supports {SUPPORTED}")
    if any(type(b) is not Block for b in model.blocks):
        raise TechniqueNotApplicable("paths", model, f"its blocks are not timm Blocks; paths supports {SUPPORTED}")


def path_names(model: nn.Module) -> list[str]:
    """["embed", "attn1", "mlp1", ..., "attnL", "mlpL"]: path p has length p (sublayers it passes through)."""
    return ["embed"] + [f"{kind}{i + 1}" for i in range(len(model.blocks)) for kind in ("attn", "mlp")]


def _pool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, D): the class token, or the mean of the non-prefix tokens (both linear)."""
    return x[:, 0] if model.global_pool == "token" else x[:, model.num_prefix_tokens:].mean(1)


@torch.no_grad()
def path_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled path outputs (B, 1 + 2L, D) in `path_names` order; their sum is the pooled last-block output."""
    _check(model)
    captured: list[torch.Tensor] = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, args: captured.append(_pool(model, args[0])))]
    for blk in model.blocks:    # ls1 / ls2 see each branch's output (LayerScale or Identity), before the add
        hooks += [blk.ls1.register_forward_hook(lambda m, i, out: captured.append(_pool(model, out))),
                  blk.ls2.register_forward_hook(lambda m, i, out: captured.append(_pool(model, out)))]
    was_training = model.training
    model.eval()          # drop-path off: the branch outputs are added unchanged
    try:
        model.forward_features(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return torch.stack(captured, dim=1)


def ensemble_logits(model: nn.Module, paths: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """head(fc_norm(norm(sum_p w_p y_p))) for path features (B, P, D) and weights (P,) (None: all 1)."""
    x = paths.sum(1) if weights is None else torch.einsum("bpd,p->bd", paths, weights)
    return model.head(model.fc_norm(model.norm(x)))


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def path_report(model: nn.Module, paths: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Per path: top-1 of that path alone, of all paths but it, and of the paths up to it (the shallow ensemble)."""
    rows = []
    ones = torch.ones(paths.shape[1])
    for p, name in enumerate(path_names(model)):
        alone, without, upto = torch.zeros_like(ones), ones.clone(), torch.zeros_like(ones)
        alone[p], without[p], upto[:p + 1] = 1, 0, 1
        rows.append({"path": name, "length": p,
                     "alone": _top1(ensemble_logits(model, paths, alone), labels),
                     "without": _top1(ensemble_logits(model, paths, without), labels),
                     "up_to": _top1(ensemble_logits(model, paths, upto), labels)})
    return rows


@torch.no_grad()
def prune_paths(model: nn.Module, paths: torch.Tensor, labels: torch.Tensor, max_pruned: int | None = None
                ) -> torch.Tensor:
    """0/1 weights: repeatedly drop the path whose removal lowers the cross-entropy on (paths, labels) the most,
    while one does (held-out images: the choice is fitted to them)."""
    weights = torch.ones(paths.shape[1])
    loss = F.cross_entropy(ensemble_logits(model, paths, weights), labels)
    for _ in range(paths.shape[1] - 1 if max_pruned is None else max_pruned):
        trials = []
        for p in weights.nonzero().flatten().tolist():
            w = weights.clone()
            w[p] = 0
            trials.append((float(F.cross_entropy(ensemble_logits(model, paths, w), labels)), p))
        best, p = min(trials)
        if best >= float(loss):
            break
        weights[p], loss = 0, torch.tensor(best)
    return weights


def ensemble_scale(model: nn.Module, paths: torch.Tensor, labels: torch.Tensor, *, steps: int = 300,
                   batch_size: int = 256, lr: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """EnsembleScale: one learnable weight per path (from 1), AdamW with cosine decay on cached path features; the
    model stays frozen. Returns the weights (P,)."""
    generator = torch.Generator().manual_seed(seed)
    weights = nn.Parameter(torch.ones(paths.shape[1]))
    optimizer = torch.optim.AdamW([weights], lr=lr, weight_decay=0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            index = torch.randint(len(labels), (batch_size,), generator=generator)
            loss = F.cross_entropy(ensemble_logits(model, paths[index], weights), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return weights.detach()
