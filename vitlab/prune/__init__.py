"""Structured pruning of timm ViTs to a FLOPs or parameter target, with reloadable results.

    import vitlab
    from vitlab.prune import Prune
    model = vitlab.create_model("checkpoints/fashion-mnist-reference")
    model = vitlab.prune_(model, Prune(target_flops=0.5, importance="hessian"), calib=batches)
    vitlab.save_checkpoint(model, "runs/pruned")        # reloads with vitlab.create_model("runs/pruned")

NViT (Yang et al., CVPR 2023) ranks every prunable unit of every layer in one global list by Hessian-aware
saliency and removes the least salient until a resource target is met; we do the same with each unit's saliency
divided by the MACs (or parameters) it costs, so the ranking is "importance per MAC saved". Units are attention
heads, groups of `mlp_group` MLP hidden channels (NViT prunes in groups of 8 too: widths a kernel likes) and, with
`blocks=True`, whole blocks. The result is a `vl_pruned_vit` (per-block widths; see vitlab/models/pruned_vit.py).
"""
import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from ..techniques import Kind, TechniqueError, register_handler, register_technique
from .importance import CRITERIA, unit_scores
from .structure import Unit, Widths, block_params, keep_indices, model_widths, prune_model_, units

__all__ = ["Prune", "prune_", "plan", "CRITERIA", "model_macs", "PruneError", "labelled_calibration",
           "prune_checkpoint"]

from .lpvit import LPViT, LPViTError, lpvit_prune_  # noqa: E402  (LPViT block-structured pruning, registered)

__all__ += ["LPViT", "LPViTError", "lpvit_prune_"]


class PruneError(TechniqueError):
    """A pruning request that cannot be met; the message names the value and what to change."""


@register_technique("prune", Kind.STRUCTURE)
@dataclass(frozen=True)
class Prune:
    """Structured pruning (NViT-style global ranking) of heads, MLP channels and blocks to a FLOPs/params target."""
    target_flops: float = 0.5             # fraction of the model's MACs to keep (1.0: nothing removed)
    target_params: float | None = None    # fraction of parameters to keep instead (then target_flops is ignored)
    importance: Literal["l1", "l2", "taylor", "hessian", "ablation"] = "hessian"
    heads: bool = True                    # prune attention heads
    mlp: bool = True                      # prune MLP hidden channels (in groups of mlp_group)
    blocks: bool = False                  # also remove whole blocks
    mlp_group: int = 8

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
        if self.mlp_group < 1:
            raise ValueError(f"mlp_group={self.mlp_group} must be >= 1")
        if not (self.heads or self.mlp or self.blocks):
            raise ValueError("heads, mlp and blocks are all off: nothing to prune")


def model_macs(model: nn.Module) -> int:
    """MACs per image of `model` (counted by vitlab.profiling on one input of the model's size)."""
    from ..profiling import count_flops
    from ..runner import model_input_size

    was_training = model.training
    model.eval()
    try:
        return count_flops(model, torch.zeros(1, *model_input_size(model))).macs
    finally:
        model.train(was_training)


def _cost(w: Widths, u: Unit, by_params: bool, qkv_bias: bool) -> float:
    i = u.block
    if by_params:
        full = block_params(w.dim, w.num_heads[i], w.head_dim[i], w.mlp_hidden[i], qkv_bias)
        if u.kind == "head":
            return full - block_params(w.dim, w.num_heads[i] - 1, w.head_dim[i], w.mlp_hidden[i], qkv_bias)
        if u.kind == "mlp":
            return (2 * w.dim + 1) * len(u.channels)
        return full
    if u.kind == "head":
        return w.macs(i) - w.macs(i, heads=w.num_heads[i] - 1)
    if u.kind == "mlp":
        return 2 * w.tokens * w.dim * len(u.channels)
    return w.macs(i)


