"""Is an explanation faithful? Scores that perturb the input where a saliency map points and watch the model.

- Deletion / insertion AUC (Petsiuk et al., 2018, "RISE"): pixels are moved from a start image to an end image in
  order of decreasing saliency, in `steps` equal steps (step k moves the round(k * H * W / steps) most salient
  pixels, all channels of a pixel together; ties keep pixel order); the model's probability of the target class is
  recorded at the steps + 1 points and integrated by the trapezoid rule over the fraction moved in [0, 1].
  Deletion goes from the image to a baseline (lower AUC is better: the probability falls fast); insertion goes from
  a baseline to the image (higher is better).
- Average Drop / Increase in Confidence (Chattopadhay et al., 2018, as T-TAME reports them): with p = p_c(x) and
  p_m = p_c(b + m * (x - b)), m the [0, 1] map and b the baseline (0: x * m as in the papers),
  AD = mean(max(0, p - p_m) / p) * 100 (lower is better), IC = % of images with p_m > p (higher is better).

Baselines are in the model's input space. On inputs normalized with the dataset's mean and std, zeros *are* the
dataset mean (`mean_baseline` computes it from data); `pixel_baseline(0, mean, std)` is black (masking the raw
pixels, as T-TAME's official AD / IC code does); `blurred` gives RISE's blurred-image baseline for insertion.
`random_maps` and `centre_gaussian_maps` are the maps an explanation method has to beat.

A runner (w8a8 / w8 deployed to ONNX Runtime or OpenVINO) is scored as it runs: the probabilities come from the
engine's own forward, not from its simulated twin, so the scores are those of the deployed int8 model; the maps
may still come from the twin (`vitlab.explain` looks into `runner.sim_module`, which has the attention and the
gradients an engine does not expose).

    scores = faithfulness(model, images, vitlab.explain(model, images, method="rollout").maps)
    scores.deletion_auc, scores.insertion_auc, scores.average_drop, scores.increase_in_confidence
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torchvision.transforms.functional import gaussian_blur

from .core import ExplainError, explained_module

Scored = Callable[[torch.Tensor], torch.Tensor]     # images (N, C, H, W) -> logits (N, classes)

__all__ = ["FaithfulnessScores", "faithfulness", "scored_forward", "perturbation_curves", "auc", "deletion_auc",
           "insertion_auc", "average_drop", "increase_in_confidence", "average_drop_increase", "mean_baseline",
           "pixel_baseline", "blurred", "random_maps", "centre_gaussian_maps"]


@dataclass(frozen=True)
class FaithfulnessScores:
    """Means over `images` images: deletion / insertion AUC of the target probability (in [0, 1]), average drop
    and increase in confidence (in %)."""

    deletion_auc: float
    insertion_auc: float
    average_drop: float
    increase_in_confidence: float
    images: int
    steps: int


def scored_forward(model: Any) -> Scored:
    """What the scores run: an nn.Module in eval mode, or a runner as deployed (its engine's `__call__`; a runner
    without one is looked into as `vitlab.explain` does)."""
    if isinstance(model, nn.Module):
        return model.eval()
    if callable(model):
        return model
    return explained_module(model).eval()


def _target_probs(module: Scored, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) softmax probability of `target` (N,) for `inputs` (N, C, H, W)."""
    return module(inputs).float().softmax(-1).gather(1, target[:, None].long())[:, 0]


def _saliency_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) maps -> (B, H * W) rank of each pixel, 0 for the most salient (ties: lower pixel index first)."""
    order = torch.argsort(-maps.flatten(1).float(), dim=1, stable=True)   # (B, HW) pixel ids, most salient first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return ranks


def _check(module: Scored, images: torch.Tensor, maps: torch.Tensor, what: str) -> None:
    if images.dim() != 4 or maps.shape != (images.shape[0], *images.shape[-2:]):
        raise ExplainError(f"{what} of {type(module).__name__}: needs images (B, C, H, W) and maps (B, H, W) of the "
                           f"same B, H, W, got {tuple(images.shape)} and {tuple(maps.shape)}; pass "
                           "vitlab.explain(...).maps, which is resized to the image")


def perturbation_curves(model, start: torch.Tensor, end: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                        steps: int = 20, batch_size: int = 512) -> torch.Tensor:
    """(B, steps + 1) target probability as the pixels of `start` (B, C, H, W) are replaced by those of `end`
    (broadcastable to `start`) in order of decreasing `maps` (B, H, W); column k has round(k * H * W / steps)
    pixels replaced. `batch_size` bounds the images per forward pass (whole curves: at least one curve a pass)."""
    module = scored_forward(model)
    _check(module, start, maps, "perturbation_curves")
    if steps < 1:
        raise ExplainError(f"steps={steps}: the curve needs at least 1 step (RISE moves 224 pixels a step, i.e. 224 "
                           "steps on 224x224 images; 10-20 steps are enough on 28x28)")
    end = end.expand_as(start)
    B, C, H, W = start.shape
    counts = torch.round(torch.arange(steps + 1) * (H * W) / steps).long()       # (S+1,) pixels moved at step k
    ranks = _saliency_ranks(maps)                                                # (B, HW)
    curves = torch.empty(B, steps + 1)
    chunk = max(1, batch_size // (steps + 1))
    with torch.inference_mode():
        for i in range(0, B, chunk):
            r = ranks[i:i + chunk]
            moved = (r[:, None, :] < counts[None, :, None]).view(len(r), steps + 1, 1, H, W)  # (b, S+1, 1, H, W)
            x = torch.where(moved, end[i:i + chunk, None], start[i:i + chunk, None])        # (b, S+1, C, H, W)
            t = target[i:i + chunk].repeat_interleave(steps + 1)
            curves[i:i + chunk] = _target_probs(module, x.flatten(0, 1), t).view(len(r), steps + 1).cpu()
    return curves


def auc(curves: torch.Tensor) -> torch.Tensor:
    """(B, S + 1) curves sampled at fractions 0, 1/S, ..., 1 -> (B,) area by the trapezoid rule."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)


