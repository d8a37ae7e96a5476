"""DeiT-LT: distillation for long-tailed data (Rangwani et al., "DeiT-LT: Distillation Strikes Back for Vision
Transformer Training on Long-Tailed Datasets", CVPR 2024), `vitlab train --recipe deitlt:...`.

Verified against the official code, val-iisc/DeiT-LT@bc36970 (engine.py `train_one_epoch`, losses.py
`DistillationLoss`, main.py's DRW switch and per-class weights):

* The student sees strongly augmented images ("out-of-distribution" for a CNN teacher trained on weakly augmented
  ones): before the DRW epoch mixup/cutmix, plus distortions and random erasing throughout; the teacher predicts on
  *the same* image (official: `samples_teacher = samples_student`).
* loss = (1 - alpha) * CE(class head, y_mix) + alpha * CE(distillation head, argmax teacher)      (alpha = 0.5)
  with label-smoothed mixed targets for the class token (timm `Mixup` + `SoftTargetCrossEntropy`).
* DRW (deferred re-weighting; official `--drw 1100` of 1200 epochs with `--no-mixup-drw --weighted-distillation`):
  from then on mixing stops, the class head takes plain CE, and the distillation CE is weighted per teacher class
  by the effective number of samples (Cui et al., CVPR 2019, eq. 4):
      w_c = (1 - beta) / (1 - beta ** n_c),   normalized so that sum_c w_c = C                (beta = 0.9999)
  as `F.cross_entropy(dist, t, weight=w)`: sum_i w_{t_i} l_i / sum_i w_{t_i} over the (global) batch.
* Inference: the average of the two heads' logits (official `evaluate`: `output_avg`), which `DistillTokenViT`
  returns in eval mode.

The distillation token and its head come from the engine's `--distill token` path (engine/distill.py), so the
recipe runs as `vitlab train --teacher CKPT --distill token --recipe deitlt`; the recipe runs the teacher itself on
the strongly augmented images. The engine saves the ViT with its class head as the checkpoint;
`two_head_model(RUN_DIR)` rebuilds the two-head model (the paper's inference) from the run's `train_state.pt`.

The strong augmentation is tensor ops (random affine distortion, contrast/brightness, pixel-noise erasing as DeiT's
`--remode pixel`, mixup/cutmix with a partner image drawn from the training set) in place of DeiT's PIL
RandAugment. Every draw is seeded per image from (seed, epoch, dataset index), so the images do not depend on how
the batch is split: 2-process DDP trains what one process trains.
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .distill import DistillTokenViT
from ..recipes import Recipe, RecipeError, Step, register_recipe
from ..checkpoint import create_model, default_preprocessing
from .train import _item_seed

__all__ = ["DRW", "DeiTLT", "drw_weights", "deitlt_loss", "strong_augment", "two_head_model", "weighted_ce"]

_STREAM = 0xDE17   # separates the recipe's per-image seeds from the engine's


def drw_weights(counts: torch.Tensor | list[int], beta: float) -> torch.Tensor:
    """Class-balanced weights from the effective number of samples, (1 - beta) / (1 - beta^n_c), normalized to sum
    to the number of classes (Cui et al. 2019 eq. 4; DeiT-LT main.py `per_cls_weights`)."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (weights / weights.sum() * len(n)).float()


