"""Progressive resizing, `vitlab train --progressive-sizes 20,24,28`: early steps on smaller images.

The run's steps are split into equal, consecutive phases, one per size in the list (a size may repeat to lengthen
its phase: `20,20,24,28` spends half the run at 20 px). Each batch, augmented at the dataset's size, is resized to
its phase's size (bilinear with antialiasing, engine/resformer.py `resize_batch`), so the data order and the
augmentation draws do not depend on the sizes. A convolutional stem's cost scales with the pixels and the blocks'
with the tokens, so a 20 px step of `vl_vit_fmnist` (25 tokens instead of 49) costs about half a 28 px step
(benchmarks/reference_candidates.py measures 0.53 at 1 thread): the same wall-clock buys more epochs. Val is
evaluated at the dataset's size.

This is the "progressive resizing" of fast-training practice (fast.ai's DAWNBench ImageNet runs; Tan & Le,
"EfficientNetV2", ICML 2021, Sec. 4: small images early, the full size last, which FixRes (Touvron et al., NeurIPS
2019) motivates: the last phase at the test size removes the train/test resolution discrepancy). EfficientNetV2 also
raises the regularization with the size; here only the size changes.

The model must take every size. A timm `VisionTransformer` with a fixed grid (as `vl_vit_fmnist` is built) is made
to take any size for the training run only (`make_any_size`: timm's own `dynamic_img_size` path, which resamples the
position embedding to each grid and uses it unchanged at the model's own size), so the checkpoint stays the same
fixed-grid model that every technique applies to; models that take any size already (`pos_embed="glpe"`,
`dynamic_img_size=True`) are used as they are; any other model is refused before training (`check_sizes`).
"""
import argparse

import torch
import torch.nn as nn
from timm.layers import Format
from timm.models.vision_transformer import VisionTransformer

from ..errors import UserError

__all__ = ["phase_size", "make_any_size", "check_sizes", "size_list"]


def size_list(text: str) -> list[int]:
    """argparse type of --progressive-sizes: comma-separated image sides >= 1, e.g. "20,24,28" -> [20, 24, 28] (the
    model's own check, `check_sizes`, refuses a side it cannot take)."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of image sides, e.g. 20,24,28") \
            from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: every image side must be >= 1 pixel, e.g. 20,24,28")
    return sizes


def phase_size(sizes: list[int], step: int, total_steps: int) -> int:
    """The image side of 0-based `step` of `total_steps`: phase floor(step * len(sizes) / total_steps) of equal ones.

    Integer arithmetic, so every process and a resumed run agree on where a phase starts."""
    return sizes[min(step * len(sizes) // max(total_steps, 1), len(sizes) - 1)]


def make_any_size(model: nn.Module) -> bool:
    """Switch a fixed-grid timm VisionTransformer, in place, to timm's `dynamic_img_size` path: the patch embedding
    hands over its (B, H, W, C) grid and `_pos_embed` resamples the position embedding to it (bicubic,
    `timm.layers.resample_abs_pos_embed`, which returns the embedding itself at the model's grid, so outputs at the
    model's own size are bitwise unchanged). Returns whether it switched; other models are left alone."""
    if not (isinstance(model, VisionTransformer) and not model.dynamic_img_size and model.pos_embed is not None
            and type(model)._pos_embed is VisionTransformer._pos_embed and hasattr(model.patch_embed, "flatten")):
        return False
    model.dynamic_img_size = True
    model.patch_embed.flatten, model.patch_embed.output_fmt = False, Format.NHWC   # (B, H, W, C) tokens
    if hasattr(model.patch_embed, "strict_img_size"):
        model.patch_embed.strict_img_size = False
    return True


def check_sizes(model: nn.Module, sizes: list[int], in_chans: int, native: int) -> None:
    """Refuse (UserError, before training) a model that cannot run at one of `sizes`: a trial forward of one image
    per size (eval mode, no grad; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        for size in sorted(set(sizes) - {native}):
            try:
                with torch.no_grad():
                    model(torch.zeros(1, in_chans, size, size, device=next(model.parameters()).device))
            except Exception as e:  # noqa: BLE001  (any failure means: this model takes no such input)
                raise UserError(
                    f"--progressive-sizes {','.join(map(str, sizes))}: {type(model).__name__} does not take "
                    f"{size}x{size} images ({type(e).__name__}: {str(e)[:160]}); it supports sizes its layers "
                    "accept (timm ViTs are switched to any size; a patch size must divide each side): give such "
                    "sizes, a model built to take any size, or drop the flag"
                ) from None
    finally:
        model.train(was_training)
