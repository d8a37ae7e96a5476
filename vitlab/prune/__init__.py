"""Structured pruning of timm ViTs to a FLOPs or parameter target, with reloadable results.

    import vitlab
    from vitlab.prune import Prune
    model = vitlab.create_model("checkpoints/fashion-mnist-reference")
    model = vitlab.prune_(model, Prune(target_flops=0.5, importance="hessian"), calib=batches)
    vitlab.save_checkpoint(model, "runs/pruned")        # reloads with vitlab.create_model("runs/pruned")

NViT (Yang et al., CVPR 2023) ranks every prunable unit of every layer in one global list by Hessian-aware
saliency and removes the least salient until a resource target is met; we do the same with each unit's saliency
divided by the MACs (or parameters) it costs, so the ranking is "importance per MAC saved". Units are attention
heads, groups of `mlp_group` MLP hidden channels (NViT prunes in groups of 8 too: widths a kernel likes), with
`blocks=True` whole blocks, with `stem=True` whole GroupNorm groups of a conv stem's layers (vl_vit_fmnist: its stem
is 22 % of the MACs but ~44 % of the CPU time), and with `embed=True` groups of `embed_group` embedding channels.
Costs are recomputed from the widths left after each removal (stem and embedding units interact with their
neighbours), so the target is met on the analytic count, which equals count_flops (tests). The result is a
`vl_pruned_vit` (per-block widths; see vitlab/models/pruned_vit.py).
"""
import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from ..techniques import Kind, TechniqueError, TechniqueNotApplicable, register_handler, register_technique
from .importance import CRITERIA, unit_scores
from .structure import (Unit, Widths, keep_channels, keep_indices, model_widths, prune_model_, remove_unit,
                        stem_layers, stem_macs, units, variable_macs, variable_params)

__all__ = ["Prune", "prune_", "plan", "CRITERIA", "model_macs", "PruneError", "labelled_calibration",
           "prune_checkpoint", "stem_time_weights"]

from .lpvit import LPViT, LPViTError, lpvit_prune_  # noqa: E402  (LPViT block-structured pruning, registered)

__all__ += ["LPViT", "LPViTError", "lpvit_prune_"]


class PruneError(TechniqueError):
    """A pruning request that cannot be met; the message names the value and what to change."""


@register_technique("prune", Kind.STRUCTURE)
@dataclass(frozen=True)
class Prune:
    """Structured pruning (NViT-style global ranking) of heads, MLP channels, blocks, conv-stem groups and embedding
    channels to a FLOPs/params target."""
    target_flops: float = 0.5             # fraction of the model's MACs to keep (1.0: nothing removed)
    target_params: float | None = None    # fraction of parameters to keep instead (then target_flops is ignored)
    importance: Literal["l1", "l2", "taylor", "hessian", "ablation"] = "hessian"
    heads: bool = True                    # prune attention heads
    mlp: bool = True                      # prune MLP hidden channels (in groups of mlp_group)
    blocks: bool = False                  # also remove whole blocks
    mlp_group: int = 8
    stem: bool = False                    # also prune conv-stem channels (whole GroupNorm groups; vl_vit_fmnist)
    embed: bool = False                   # also prune embedding (residual) channels, in groups of embed_group
    embed_group: int = 8
    stem_weight: float | tuple = 1.0      # ranking cost of a stem layer's MAC relative to the rest's (one per layer,
    #                                       or one for all): their CPU time per MAC; `stem_time_weights` measures it

    @property
    def needs_calibration(self) -> bool:
        """taylor / hessian / ablation score units on images (`calib=`); l1 / l2 need none."""
        return self.importance not in ("l1", "l2")

    def __post_init__(self):
        for name in ("target_flops", "target_params"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name}={value} must be in (0, 1]: the fraction to keep (0.5 = half)")
        if self.importance not in CRITERIA:
            raise ValueError(f"importance={self.importance!r}; choose one of {', '.join(CRITERIA)}")
        weights = self.stem_weight if isinstance(self.stem_weight, (tuple, list)) else (self.stem_weight,)
        if not weights or not all(isinstance(v, (int, float)) and v > 0 for v in weights):
            raise ValueError(f"stem_weight={self.stem_weight} must be > 0, one number or one per stem layer (1 = rank "
                             "stem units by MACs like the rest; CLI --stem-weight auto measures them)")
        if isinstance(self.stem_weight, list):
            object.__setattr__(self, "stem_weight", tuple(self.stem_weight))
        if self.mlp_group < 1 or self.embed_group < 1:
            raise ValueError(f"mlp_group={self.mlp_group} and embed_group={self.embed_group} must be >= 1")
        if not (self.heads or self.mlp or self.blocks or self.stem or self.embed):
            raise ValueError("heads, mlp, blocks, stem and embed are all off: nothing to prune")


def model_macs(model: nn.Module) -> int:
    """MACs per image of `model` (counted by vitlab.profiling on one input of the model's size)."""
    from ..profiling import count_flops
    from ..runner import example_shape

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
    import statistics
    import time

    from ..runner import example_shape

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