def weighted_ce(logits: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor,
                total: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_{c_i} CE(logits_i, c_i) / sum_i w_{c_i} (`F.cross_entropy(weight=w)`), or divided by `total` where
    given (under DDP: the global batch's sum of weights / the number of processes, so that the averaged gradients
    equal one process's)."""
    w = weights[classes]
    return (w * F.cross_entropy(logits, classes, reduction="none")).sum() / (w.sum() if total is None else total)


def _global_weight_total(weights: torch.Tensor, classes: torch.Tensor, rt: Any) -> torch.Tensor | None:
    """The `total` of `weighted_ce` under DDP (an all-reduce of the local sums); None in one process."""
    if not rt.distributed:
        return None
    total = weights[classes].sum()
    torch.distributed.all_reduce(total)
    return total / rt.world_size


def _drw_step(drw: float | None, cfg: Any, train_set: Any) -> int:
    """The first global step of DRW: epoch `drw`, or 11/12 of --epochs (DeiT-LT's 1100 of 1200) when None."""
    epoch = cfg.epochs * 11 / 12 if drw is None else drw
    return math.ceil(epoch * (len(train_set) // cfg.batch_size))


def deitlt_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: torch.Tensor, alpha: float = 0.5, weights: torch.Tensor | None = None,
                weight_total: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - alpha) * CE(cls_logits, targets) + alpha * CE(dist_logits, argmax teacher_logits).

    `targets`: (B,) class indices or (B, C) soft (mixed) targets. `weights` (C,): DRW class weights of the
    distillation CE, indexed by the teacher's class (`weighted_ce`, with `weight_total` as its `total`).
    """
    if targets.dim() == 2:
        cls = torch.sum(-targets * F.log_softmax(cls_logits, dim=-1), dim=-1).mean()
    else:
        cls = F.cross_entropy(cls_logits, targets)
    hard = teacher_logits.detach().argmax(dim=-1)
    if weights is None:
        dist = F.cross_entropy(dist_logits, hard)
    else:
        dist = weighted_ce(dist_logits, hard, weights, weight_total)
    return (1 - alpha) * cls + alpha * dist


def strong_augment(images: torch.Tensor, rngs: list[np.random.Generator], magnitude: float,
                   re_prob: float) -> torch.Tensor:
    """Per image of `images` (B, C, H, W), from its own generator: an affine distortion (rotation up to 30 deg,
    shear up to 0.3, translation up to 15 % of the side, scale 1 +- 0.2, each times `magnitude`; the border filled
    with the image's minimum, the background of a normalized Fashion-MNIST image), contrast (1 +- 0.5) and
    brightness (+- 0.3), then with prob `re_prob` a rectangle (2-33 % of the area, aspect 0.3-3.3) of N(0, 1) noise
    (DeiT's random erasing, mode "pixel")."""
    b, c, h, w = images.shape
    d = np.stack([rng.uniform(-1.0, 1.0, size=7) for rng in rngs]) * magnitude      # (B, 7)
    angle, shear = d[:, 0] * math.pi / 6, d[:, 1] * 0.3
    scale = 1.0 + 0.2 * d[:, 2]
    cos, sin = np.cos(angle), np.sin(angle)
    theta = np.zeros((b, 2, 3))                     # output -> input coordinates in [-1, 1]
    theta[:, 0, 0], theta[:, 0, 1] = cos / scale, (-sin + shear * cos) / scale
    theta[:, 1, 0], theta[:, 1, 1] = sin / scale, (cos + shear * sin) / scale
    theta[:, :, 2] = d[:, 3:5] * 0.3                # translation: 0.3 of the half-side = 15 % of the side
    theta_t = torch.as_tensor(theta, dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta_t, [b, c, h, w], align_corners=False)                 # (B, H, W, 2)
    fill = images.amin(dim=(1, 2, 3), keepdim=True)                                  # (B, 1, 1, 1)
    x = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    contrast = torch.as_tensor(1.0 + 0.5 * d[:, 5], dtype=x.dtype, device=x.device).view(b, 1, 1, 1)
    brightness = torch.as_tensor(0.3 * d[:, 6], dtype=x.dtype, device=x.device).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    for i, rng in enumerate(rngs):
        if rng.random() >= re_prob:
            continue
        for _ in range(10):   # timm RandomErasing: up to 10 tries for a box that fits
            area = h * w * rng.uniform(0.02, 1 / 3)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if eh < h and ew < w:
                top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                noise = torch.as_tensor(rng.standard_normal((c, eh, ew)), dtype=x.dtype, device=x.device)
                x[i, :, top:top + eh, left:left + ew] = noise
                break
    return x


@register_recipe("deitlt")
@dataclass
class DeiTLT(Recipe):
    """DeiT-LT's loss on a `--distill token` model; options as the official CIFAR-LT scripts unless noted.

    alpha: weight of the distillation token's loss; drw: the epoch DRW starts (None: 11/12 of --epochs, the
    paper's 1100 of 1200); beta: effective-number beta; mixup / cutmix: Beta(a, a) of the mixing (0: off), each
    image picks one of them with prob 1/2 when both are on; magnitude: strength of the distortions (0: none);
    re_prob: probability of random erasing.
    """

    alpha: float = 0.5
    drw: float | None = None
    beta: float = 0.9999
    mixup: float = 0.8
    cutmix: float = 1.0
    magnitude: float = 1.0
    re_prob: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
        if not 0 < self.beta < 1:
            raise ValueError(f"beta={self.beta} must be in (0, 1), e.g. 0.9999")
        if self.drw is not None and self.drw < 0:
            raise ValueError(f"drw={self.drw} must be an epoch >= 0 (or none: 11/12 of --epochs)")
        if min(self.mixup, self.cutmix, self.magnitude) < 0 or not 0 <= self.re_prob <= 1:
            raise ValueError("mixup, cutmix and magnitude must be >= 0 and re_prob in [0, 1]")

    def setup(self, model: nn.Module, train_set: Any, cfg: Any, rt: Any) -> None:
        if not isinstance(model, DistillTokenViT):
            raise RecipeError(f"--recipe deitlt trains a distillation token: run it with --teacher CKPT --distill "
                              f"token (got {'--distill ' + cfg.distill if cfg.distill else 'no --distill'})")
        if cfg.mixup > 0 or cfg.cutmix > 0:
            raise RecipeError("--recipe deitlt mixes images itself (its options mixup=, cutmix=): drop --mixup and "
                              "--cutmix")
        self.teacher = create_model(cfg.teacher).to(rt.device).eval().requires_grad_(False)
        student, teacher = default_preprocessing(model.vit), default_preprocessing(self.teacher)
        keys = ("input_size", "mean", "std")
        if any(student[k] != teacher[k] for k in keys):
            raise RecipeError(f"--recipe deitlt feeds the student's images to the teacher, but --teacher "
                              f"{cfg.teacher} expects {[teacher[k] for k in keys]} (input size, mean, std) and the "
                              f"student {[student[k] for k in keys]}: train the teacher with the same preprocessing")
        self.train_set, self.rt = train_set, rt
        self.labels = train_set.targets
        self.num_classes = int(train_set.num_classes)
        self.weights = drw_weights(torch.bincount(self.labels, minlength=self.num_classes), self.beta).to(rt.device)
        self.seed, self.smoothing = int(cfg.seed), float(cfg.label_smoothing)
        self.drw_step = _drw_step(self.drw, cfg, train_set)

    def _rngs(self, step: Step) -> list[np.random.Generator]:
        return [np.random.default_rng(_item_seed(self.seed, step.epoch, index, _STREAM)) for index in step.indices]

    def _mix(self, images: torch.Tensor, targets: torch.Tensor, rngs: list[np.random.Generator]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix each image with a partner from the training set (its weak augmentation seeded like the image's):
        cutmix (a box of area 1 - lam, lam ~ Beta(cutmix, cutmix)) or mixup (lam ~ Beta(mixup, mixup)), with
        label-smoothed targets lam * y + (1 - lam) * y_partner (timm `Mixup`, elementwise)."""
        b, _, h, w = images.shape
        off = self.smoothing / self.num_classes
        one_hot = F.one_hot(targets, self.num_classes).to(images.dtype) * (1 - self.smoothing) + off
        mixed, soft = images.clone(), one_hot.clone()
        gen = torch.random.default_generator
        for i, rng in enumerate(rngs):
            partner = int(rng.integers(len(self.train_set)))
            with torch.random.fork_rng(devices=[]):
                gen.manual_seed(int(rng.integers(2 ** 62)))
                other = self.train_set[partner][0].to(images.device)
            use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < 0.5)
            if use_cutmix:   # timm rand_bbox: a box of side sqrt(1 - lam), centre uniform, clipped to the image
                lam = rng.beta(self.cutmix, self.cutmix)
                ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
                cy, cx = int(rng.integers(h)), int(rng.integers(w))
                y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
                x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
                mixed[i, :, y0:y1, x0:x1] = other[:, y0:y1, x0:x1]
                lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
            else:
                lam = rng.beta(self.mixup, self.mixup)
                mixed[i] = lam * images[i] + (1 - lam) * other
            other_target = F.one_hot(self.labels[partner], self.num_classes).to(images.dtype) * (1 - self.smoothing)
            soft[i] = lam * one_hot[i] + (1 - lam) * (other_target + off)
        return mixed, soft

    def loss(self, step: Step) -> torch.Tensor:
        rngs = self._rngs(step)
        images, targets = step.images, step.targets
        in_drw = step.global_step >= self.drw_step
        if not in_drw and (self.mixup > 0 or self.cutmix > 0):
            images, targets = self._mix(images, targets, rngs)
        images = strong_augment(images, rngs, self.magnitude, self.re_prob)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        cls_logits, dist_logits = step.train_model(images)
        if not in_drw:
            return deitlt_loss(cls_logits, dist_logits, teacher_logits, targets, self.alpha)
        total = _global_weight_total(self.weights, teacher_logits.argmax(dim=-1), self.rt)
        return deitlt_loss(cls_logits, dist_logits, teacher_logits, targets, self.alpha, self.weights, total)


@register_recipe("drw")
@dataclass
class DRW(Recipe):
    """Deferred re-weighting: effective-number weighted cross-entropy from epoch `drw` (Cao et al., NeurIPS 2019).

    The engine's default loss until epoch `drw` (None: 11/12 of --epochs), then `F.cross_entropy(logits, y,
    weight=w)` with `w = drw_weights(class counts, beta)`. How DeiT-LT's CNN teachers are trained for long-tailed
    data (theirs add LDAM margins or PaCo), and a long-tail baseline for any model."""

    drw: float | None = None
    beta: float = 0.9999

    def __post_init__(self) -> None:
        if not 0 < self.beta < 1:
            raise ValueError(f"beta={self.beta} must be in (0, 1), e.g. 0.9999")
        if self.drw is not None and self.drw < 0:
            raise ValueError(f"drw={self.drw} must be an epoch >= 0 (or none: 11/12 of --epochs)")

    def setup(self, model: nn.Module, train_set: Any, cfg: Any, rt: Any) -> None:
        if isinstance(model, DistillTokenViT) or cfg.mixup > 0 or cfg.cutmix > 0:
            raise RecipeError("--recipe drw re-weights the cross-entropy of a one-head model on unmixed labels: "
                              "drop --distill token / --mixup / --cutmix (or use --recipe deitlt)")
        counts = torch.bincount(train_set.targets, minlength=int(train_set.num_classes))
        self.weights, self.rt = drw_weights(counts, self.beta).to(rt.device), rt
        self.drw_step = _drw_step(self.drw, cfg, train_set)

    def loss(self, step: Step) -> torch.Tensor:
        if step.global_step < self.drw_step:
            return step.default_loss()
        logits = step.train_model(step.images)
        total = _global_weight_total(self.weights, step.targets, self.rt)
        return weighted_ce(logits, step.targets, self.weights, total)


def two_head_model(run: str | Path) -> DistillTokenViT:
    """The two-head model of a `--distill token` run (its last saved state; the EMA weights if --ema), in eval mode:
    its output is the average of the class and distillation heads' logits, DeiT-LT's inference."""
    run = Path(run)
    state = torch.load(run / "train_state.pt", map_location="cpu", weights_only=True)
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    if "dist_token" not in weights:
        raise UserError(f"{run} is not a --distill token run (its state has no distillation token): train with "
                        "--teacher CKPT --distill token")
    model = DistillTokenViT(create_model(run))
    model.load_state_dict(weights)
    return model.eval()
