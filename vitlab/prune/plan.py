"""Which units to prune: MACs of a model, ranking costs (MACs, optionally weighted by a conv stem's CPU time per
MAC) and the greedy plan over one global list of units ranked by importance per MAC (or parameter) saved."""
import statistics
import time

import torch
import torch.nn as nn

from ..profiling import count_flops
from ..runner import example_shape
from .configs import Prune, PruneError
from .importance import unit_scores
from .structure import (Unit, Widths, model_widths, remove_unit, stem_layers, stem_macs, units, variable_macs,
                        variable_params)

__all__ = ["model_macs", "stem_time_weights", "plan"]


def model_macs(model: nn.Module) -> int:
    """MACs per image of `model` (counted by vitlab.profiling on one input of the model's size)."""
    was_training = model.training
    model.eval()
    try:
        return count_flops(model, torch.zeros(1, *example_shape(model))).macs
    finally:
        model.train(was_training)


def _rank_cost(w: Widths, u: Unit, measure, stem_weight, by_params: bool) -> float:
    """What removing `u` saves, for ranking: MACs (params), with each stem layer's MACs weighted by `stem_weight`."""
    saved = measure(w) - measure(remove_unit(w, u))
    if by_params or stem_weight == 1.0 or not w.stem:
        return saved
    weights = stem_weight if isinstance(stem_weight, tuple) else (stem_weight,) * len(w.stem)
    if len(weights) != len(w.stem):
        raise PruneError(f"stem_weight has {len(weights)} entries but the stem has {len(w.stem)} layers: give one "
                         "per layer or a single number")
    before, after = stem_macs(w), stem_macs(remove_unit(w, u))
    return saved + sum((b - a) * (k - 1) for b, a, k in zip(before, after, weights))


def stem_time_weights(model: nn.Module, batch: int = 32, rounds: int = 5) -> tuple[float, ...]:
    """CPU time per MAC of each conv-stem layer (conv + norm + activation) relative to the rest of the model.

    A latency-aware ranking cost in the spirit of HALP (Shen et al., NeurIPS 2022), reduced to one linear time model
    per layer: process CPU time at `batch` with the current torch threads, median of `rounds`. MACs are a poor
    proxy for a small stem's time on a CPU: on the Fashion-MNIST reference the first layer (1 -> 24 channels)
    measured 12-15x the blocks' CPU time per MAC, the other two layers about 1x (BENCHMARKS.md, Pruning).
    The result is what `Prune(stem_weight=...)` takes; it varies with load, so record it (prune summaries do).
    """
    layers = stem_layers(model)
    if not layers:
        raise PruneError("stem_time_weights: this model has no conv stem (vitlab's ConvStem)")
    backbone = list(model.patch_embed.backbone)
    x = torch.randn(batch, *example_shape(model))
    starts = [backbone.index(conv) for conv, _ in layers] + [len(backbone)]
    w = model_widths(model)

    def clock(fn) -> float:
        fn()
        times = []
        for _ in range(rounds):
            t0 = time.process_time()  # CPU time: less inflated than wall time on a shared machine
            fn()
            times.append(time.process_time() - t0)
        return statistics.median(times)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            inputs, h = [], x
            for a, b in zip(starts, starts[1:]):
                inputs.append(h)
                h = nn.Sequential(*backbone[a:b])(h)
            per_layer = [clock(lambda a=a, b=b, i=i: nn.Sequential(*backbone[a:b])(i))
                         for a, b, i in zip(starts, starts[1:], inputs)]
            whole = clock(lambda: model(x))
    finally:
        model.train(was_training)
    macs = stem_macs(w)
    rest_time, rest_macs = max(whole - sum(per_layer), 1e-9), max(model_macs(model) - sum(macs), 1)
    return tuple(round((t / m) / (rest_time / rest_macs), 2) for t, m in zip(per_layer, macs))


def plan(model: nn.Module, cfg: Prune, calib=None) -> tuple[list[Unit], dict]:
    """Which units to remove (greedy over one global list by score / cost) and a summary of the result.

    A unit's cost is what removing it saves from the unpruned widths (MACs or parameters); the greedy pass then
    charges each removal at the widths left at that moment, so neighbouring stem layers and the embedding width are
    counted exactly.
    """
    w = model_widths(model)
    by_params = cfg.target_params is not None
    if cfg.stem and not w.stem:
        raise PruneError("stem=true, but this model has no conv stem to prune (vitlab's ConvStem, e.g. "
                         "vl_vit_fmnist): use stem=false")
    all_units = [u for u in units(w, cfg.mlp_group, blocks=cfg.blocks, stem=cfg.stem,
                                  embed_group=cfg.embed_group if cfg.embed else None)
                 if (u.kind == "head" and cfg.heads) or (u.kind == "mlp" and cfg.mlp) or u.kind != "head" and u.kind != "mlp"]
    measure = variable_params if by_params else variable_macs
    total = sum(p.numel() for p in model.parameters()) if by_params else model_macs(model)
    target = (cfg.target_params if by_params else cfg.target_flops) * total
    fixed = total - measure(w)
    summary = {"importance": cfg.importance, "target": "params" if by_params else "macs", "before": total}
    if target >= total:
        return [], {**summary, "after": total, "removed": 0}
    if target < fixed:
        raise PruneError(f"target {target / total:.2f} of {'params' if by_params else 'MACs'} is below what the "
                         f"unprunable parts cost ({fixed / total:.2f}); raise the target")
    scores = unit_scores(model, all_units, w, cfg.importance, calib) if all_units else torch.zeros(0)
    costs = torch.tensor([_rank_cost(w, u, measure, cfg.stem_weight, by_params) for u in all_units],
                         dtype=torch.float64)
    ratio = scores / costs.clamp_min(1)
    groups_left = {i: sum(1 for u in all_units if u.kind == "mlp" and u.block == i) for i in range(len(w.num_heads))}
    removed: list[Unit] = []
    now = w
    current = total
    for k in ratio.argsort().tolist():
        if current <= target:
            break
        u = all_units[k]
        if u.kind in ("head", "mlp", "block") and now.num_heads[u.block] == 0:
            continue  # its block is gone
        if u.kind == "head" and now.num_heads[u.block] <= 1:
            continue
        if u.kind == "mlp":
            if groups_left[u.block] <= 1:
                continue
            groups_left[u.block] -= 1
        if u.kind == "stem" and now.stem_groups[u.block] <= 1:
            continue
        if u.kind == "embed" and now.dim <= len(u.channels):
            continue
        after = remove_unit(now, u)
        value = fixed + measure(after)
        if u.kind == "block":
            if value < target - 0.02 * total:
                continue  # removing the whole block would overshoot the target: finer units come later
            removed = [r for r in removed if r.kind not in ("head", "mlp", "block") or r.block != u.block]
        removed.append(u)
        now, current = after, value
    if current > target * 1.0001:
        raise PruneError(f"cannot reach the target with heads={cfg.heads}, mlp={cfg.mlp}, blocks={cfg.blocks}, "
                         f"stem={cfg.stem}, embed={cfg.embed}: stopped at {current / total:.3f} of the "
                         f"{'params' if by_params else 'MACs'} (every kept block keeps one head and one MLP group, "
                         "every stem layer one group); allow blocks=true or raise the target")
    summary = {**summary, "after": int(current), "removed": len(removed)}
    if cfg.stem:
        summary.update(stem_widths=list(now.stem), stem_weight=cfg.stem_weight)
    if cfg.embed:
        summary["embed_dim"] = now.dim
    return removed, summary
