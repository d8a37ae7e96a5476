"""T-TAME (Ntrougkas et al., 2024): a trainable attention mechanism that explains a frozen CNN or ViT.

Reference implementation: github.com/IDT-ITI/T-TAME (`src/tame/attention/tame.py` `AttentionTAME`,
`src/tame/attention/arrangement.py` `Arrangement.classic_loss` / `new_train_policy`, `src/tame/metrics.py` AD/IC).

    explainer = train_tame(model, dataset)             # the backbone stays frozen; only the mechanism learns
    save_tame(explainer, "/tmp/tame/explainer.safetensors")
    vitlab.explain(model, images, method="tame", tame="/tmp/tame/explainer.safetensors")

Feature maps are tapped at the outputs of the last block of each of the last `num_layers` stages (a single-stage
ViT: its last `num_layers` blocks), chosen from the model contract (`vitlab.contract.describe`), and brought to
(B, C, h, w): a sequence's prefix tokens dropped and its patch tokens laid on their grid (merged tokens of a
token-reduced model copied back to every patch they stand for), NHWC permuted. Each map is normalised over its
channels (no affine: the official ViT setup taps the blocks' LayerNorm outputs). The mechanism: per map a 1x1 conv,
BatchNorm, skip connection and ReLU; bilinear to the largest map's size (at most 56); concatenation; a 1x1 fusion
conv to one channel per class; sigmoid. Training masks the image with the explained class's map and asks the
frozen backbone for the class it predicted on the clean image (the paper's loss: 1.5 CE + 2 area + 0.01 variation).
By default the raw pixels are masked, as AD/IC measure (the official "renormalize" policy; its default "new" masks
the preprocessed image, which on Fashion-MNIST turns a masked black background grey: AD 7.9 % instead of 2.4 %).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import create_model
from ..contract import NoAdapter, describe
from ..data.transforms import dataset_for_model, resolve_preprocessing
from ..record import record
from ..tokens.patch import TokenReducingModel
from .core import ExplainError, normalize_maps, register_method
from .faithfulness import average_drop_increase, pixel_baseline

__all__ = ["TameConfig", "TameAttention", "TameExplainer", "tame_layers", "area_loss", "variation_loss",
           "tame_loss", "tame_step_loss", "train_tame", "save_tame", "load_tame",
           "tame_ad_ic", "train_tame_checkpoint"]

# the paper's loss weights and area exponent (official code: ce_coeff, area_loss_coeff, smoothness_loss_coeff,
# area_loss_power) and the variation loss' border penalty
CE_WEIGHT, AREA_WEIGHT, VARIATION_WEIGHT, AREA_POWER, BORDER_PENALTY = 1.5, 2.0, 0.01, 0.3, 0.3
MAX_MAP_SIZE = 56          # the official mechanism fuses at the first map's size, capped at 56


@dataclass(frozen=True)
class TameConfig:
    """What an explainer was built for: the tapped blocks (qualified names), their layouts, prefix tokens and
    channels, the fused map size, the number of classes, and the backbone it was trained on (for messages)."""

    layers: tuple[str, ...]
    layouts: tuple[str, ...]
    prefix_tokens: tuple[int, ...]
    channels: tuple[int, ...]
    map_size: tuple[int, int]
    num_classes: int
    backbone: str = ""


class TameAttention(nn.Module):
    """The official `AttentionTAME`: feature maps [(B, C_i, h_i, w_i)] -> (sigmoid maps, logits), each
    (B, num_classes, *size)."""

    def __init__(self, channels: Sequence[int], num_classes: int, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, kernel_size=1) for c in channels)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in channels)
        self.fuser = nn.Conv2d(sum(channels), num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        maps = [F.relu(bn(conv(f)) + f) for conv, bn, f in zip(self.convs, self.bns, features)]
        maps = [F.interpolate(m, size=self.size, mode="bilinear", align_corners=False) for m in maps]
        logits = self.fuser(torch.cat(maps, 1))                  # (B, num_classes, h, w)
        return logits.sigmoid(), logits


def tame_layers(model: nn.Module, num_layers: int = 3) -> list[tuple[str, str, int]]:
    """(qualified block name, layout, prefix tokens) of the blocks T-TAME taps: the last block of each of the last
    `num_layers` stages, topped up from the last stage's last blocks when the model has fewer stages."""
    try:
        spec = describe(model, "T-TAME")
    except NoAdapter as e:
        raise ExplainError(f"{e}; T-TAME taps blocks the model contract names: use --method gradcam instead") from None
    stages = [s for s in spec.stages if s.blocks]
    chosen = [s.blocks[-1] for s in stages[-num_layers:]]
    extra = [b for b in reversed(stages[-1].blocks[:-1])][:num_layers - len(chosen)]
    blocks = sorted(chosen + extra, key=lambda b: [x.name for x in spec.blocks].index(b.name))
    return [(b.name, b.layout, b.num_prefix_tokens) for b in blocks]