def deletion_auc(model, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                 baseline: torch.Tensor | float = 0.0, steps: int = 20, batch_size: int = 512) -> torch.Tensor:
    """(B,) deletion AUC: the most salient pixels first replaced by `baseline` (lower is better)."""
    end = torch.as_tensor(baseline, dtype=images.dtype).expand_as(images)
    return auc(perturbation_curves(model, images, end, maps, target, steps, batch_size))


def insertion_auc(model, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                  baseline: torch.Tensor | float = 0.0, steps: int = 20, batch_size: int = 512) -> torch.Tensor:
    """(B,) insertion AUC: from `baseline`, the most salient pixels of the image first (higher is better)."""
    start = torch.as_tensor(baseline, dtype=images.dtype).expand_as(images)
    return auc(perturbation_curves(model, start, images, maps, target, steps, batch_size))


def average_drop(probs: torch.Tensor, masked_probs: torch.Tensor) -> float:
    """AD % = mean over images of max(0, p - p_m) / p * 100."""
    return float(((probs - masked_probs).clamp(min=0) / probs.clamp(min=1e-12)).mean() * 100)


def increase_in_confidence(probs: torch.Tensor, masked_probs: torch.Tensor) -> float:
    """IC % = share of images whose target probability rises when only the explained region is kept."""
    return float((masked_probs > probs).float().mean() * 100)


def average_drop_increase(model, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                          baseline: torch.Tensor | float = 0.0, batch_size: int = 512) -> tuple[float, float]:
    """(AD %, IC %) of the [0, 1] `maps` (B, H, W): the image kept where the map is 1, `baseline` where it is 0."""
    module = scored_forward(model)
    _check(module, images, maps, "average_drop_increase")
    baseline = torch.as_tensor(baseline, dtype=images.dtype).expand_as(images)
    masked = baseline + maps[:, None].to(images.dtype) * (images - baseline)    # (B, C, H, W)
    probs, masked_probs = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            probs.append(_target_probs(module, images[i:i + batch_size], target[i:i + batch_size]))
            masked_probs.append(_target_probs(module, masked[i:i + batch_size], target[i:i + batch_size]))
    probs, masked_probs = torch.cat(probs), torch.cat(masked_probs)
    return average_drop(probs, masked_probs), increase_in_confidence(probs, masked_probs)


def faithfulness(model, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor | None = None, *,
                 deletion_baseline: torch.Tensor | float = 0.0, insertion_baseline: torch.Tensor | float = 0.0,
                 mask_baseline: torch.Tensor | float = 0.0, steps: int = 20,
                 batch_size: int = 512) -> FaithfulnessScores:
    """Deletion and insertion AUC, AD and IC of `maps` (B, H, W in [0, 1]) explaining `target` (default: the
    model's top-1) on `images`, averaged over the images; `model`: an nn.Module or a runner (scored as deployed)."""
    module = scored_forward(model)
    if target is None:
        with torch.inference_mode():
            target = torch.cat([module(images[i:i + batch_size]).argmax(-1)
                                for i in range(0, len(images), batch_size)])
    deletion = deletion_auc(module, images, maps, target, deletion_baseline, steps, batch_size)
    insertion = insertion_auc(module, images, maps, target, insertion_baseline, steps, batch_size)
    ad, ic = average_drop_increase(module, images, maps, target, mask_baseline, batch_size)
    return FaithfulnessScores(float(deletion.mean()), float(insertion.mean()), ad, ic, len(images), steps)


def mean_baseline(images: torch.Tensor) -> torch.Tensor:
    """(1, C, 1, 1) per-channel mean of `images` (B, C, H, W): the dataset-mean baseline."""
    return images.float().mean(dim=(0, 2, 3), keepdim=True).to(images.dtype)


def pixel_baseline(value: float, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(1, C, 1, 1) the normalized input of raw pixel `value` in every channel: `pixel_baseline(0, mean, std)` is
    black, the baseline with which T-TAME's official evaluation masks the raw pixels (x_raw * m)."""
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (value - mean_t) / std_t


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """`images` (B, C, H, W) blurred by a Gaussian of `sigma` pixels (kernel 2 * ceil(3 sigma) + 1, reflected
    borders): RISE's insertion baseline."""
    size = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(images, [size, size], [sigma, sigma])


def random_maps(batch: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(batch, H, W) i.i.d. uniform [0, 1] maps: the chance level of every score."""
    return torch.rand(batch, *size, generator=torch.Generator().manual_seed(seed))


def centre_gaussian_maps(batch: int, size: tuple[int, int], sigma: float = 0.25) -> torch.Tensor:
    """(batch, H, W) the same map for every image: a Gaussian at the image centre, `sigma` a fraction of the
    shorter side, peak 1 (the centre bias every dataset of centred objects rewards)."""
    H, W = size
    y = torch.arange(H, dtype=torch.float32) - (H - 1) / 2
    x = torch.arange(W, dtype=torch.float32) - (W - 1) / 2
    s = sigma * min(H, W)
    bump = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * s * s))       # (H, W)
    return bump.expand(batch, H, W).clone()
