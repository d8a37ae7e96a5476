"""Overlay pictures of explanations: each [0, 1] saliency map drawn over its image, pixel-aligned, with a colour bar."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..utils.io import atomic_path
from .core import Explanation
from .tokens import image_format

__all__ = ["plot_explanations"]


def plot_explanations(images: torch.Tensor, explanations: Sequence[Explanation], path: str | Path,
                      titles: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
                      alpha: float = 0.5) -> Path:
    """Write a grid of overlays to `path` (format from its suffix, `image_format`): one row per image (B, C, H, W in
    [0, 1]), one column for the input and one per explanation (same batch, maps (B, H, W) in [0, 1]), and one colour
    bar for the saliency scale. The map is drawn on the image's own pixel extent, so map and image align; gray
    images are drawn as they are (0 black, 1 white). `titles`: one per image (e.g. the file name)."""
    fmt = image_format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    B, C, H, W = images.shape
    for e in explanations:
        if tuple(e.maps.shape) != (B, H, W):
            raise ValueError(f"explanation {e.method!r} has maps {tuple(e.maps.shape)}, not (B, H, W) = {(B, H, W)}")
    cols = 1 + len(explanations)
    fig, axes = plt.subplots(B, cols, figsize=(2.6 * cols + 0.6, 2.7 * B), squeeze=False)
    extent = (0, W, H, 0)                      # both layers on the same pixel grid: aligned overlays
    shown = dict(cmap="gray", vmin=0.0, vmax=1.0) if C == 1 else {}
    mappable = None
    for i in range(B):
        picture = images[i].detach().float().clamp(0, 1).permute(1, 2, 0).numpy()   # (H, W, C)
        picture = picture[..., 0] if C == 1 else picture
        axes[i, 0].imshow(picture, extent=extent, interpolation="nearest", **shown)
        axes[i, 0].set_title(titles[i] if titles else "input", fontsize=9)
        for j, e in enumerate(explanations, start=1):
            t = int(e.target[i])
            label = class_names[t] if class_names and t < len(class_names) else f"class {t}"
            axes[i, j].imshow(picture, extent=extent, interpolation="nearest", **shown)
            mappable = axes[i, j].imshow(e.maps[i].detach().float().numpy(), extent=extent, cmap="jet",
                                         vmin=0.0, vmax=1.0, alpha=alpha, interpolation="bilinear")
            axes[i, j].set_title(f"{e.method}: {label} ({100 * float(e.probs[i]):.1f} %)", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    bar = fig.add_axes((0.92, 0.15, 0.018, 0.7))
    fig.colorbar(mappable, cax=bar).set_label("saliency (0 = least, 1 = most, per map)", fontsize=9)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    plt.close(fig)
    return path