def _grid(num_patches: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (gh, gw) patch grid with the image's aspect ratio holding `num_patches` tokens."""
    H, W = image_hw
    gh = max(1, round(math.sqrt(num_patches * H / W)))
    gw = num_patches // gh
    if gh * gw != num_patches:
        raise ExplainError(f"T-TAME cannot lay {num_patches} tokens on a grid of the image's aspect ratio {H}x{W}; "
                           "use --method rollout or gradcam for this model")
    return gh, gw


@contextlib.contextmanager
def _tapped(model: nn.Module, layers: Sequence[tuple[str, str, int]], image_hw: tuple[int, int]
            ) -> Iterator[list[torch.Tensor]]:
    """Forward hooks on the tapped blocks; yields the list that each forward fills with (B, C, h, w) maps, in
    `layers` order. A token-reduced model's merged tokens are copied back to the patches they stand for."""
    modules = dict(model.named_modules())
    missing = [name for name, _, _ in layers if name not in modules]
    if missing:
        raise ExplainError(f"T-TAME: {type(model).__name__} has no block {', '.join(missing)} that the explainer "
                           "taps; train one for this model with `vitlab train-tame MODEL --data ... --out DIR`")
    state = model.token_state if isinstance(model, TokenReducingModel) else None
    out: list[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]

    def hook(index: int, layout: str, prefix: int):
        def fn(module, inputs, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            if layout == "sequence":
                if state is not None and state.source is not None and state.source.shape[1] == x.shape[1]:
                    x = state.source.transpose(1, 2).to(x.dtype) @ x   # (B, N0, N) @ (B, N, C) -> (B, N0, C)
                B, N, C = x.shape
                gh, gw = _grid(N - prefix, image_hw)
                x = x[:, prefix:].transpose(1, 2).reshape(B, C, gh, gw)   # (B, N, C) -> (B, C, gh, gw)
            elif layout == "nhwc":
                x = x.permute(0, 3, 1, 2)                                  # (B, h, w, C) -> (B, C, h, w)
            out[index] = F.layer_norm(x.transpose(1, -1), x.shape[1:2]).transpose(1, -1)   # over channels
        return fn

    handles = [modules[name].register_forward_hook(hook(i, layout, prefix))
               for i, (name, layout, prefix) in enumerate(layers)]
    previous = state.trace_source if state is not None else None
    if state is not None:
        state.trace_source = True
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        if state is not None:
            state.trace_source = previous


class TameExplainer(nn.Module):
    """A T-TAME attention mechanism with the recipe for tapping its backbone (`config`)."""

    def __init__(self, config: TameConfig):
        super().__init__()
        self.config = config
        self.attention = TameAttention(config.channels, config.num_classes, config.map_size)

    @classmethod
    def for_model(cls, model: nn.Module, image_shape: tuple[int, int, int], num_layers: int = 3) -> "TameExplainer":
        """An untrained explainer for `model` taking (C, H, W) images: one dry run finds the maps' channels/sizes."""
        layers = tame_layers(model, num_layers)
        with torch.no_grad(), _tapped(model, layers, image_shape[1:]) as features:
            was_training = model.training
            logits = model.eval()(torch.zeros(1, *image_shape))
            model.train(was_training)
        h = min(MAX_MAP_SIZE, max(f.shape[2] for f in features))
        w = min(MAX_MAP_SIZE, max(f.shape[3] for f in features))
        spec = record(model).spec or {}
        return cls(TameConfig(tuple(n for n, _, _ in layers), tuple(lay for _, lay, _ in layers),
                              tuple(p for _, _, p in layers), tuple(f.shape[1] for f in features), (h, w),
                              logits.shape[-1], spec.get("name", type(model).__name__)))

    def forward(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(backbone logits (B, K), sigmoid maps (B, K, h, w), map logits (B, K, h, w)) for images (B, C, H, W);
        the backbone runs without gradients."""
        layers = list(zip(self.config.layers, self.config.layouts, self.config.prefix_tokens))
        with torch.no_grad(), _tapped(model, layers, tuple(images.shape[-2:])) as features:
            logits = model(images)
        if any(f is None for f in features):
            skipped = [name for name, f in zip(self.config.layers, features) if f is None]
            raise ExplainError(f"T-TAME: {type(model).__name__} did not run the tapped block(s) {', '.join(skipped)}; "
                               "train an explainer for this model with `vitlab train-tame MODEL --data ... --out DIR`")
        got = tuple(f.shape[1] for f in features)
        if got != self.config.channels or logits.shape[-1] != self.config.num_classes:
            raise ExplainError(f"T-TAME: this explainer was trained on {self.config.backbone} (channels "
                               f"{self.config.channels}, {self.config.num_classes} classes); {type(model).__name__} "
                               f"gives channels {got}, {logits.shape[-1]} classes; train one for this model with "
                               "`vitlab train-tame MODEL --data ... --out DIR`")
        maps, map_logits = self.attention(features)
        return logits, maps, map_logits


# ----------------------------------------------------------------------------------------------- the loss

def area_loss(masks: torch.Tensor, power: float = AREA_POWER) -> torch.Tensor:
    """mean((m + 0.0005) ** power) over every element (the offset keeps the gradient finite at 0)."""
    return ((masks + 0.0005) ** power).mean()


def variation_loss(masks: torch.Tensor, power: float = 2.0, border: float = BORDER_PENALTY) -> torch.Tensor:
    """(sum |m[y+1, x] - m[y, x]|^p + sum |m[y, x+1] - m[y, x]|^p + border * sum of the four edges' m^p)
    / (p * B) for masks (B, K, h, w) (the official `smoothness_loss`: summed over maps, divided by the batch)."""
    dy = (masks[:, :, 1:, :] - masks[:, :, :-1, :]).abs().pow(power).sum()
    dx = (masks[:, :, :, 1:] - masks[:, :, :, :-1]).abs().pow(power).sum()
    edges = (masks[:, :, -1, :].pow(power).sum() + masks[:, :, 0, :].pow(power).sum()
             + masks[:, :, :, -1].pow(power).sum() + masks[:, :, :, 0].pow(power).sum())
    return (dy + dx + border * edges) / (power * masks.shape[0])


def tame_loss(masked_logits: torch.Tensor, target: torch.Tensor, masks: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, weighted CE, weighted area, weighted variation): CE of the backbone on the masked images
    (B, K) against `target` (B,), area and variation of `masks` (B, M, h, w) with the paper's weights."""
    ce = CE_WEIGHT * F.cross_entropy(masked_logits, target)
    area = AREA_WEIGHT * area_loss(masks)
    variation = VARIATION_WEIGHT * variation_loss(masks)
    return ce + area + variation, ce, area, variation


def _masked_forward(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                    pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None) -> torch.Tensor:
    """Backbone logits on images (B, C, H, W) masked by each image's `target` map, bilinear to the image: the
    preprocessed image times the map (official "new" train policy), or with `pixel_stats` = (mean, std) the raw
    pixels times the map, preprocessed again (official "renormalize" policy; what AD/IC measure)."""
    mask = maps[torch.arange(len(images)), target][:, None]                 # (B, 1, h, w)
    mask = F.interpolate(mask, size=images.shape[-2:], mode="bilinear", align_corners=False)
    if pixel_stats is None:
        return model(images * mask)
    mean = torch.tensor(pixel_stats[0], dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(pixel_stats[1], dtype=images.dtype).view(1, -1, 1, 1)
    return model(((images * std + mean) * mask - mean) / std)


def tame_step_loss(explainer: TameExplainer, model: nn.Module, images: torch.Tensor,
                   pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tame_loss` on images (B, C, H, W), the target being the backbone's top-1: CE of the backbone on each image
    masked by its target's map; area and variation on every image's maps for all the batch's targets (B, B, h, w),
    as the official training (masking "random"); `pixel_stats`: see `_masked_forward`."""
    logits, maps, _ = explainer(model, images)
    target = logits.argmax(-1)
    return tame_loss(_masked_forward(model, images, maps, target, pixel_stats), target, maps[:, target])


def train_tame(model: nn.Module, data: torch.utils.data.Dataset, *, epochs: float = 1.0, batch_size: int = 32,
               lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 5e-4, num_layers: int = 3,
               max_steps: int | None = None, seed: int = 0, explainer: TameExplainer | None = None,
               mask: str = "pixels", progress: bool = True) -> TameExplainer:
    """Train a T-TAME explainer (a new one, or `explainer` further) on the frozen `model` with (image, label)
    `data` (labels unused: the target is the backbone's own top-1) with `tame_step_loss`: SGD (momentum 0.9,
    weight decay 5e-4) with a one-cycle schedule peaking at `lr`, as the official code. `mask`: "pixels" masks the
    raw pixels (the model's preprocessing undone and redone: what AD/IC measure; official "renormalize" policy),
    "input" the preprocessed image (official default "new"); see `_masked_forward`."""
    if mask not in ("pixels", "input"):
        raise ExplainError(f"T-TAME masks 'pixels' or 'input' (the preprocessed image), not {mask!r}")
    pre = resolve_preprocessing(model)
    pixel_stats = (pre.mean, pre.std) if mask == "pixels" else None
    torch.manual_seed(seed)
    model.eval().requires_grad_(False)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
    total = max(1, int(epochs * len(loader))) if max_steps is None else max_steps
    if explainer is None:
        explainer = TameExplainer.for_model(model, tuple(data[0][0].shape), num_layers)
    optimizer = torch.optim.SGD(explainer.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total)
    bar = _Bar(progress, total)
    explainer.train()
    step, start = 0, time.perf_counter()
    while step < total:
        for images, _ in loader:
            loss, ce, area, variation = tame_step_loss(explainer, model, images, pixel_stats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(step, loss.item(), ce.item(), area.item(), variation.item(),
                       step * batch_size / (time.perf_counter() - start))
            if step == total:
                break
    bar.close()
    return explainer.eval()


class _Bar:
    """rich progress bar with the loss terms and images/s; a plain line every 50 steps when not on a terminal."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.bar = Progress(TextColumn("T-TAME"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.3f} (ce {task.fields[ce]:.3f} area "
                                       "{task.fields[area]:.3f} var {task.fields[var]:.3f}) "
                                       "{task.fields[ips]:.0f} img/s"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
        self.task = self.bar.add_task("tame", total=total, loss=math.nan, ce=math.nan, area=math.nan, var=math.nan,
                                      ips=0.0)
        if self.live:
            self.bar.start()

    def update(self, step: int, loss: float, ce: float, area: float, var: float, ips: float) -> None:
        if not self.enabled:
            return
        if self.live:
            self.bar.update(self.task, completed=step, loss=loss, ce=ce, area=area, var=var, ips=ips)
        elif step % 50 == 0 or step == self.total:
            self.console.print(f"T-TAME step {step}/{self.total} loss {loss:.3f} (ce {ce:.3f} area {area:.3f} "
                               f"var {var:.3f}) {ips:.0f} img/s", highlight=False)

    def close(self) -> None:
        if self.enabled and self.live:
            self.bar.stop()


# ----------------------------------------------------------------------------------------------- files

def save_tame(explainer: TameExplainer, path: str | Path) -> Path:
    """Write the explainer's weights and config to one safetensors file (config as JSON metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in explainer.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "vitlab-tame", "config": json.dumps(asdict(explainer.config))})
    return path


def load_tame(path: str | Path) -> TameExplainer:
    """The explainer `save_tame` wrote (a file, or a folder holding explainer.safetensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / "explainer.safetensors"
    if not path.is_file():
        raise ExplainError(f"T-TAME: no trained explainer at {path}; train one with `vitlab train-tame MODEL "
                           "--data fashion-mnist --out DIR` and pass tame=DIR")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "vitlab-tame":
        raise ExplainError(f"T-TAME: {path} is not a T-TAME explainer written by vitlab.explain.tame.save_tame")
    raw = json.loads(meta["config"])
    config = TameConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    explainer = TameExplainer(config)
    explainer.load_state_dict(load_file(str(path)))
    return explainer.eval()


# ----------------------------------------------------------------------------------------------- use

@register_method("tame")
def tame_saliency(model: nn.Module, images: torch.Tensor, target: torch.Tensor, tame: str | Path | None = None,
                  **options) -> tuple[torch.Tensor, dict]:
    """The trained explainer's map logits for `target` (B, h, w), shifted to be non-negative (the official
    evaluation min-max normalises the logits per image, which `explain` does next); extras: the sigmoid maps."""
    if options:
        raise ExplainError(f"T-TAME takes the option tame=PATH only, not {', '.join(options)}")
    if tame is None:
        raise ExplainError(f"T-TAME explains {type(model).__name__} with an explainer trained for it: run "
                           "`vitlab train-tame MODEL --data fashion-mnist --out DIR` (or vitlab.explain.tame."
                           "train_tame) and pass it: vitlab.explain(model, images, method='tame', tame=DIR); "
                           "without one use --method rollout or gradcam")
    explainer = load_tame(tame)
    with torch.no_grad():
        _, maps, map_logits = explainer(model, images)
    rows = torch.arange(len(images))
    chosen = map_logits[rows, target]                                          # (B, h, w)
    chosen = chosen - chosen.flatten(1).amin(1)[:, None, None]
    return chosen, {"tame_maps": maps[rows, target]}


def tame_ad_ic(model: nn.Module, explainer: TameExplainer, data: torch.utils.data.Dataset, *, limit: int = 1000,
               batch_size: int = 100, mean: Sequence[float], std: Sequence[float]) -> dict[str, float]:
    """AD and IC (%) of the explainer on the first `limit` images of `data`: each image masked by its top-1 class's
    map (logits min-max normalised per image, bilinear to the image; official evaluation at 0 % thresholding)."""
    n = min(limit, len(data))
    images, maps, targets = [], [], []
    for start in range(0, n, batch_size):
        batch = torch.stack([data[i][0] for i in range(start, min(n, start + batch_size))])
        with torch.no_grad():
            logits, _, map_logits = explainer(model, batch)
        target = logits.argmax(-1)
        images.append(batch)
        maps.append(normalize_maps(map_logits[torch.arange(len(batch)), target], tuple(batch.shape[-2:])))
        targets.append(target)
    # the raw pixels are masked (black where the map is 0), as the official evaluation does
    ad, ic = average_drop_increase(model, torch.cat(images), torch.cat(maps), torch.cat(targets),
                                   pixel_baseline(0.0, tuple(mean), tuple(std)), batch_size)
    return {"AD": ad, "IC": ic, "images": n}


def train_tame_checkpoint(source: str, data: str, out: str | Path, *, data_dir: str | None = None,
                          eval_images: int = 1000, mask: str = "pixels", **train_options) -> dict:
    """`vitlab train-tame`: train an explainer for the model at `source` on `data`'s train split, write
    OUT/explainer.safetensors and OUT/metrics.json (train time, AD/IC on the first `eval_images` test images).
    `mask`: "pixels" masks the raw pixels in training (as AD/IC do), "input" the preprocessed image."""
    model = create_model(source).eval()
    pre = resolve_preprocessing(model)
    train = dataset_for_model(model, data, "train", data_dir=data_dir)
    start = time.perf_counter()
    explainer = train_tame(model, train, mask=mask, **train_options)
    train_s = time.perf_counter() - start
    path = save_tame(explainer, Path(out) / "explainer.safetensors")
    metrics = {"model": source, "data": data, "mask": mask, "train_s": round(train_s, 1),
               "threads": torch.get_num_threads(),
               **{k: v for k, v in train_options.items() if k != "progress"}}
    if eval_images:
        test = dataset_for_model(model, data, "test", data_dir=data_dir)
        metrics.update(tame_ad_ic(model, explainer, test, limit=eval_images, mean=pre.mean, std=pre.std))
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    metrics["explainer"] = str(path)
    return metrics
