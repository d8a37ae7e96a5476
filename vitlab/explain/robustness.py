"""Patch-perturbation robustness and calibration: accuracy and ECE under patch drop, patch shuffle, occlusion and
adversarial patches, before and after temperature scaling.

    rows = robustness(model, test_set, val_set)       # one row per (perturbation, severity)

Perturbations work on the model's own patch grid (the token grid its first block sees, read through the model
contract), not on a hard-coded 16 px patch, so the 4 px patches of the 28 px Fashion-MNIST ViT (conv stem) and a
Swin's first-stage grid are both hit patch by patch. They follow the seed paper (Gu et al., "Are Vision Transformers
Robust to Patch Perturbations?", ECCV 2022): whole patches of a fraction of the grid are perturbed, and its
patch-wise adversarial attack (PGD confined to the chosen patches); beside them the usual ViT probes (Naseer et al.,
2021: patch drop, patch shuffle) and random occlusion boxes. Every perturbation is seeded.

Calibration: ECE with 15 equal-width confidence bins (Guo et al., 2017), and temperature scaling: one scalar T > 0
fitted by LBFGS on the NLL of the clean val-split logits, then applied to the logits of every perturbation. (The seed
paper's temperature scales the attention softmax against adversarial patches; this one is Guo et al.'s post-hoc
calibration of the classifier's softmax.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from ..contract import describe
from ..data.transforms import resolve_preprocessing
from ..runner import as_runner
from .core import ExplainError, explained_module

__all__ = ["patch_grid", "patch_drop", "patch_shuffle", "occlude", "expected_calibration_error", "fit_temperature",
           "adversarial_patches", "perturb", "RobustnessRow", "robustness", "format_rows", "DEFAULT_SEVERITIES", "PERTURBATIONS"]

# perturbation -> severities: the fraction of the grid's patches dropped or shuffled, or the occluded image area
DEFAULT_SEVERITIES: dict[str, tuple[float, ...]] = {
    "drop_zero": (0.1, 0.25, 0.5),
    "drop_mean": (0.1, 0.25, 0.5),
    "shuffle": (0.25, 0.5, 1.0),
    "occlusion": (0.1, 0.25, 0.5),
    "adversarial": (0.02, 0.1),
}
PERTURBATIONS = ("none",) + tuple(DEFAULT_SEVERITIES)


def patch_grid(model: Any, input_size: tuple[int, int, int]) -> tuple[int, int]:
    """(gh, gw): the token grid the model's first block sees for an input of `input_size` (C, H, W), from the model
    contract: the block's (B, N, C) sequence less its prefix tokens, or its NHWC / NCHW map. For a plain ViT this is
    the patch grid, for a hierarchical model (Swin, PVT) the first stage's grid, for a conv-stem ViT the stem's."""
    module = explained_module(model)
    name = type(module).__name__
    try:
        block = describe(module).blocks[0]
    except (ValueError, IndexError) as e:  # NoAdapter is a UserError (ValueError)
        raise ExplainError(f"robustness cannot find the patch grid of {name}: no model-contract block ({e}); "
                           "it works on the models vitlab.contract.describe knows") from None
    seen: list[torch.Tensor] = []
    hook = block.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            module.eval()(torch.zeros(1, *input_size))
    finally:
        hook.remove()
    x = seen[0]
    _, h, w = input_size
    if block.layout == "nhwc":
        return int(x.shape[1]), int(x.shape[2])
    if block.layout == "nchw":
        return int(x.shape[2]), int(x.shape[3])
    n = x.shape[1] - block.num_prefix_tokens  # (B, prefix + gh * gw, C): patches in row-major order
    gh = round(math.sqrt(n * h / w))
    if gh < 1 or n % gh:
        raise ExplainError(f"robustness cannot lay {n} tokens of {name} on a grid of a {h}x{w} image; it needs a "
                           "model whose first block sees a rectangular patch grid (ViT, DeiT, Swin, PVT, ...)")
    return gh, n // gh


def _patch_index(size: int, cells: int) -> torch.Tensor:
    """Pixel -> grid cell along one axis (size pixels over `cells` cells; uneven sizes give uneven cells)."""
    return torch.arange(size) * cells // size


def _random_patches(batch: int, num_patches: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, k) distinct patch indices per image, k = round(fraction * num_patches), chosen uniformly."""
    if not 0.0 <= fraction <= 1.0:
        raise ExplainError(f"patch fraction {fraction} is not in [0, 1]")
    k = round(fraction * num_patches)
    return torch.rand(batch, num_patches, generator=generator).argsort(1)[:, :k]


def _patch_mask(images: torch.Tensor, grid: tuple[int, int], fraction: float,
                generator: torch.Generator) -> torch.Tensor:
    """(B, 1, H, W) True on the pixels of round(fraction * gh * gw) random patches of each image."""
    b, _, h, w = images.shape
    gh, gw = grid
    chosen = _random_patches(b, gh * gw, fraction, generator)
    picked = torch.zeros(b, gh * gw, dtype=torch.bool).scatter_(1, chosen, True).view(b, gh, gw)
    return picked[:, _patch_index(h, gh)][:, :, _patch_index(w, gw)][:, None]  # (B, 1, H, W)