def plan(model: nn.Module, cfg: Prune, calib=None) -> tuple[list[Unit], dict]:
    """Which units to remove (greedy over one global list by score / cost) and a summary of the result."""
    w = model_widths(model)
    qkv_bias = model.blocks[0].attn.qkv.bias is not None
    by_params = cfg.target_params is not None
    all_units = [u for u in units(w, cfg.mlp_group, blocks=cfg.blocks)
                 if (u.kind == "head" and cfg.heads) or (u.kind == "mlp" and cfg.mlp) or u.kind == "block"]
    if by_params:
        total = sum(p.numel() for p in model.parameters())
        prunable = sum(block_params(w.dim, h, d, m, qkv_bias) for h, d, m in zip(w.num_heads, w.head_dim, w.mlp_hidden))
        target = cfg.target_params * total
    else:
        total = model_macs(model)
        prunable = sum(w.macs(i) for i in range(len(w.num_heads)))
        target = cfg.target_flops * total
    fixed = total - prunable
    summary = {"importance": cfg.importance, "target": "params" if by_params else "macs", "before": total}
    if target >= total:
        return [], {**summary, "after": total, "removed": 0}
    if target < fixed:
        raise PruneError(f"target {target / total:.2f} of {'params' if by_params else 'MACs'} is below what the "
                         f"unprunable parts cost ({fixed / total:.2f}: stem, embeddings, head); raise the target")
    scores = unit_scores(model, all_units, w, cfg.importance, calib) if all_units else torch.zeros(0)
    costs = torch.tensor([_cost(w, u, by_params, qkv_bias) for u in all_units], dtype=torch.float64)
    ratio = scores / costs.clamp_min(1)
    heads_left = {i: h for i, h in enumerate(w.num_heads)}
    groups_left = {i: sum(1 for u in all_units if u.kind == "mlp" and u.block == i) for i in range(len(w.num_heads))}
    gone_blocks: set[int] = set()
    removed: list[Unit] = []
    current = total
    for k in ratio.argsort().tolist():
        if current <= target:
            break
        u = all_units[k]
        if u.block in gone_blocks:
            continue
        if u.kind == "block":
            block_now = [r for r in removed if r.block == u.block]
            freed = sum(_cost(w, r, by_params, qkv_bias) for r in block_now)
            if current - (costs[k].item() - freed) < target - 0.02 * total:
                continue  # removing the whole block would overshoot the target: finer units come later
            gone_blocks.add(u.block)
            removed = [r for r in removed if r.block != u.block] + [u]
            current -= costs[k].item() - freed
            continue
        if u.kind == "head":
            if heads_left[u.block] <= 1:
                continue
            heads_left[u.block] -= 1
        else:
            if groups_left[u.block] <= 1:
                continue
            groups_left[u.block] -= 1
        removed.append(u)
        current -= costs[k].item()
    if current > target * 1.0001:
        raise PruneError(f"cannot reach the target with heads={cfg.heads}, mlp={cfg.mlp}, blocks={cfg.blocks}: "
                         f"stopped at {current / total:.3f} of the {'params' if by_params else 'MACs'} (every kept "
                         "block keeps one head and one MLP group); allow blocks=true or raise the target")
    return removed, {**summary, "after": int(current), "removed": len(removed)}


def prune_(model: nn.Module, cfg: Prune | None = None, *, calib=None, **kwargs) -> nn.Module:
    """Prune `model` (a timm VisionTransformer) in place to `cfg`'s target; return it.

    `calib`: image batches (or (images, labels) pairs) for the taylor / hessian / ablation criteria. `kwargs`
    override `cfg`'s fields (``prune_(model, target_flops=0.5, importance="l1")``). The model afterwards records
    `vitlab_arch` of a `vl_pruned_vit` and `vitlab_prune` (the plan's summary).
    """
    cfg = dataclasses.replace(cfg or Prune(), **kwargs)
    removed, summary = plan(model, cfg, calib)
    if removed:
        keep_blocks, heads, hidden = keep_indices(model_widths(model), removed)
        prune_model_(model, keep_blocks, heads, hidden)
    model.vitlab_prune = summary
    return model


@register_handler(Prune)
def _apply_prune(model, cfg: Prune, calib=None):
    return prune_(model, cfg, calib=calib)


def labelled_calibration(model: nn.Module, data: str, split: str = "train", num_images: int = 512, *,
                         batch_size: int = 64, seed: int = 0, data_dir: str | None = None) -> list:
    """(images, labels) batches: a seeded random subset of `data`/`split`, preprocessed for `model`.

    The test split is refused: scores computed on it would leak into the reported accuracy.
    """
    from ..checkpoint import default_preprocessing
    from ..data import build_dataset

    if split == "test":
        raise PruneError("pruning on the test split is refused (it would leak into the reported accuracy): "
                         "use --split train (default) or val")
    if num_images < 1:
        raise PruneError(f"--calib-images must be >= 1, got {num_images}")
    pre = getattr(model, "vitlab_checkpoint", {}).get("config", {}).get("preprocessing") or default_preprocessing(model)
    c, h, w = pre["input_size"]
    dataset = build_dataset(data, split, img_size=(h, w), in_chans=c, mean=pre["mean"], std=pre["std"],
                            data_dir=data_dir)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images].tolist()
    images = torch.stack([dataset[i][0] for i in order])
    labels = torch.tensor([int(dataset[i][1]) for i in order])
    return list(zip(images.split(batch_size), labels.split(batch_size)))


def prune_checkpoint(source: str, out: str, cfg: Prune, *, data: str | None = None, split: str = "train",
                     num_images: int = 512, data_dir: str | None = None) -> tuple[nn.Module, dict]:
    """Load `source` (checkpoint folder or model name), prune it, save it to `out`; return (model, summary)."""
    from ..checkpoint import create_model, save_checkpoint

    model = create_model(source)
    calib = None
    if cfg.importance not in ("l1", "l2"):
        if data is None:
            raise PruneError(f"importance {cfg.importance} needs images: give --data SPEC (with --split train), "
                             "or use --importance l1 / l2")
        calib = labelled_calibration(model, data, split, num_images, data_dir=data_dir)
    config = getattr(model, "vitlab_checkpoint", {}).get("config", {})
    from ..techniques import apply_

    model = apply_(model, [cfg], calib=calib)
    summary = dict(model.vitlab_prune, source=str(source), data=data, split=split, calib_images=num_images)
    save_checkpoint(model, out, preprocessing=config.get("preprocessing"),
                    data={"spec": data, "split": split} if data else None,
                    metrics={"macs": model_macs(model), "params": sum(p.numel() for p in model.parameters())},
                    training={"pruned": summary})
    return model, summary