def prune_(model: nn.Module, cfg: Prune | None = None, *, calib=None, **kwargs) -> nn.Module:
    """Prune `model` (a timm VisionTransformer) in place to `cfg`'s target; return it.

    `calib`: image batches (or (images, labels) pairs) for the taylor / hessian / ablation criteria. `kwargs`
    override `cfg`'s fields (``prune_(model, target_flops=0.5, importance="l1")``). The model afterwards records
    `vitlab_arch` of a `vl_pruned_vit` and `vitlab_prune` (the plan's summary).
    """
    cfg = dataclasses.replace(cfg or Prune(), **kwargs)
    removed, summary = plan(model, cfg, calib)
    if removed:
        w = model_widths(model)
        keep_blocks, heads, hidden = keep_indices(w, removed)
        stem, embed = keep_channels(w, removed)
        prune_model_(model, keep_blocks, heads, hidden, stem=stem, embed=embed)
    model.vitlab_prune = summary
    return model


@register_handler(Prune)
def _apply_prune(model, cfg: Prune, calib=None):
    from ..techniques import format_technique

    if getattr(model, "vitlab_dense", None) is not None:   # a dense model: its backbone (vitlab.dense.apply)
        from ..dense.apply import prune_dense_

        return prune_dense_(model, cfg, lambda backbone: _apply_prune(backbone, cfg, calib=calib))
    from .applicable import check_prunable

    technique = format_technique(cfg)
    try:
        check_prunable(model, technique)
    except TechniqueNotApplicable as plain_vit:
        from ..contract import has_adapter
        from .graph import graph_prune_

        if not has_adapter(model):
            raise plain_vit
        return graph_prune_(model, cfg, technique, calib=calib)   # any other family: the dependency graph
    return prune_(model, cfg, calib=calib)


def labelled_calibration(model: nn.Module, data: str, split: str = "train", num_images: int = 512, *,
                         batch_size: int = 64, seed: int = 0, data_dir: str | None = None) -> list:
    """(images, labels) batches: a seeded random subset of `data`/`split`, preprocessed for `model`.

    The test split is refused: scores computed on it would leak into the reported accuracy.
    """
    from ..data.transforms import dataset_for_model

    if split == "test":
        raise PruneError("pruning on the test split is refused (it would leak into the reported accuracy): "
                         "use --split train (default) or val")
    if num_images < 1:
        raise PruneError(f"--calib-images must be >= 1, got {num_images}")
    # the preprocessing every verb uses, and the model's classes checked against the data's (labels score here)
    dataset = dataset_for_model(model, data, split, data_dir=data_dir)
    get = getattr(dataset, "get_or_skip", dataset.__getitem__)
    picked = []
    for i in torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist():
        item = get(i)
        if isinstance(item, tuple):   # else a Skipped record: an undecodable file, left out
            picked.append(item)
            if len(picked) == num_images:
                break
    if not picked:
        raise PruneError(f"none of the images of {data} [{split}] can be decoded: check the files")
    images = torch.stack([x for x, _ in picked])
    labels = torch.tensor([int(y) for _, y in picked])
    return list(zip(images.split(batch_size), labels.split(batch_size)))


def prune_checkpoint(source: str, out: str, cfg, *, data: str | None = None, split: str = "train",
                     num_images: int = 512, data_dir: str | None = None) -> tuple[nn.Module, dict]:
    """Load `source` (checkpoint folder or model name), prune it with `cfg` (`Prune`, `LPViT` or another pruning
    technique), save it to `out`; return (model, summary).

    `out` is locked for the whole run (a second process gets `FolderLocked`) and checked writable before any work.
    The checkpoint is written into a staging folder inside `out` and moved in as a whole (vitlab/utils/lock.py), so a
    killed prune leaves no half-written checkpoint: `out` holds the old one or the new one, and a rerun succeeds."""
    from pathlib import Path

    from ..checkpoint import create_model, save_checkpoint
    from ..techniques import format_technique
    from ..utils.lock import abandon_staged, commit_staged, kill_point, lock_folder, staging_folder

    out_dir = Path(out)
    if Path(source).exists() and Path(source).resolve() == out_dir.resolve():
        raise PruneError(f"--out {out} is the checkpoint being pruned: choose another folder")
    with lock_folder(out_dir, "vitlab prune"):
        run = [name for name in ("train_state.pt", "metrics.jsonl") if (out_dir / name).exists()]
        if run:
            raise PruneError(f"--out {out} holds a training run ({', '.join(run)}): a pruned checkpoint there would "
                             "mix with it; choose another --out")
        model = create_model(source)
        calib = None
        if getattr(cfg, "needs_calibration", False):
            if data is None:
                hint = ", or use --importance l1 / l2" if isinstance(cfg, Prune) else ""
                raise PruneError(f"{format_technique(cfg)} scores with images: give --data SPEC (with --split train)"
                                 f"{hint}")
            calib = labelled_calibration(model, data, split, num_images, data_dir=data_dir)
        config = getattr(model, "vitlab_checkpoint", {}).get("config", {})
        from ..techniques import apply_

        model = apply_(model, [cfg], calib=calib)
        summary = dict(getattr(model, "vitlab_prune", {}), technique=format_technique(cfg), source=str(source),
                       data=data, split=split, calib_images=num_images)
        staging = staging_folder(out_dir)
        try:
            save_checkpoint(model, staging, preprocessing=config.get("preprocessing"),
                            data={"spec": data, "split": split} if data else None,
                            metrics={"macs": model_macs(model), "params": sum(p.numel() for p in model.parameters())},
                            training={"pruned": summary})
            kill_point("prune-staged")
            commit_staged(out_dir, staging)
        finally:
            abandon_staged(out_dir, staging)
    return model, summary