def patch_drop(images: torch.Tensor, grid: tuple[int, int], fraction: float, fill: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """Replace round(fraction * gh * gw) random patches of each image (B, C, H, W) by `fill` ((C,) or (B, C): a
    colour per channel or per image and channel); fraction 0 returns the images unchanged, 1 fills every patch."""
    b, c = images.shape[:2]
    fill = fill.to(images).expand(b, c)[:, :, None, None]  # (B, C, 1, 1)
    return torch.where(_patch_mask(images, grid, fraction, generator), fill, images)


def adversarial_patches(module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        grid: tuple[int, int], fraction: float, pixel_range: tuple[torch.Tensor, torch.Tensor],
                        generator: torch.Generator, steps: int = 10) -> torch.Tensor:
    """The seed paper's patch-wise adversarial attack: round(fraction * gh * gw) random patches of each image are
    free to take any pixel value (within `pixel_range`, (C,) low and high of the normalised input) and are set by
    `steps` steps of signed-gradient ascent (PGD, step 1/8 of the range, random start) on the cross-entropy of the
    true label; the other pixels stay as they are. Needs gradients through `module`."""
    lo, hi = (v.to(images)[None, :, None, None] for v in pixel_range)  # (1, C, 1, 1)
    mask = _patch_mask(images, grid, fraction, generator)
    start = lo + (hi - lo) * torch.rand(images.shape, generator=generator)
    x = torch.where(mask, start, images)
    with torch.enable_grad():
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            loss = F.cross_entropy(module(x), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            x = torch.where(mask, torch.minimum(torch.maximum(x + (hi - lo) / 8 * grad.sign(), lo), hi), images)
    return x.detach()


def patch_shuffle(images: torch.Tensor, grid: tuple[int, int], fraction: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Permute round(fraction * gh * gw) random patches of each image among their own positions (fraction 1: a
    random permutation of all patches). Needs H and W divisible by the grid."""
    b, c, h, w = images.shape
    gh, gw = grid
    if h % gh or w % gw:
        raise ExplainError(f"patch shuffle needs equal patches: a {h}x{w} image does not split into a {gh}x{gw} grid")
    ph, pw = h // gh, w // gw
    patches = images.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, ph, pw)
    chosen = _random_patches(b, gh * gw, fraction, generator)  # (B, k) positions taking part
    order = torch.rand(chosen.shape, generator=generator).argsort(1)
    source = torch.arange(gh * gw).repeat(b, 1).scatter_(1, chosen, chosen.gather(1, order))  # (B, N): patch taken
    shuffled = patches[torch.arange(b)[:, None], source]  # (B, N, C, ph, pw)
    return shuffled.view(b, gh, gw, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def occlude(images: torch.Tensor, area: float, fill: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill one random box per image covering `area` of it (the image's aspect ratio, anywhere inside) with `fill`
    ((C,) or (B, C)). Boxes ignore the patch grid: they cut patches partly, as a real occluder does."""
    if not 0.0 <= area <= 1.0:
        raise ExplainError(f"occlusion area {area} is not in [0, 1]")
    b, c, h, w = images.shape
    bh, bw = round(h * math.sqrt(area)), round(w * math.sqrt(area))
    top = torch.randint(0, h - bh + 1, (b,), generator=generator)
    left = torch.randint(0, w - bw + 1, (b,), generator=generator)
    ys, xs = torch.arange(h), torch.arange(w)
    rows = (ys >= top[:, None]) & (ys < top[:, None] + bh)     # (B, H)
    cols = (xs >= left[:, None]) & (xs < left[:, None] + bw)   # (B, W)
    box = rows[:, :, None] & cols[:, None, :]                  # (B, H, W)
    fill = fill.to(images).expand(b, c)[:, :, None, None]
    return torch.where(box[:, None], fill, images)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al., 2017): sum over equal-width confidence bins (lo, hi] of |bin| / n * |accuracy - mean
    confidence|, confidence being the top-1 probability of `probs` (n, classes). Same binning as torchmetrics'
    MulticlassCalibrationError(norm="l1")."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)  # bin (i/bins, (i+1)/bins]
    gap = torch.zeros(bins).index_add_(0, index, correct - confidence)   # sum of (correct - confidence) per bin
    return float(gap.abs().sum() / len(labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on (logits (n, classes), labels), by LBFGS over log T
    (Guo et al., 2017: one scalar, fitted on a held-out split)."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")
    logits, labels = logits.detach().float().clone(), labels.detach().clone()  # inference tensors cannot enter autograd

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())


@dataclass(frozen=True)
class RobustnessRow:
    """One perturbation at one severity on `n` test images: top-1 accuracy, NLL and ECE (15 bins) of the raw
    softmax, and NLL / ECE after dividing the logits by `temperature` (fitted on the clean val split)."""

    model: str
    perturbation: str
    severity: float
    n: int
    accuracy: float
    nll: float
    ece: float
    temperature: float
    nll_scaled: float
    ece_scaled: float
    grid: tuple[int, int]
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def _stack(dataset, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` items of a dataset of (image (C, H, W), label) as (images (n, C, H, W), labels (n,))."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images, labels = zip(*(dataset[i] for i in range(n)))
    return torch.stack(images), torch.as_tensor(labels)


def _logits(runner, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([runner(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])


def perturb(images: torch.Tensor, labels: torch.Tensor, perturbation: str, severity: float, grid: tuple[int, int],
            pixel_range: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator,
            module: torch.nn.Module | None = None) -> torch.Tensor:
    """`images` (B, C, H, W) under one perturbation of PERTURBATIONS. `pixel_range`: the normalised input's values
    of pixels 0 and 1, (C,) each. drop_zero fills patches black (pixel 0), drop_mean with each image's per-channel
    mean, occlusion's box is black; adversarial attacks `module` (needed only for it) on `labels`."""
    black = pixel_range[0]
    if perturbation == "none":
        return images
    if perturbation == "drop_zero":
        return patch_drop(images, grid, severity, black, generator)
    if perturbation == "drop_mean":
        return patch_drop(images, grid, severity, images.mean((2, 3)), generator)
    if perturbation == "shuffle":
        return patch_shuffle(images, grid, severity, generator)
    if perturbation == "occlusion":
        return occlude(images, severity, black, generator)
    if perturbation == "adversarial":
        return adversarial_patches(module, images, labels, grid, severity, pixel_range, generator)
    raise ExplainError(f"{perturbation!r} is not a patch perturbation; choose one of {', '.join(PERTURBATIONS)}")


def robustness(model: Any, test_set, val_set, *, severities: dict[str, Iterable[float]] | None = None,
               limit: int | None = 1000, val_limit: int | None = 1000, batch_size: int = 250, seed: int = 0,
               name: str = "") -> list[RobustnessRow]:
    """Accuracy and calibration of `model` (an nn.Module or a vitlab runner) on the first `limit` images of
    `test_set`, clean and under each perturbation x severity (default DEFAULT_SEVERITIES), with the temperature
    fitted on the first `val_limit` clean images of `val_set`. The datasets yield (image, label) preprocessed as the
    model expects (`vitlab.data.transforms.dataset_for_model`). Batch b of every perturbation draws its patches from
    a generator seeded with (seed, b), so two models (a base and its compressed variant) see the same perturbed
    images."""
    runner = as_runner(model)
    images, labels = _stack(test_set, limit)
    grid = patch_grid(model, tuple(images.shape[1:]))
    pre = resolve_preprocessing(model)
    mean, std = torch.tensor(pre.mean), torch.tensor(pre.std)
    pixel_range = ((0 - mean) / std, (1 - mean) / std)  # pixels 0 and 1 in the normalised input, (C,) each
    val_images, val_labels = _stack(val_set, val_limit)
    temperature = fit_temperature(_logits(runner, val_images, batch_size), val_labels)
    severities = DEFAULT_SEVERITIES if severities is None else severities
    module = None
    if "adversarial" in severities:
        try:
            module = explained_module(model).eval()
        except ExplainError:
            raise ExplainError(f"adversarial patches need gradients through a PyTorch model; {type(model).__name__} "
                               "runs in another engine: leave 'adversarial' out of the severities, or measure the "
                               "PyTorch (or int8-simulated) model") from None
    rows = []
    for perturbation, levels in [("none", (0.0,))] + list(severities.items()):
        for severity in levels:
            logits = []
            for b, start in enumerate(range(0, len(images), batch_size)):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + b)
                x = perturb(images[start:start + batch_size], labels[start:start + batch_size], perturbation, severity,
                            grid, pixel_range, generator, module)
                logits.append(_logits(runner, x, batch_size))
            z = torch.cat(logits)
            rows.append(RobustnessRow(
                model=name, perturbation=perturbation, severity=float(severity), n=len(labels),
                accuracy=float((z.argmax(1) == labels).float().mean()),
                nll=float(F.cross_entropy(z, labels)), ece=expected_calibration_error(z.softmax(1), labels),
                temperature=temperature, nll_scaled=float(F.cross_entropy(z / temperature, labels)),
                ece_scaled=expected_calibration_error((z / temperature).softmax(1), labels), grid=grid, seed=seed))
    return rows


def format_rows(rows: list[RobustnessRow]) -> str:
    """The rows as a fixed-width text table (accuracy and ECE in %)."""
    lines = [f"{'perturbation':<13}{'severity':>9}{'top-1 %':>9}{'ECE %':>8}{'ECE@T %':>9}{'NLL':>8}{'NLL@T':>8}"]
    for r in rows:
        lines.append(f"{r.perturbation:<13}{r.severity:>9.2f}{100 * r.accuracy:>9.2f}{100 * r.ece:>8.2f}"
                     f"{100 * r.ece_scaled:>9.2f}{r.nll:>8.3f}{r.nll_scaled:>8.3f}")
    return "\n".join(lines)
