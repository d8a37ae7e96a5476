"""Token-source maps: which input patches each surviving token of a token-reduced ViT stands for."""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..utils.io import atomic_path

__all__ = ["token_source_map", "plot_token_sources", "image_format", "IMAGE_FORMATS"]

# the file types an explanation is written as, by --out's suffix (matplotlib's savefig formats)
IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff",
                 ".pdf": "pdf", ".svg": "svg"}


def image_format(path: str | Path) -> str:
    """The format a picture written to `path` gets, from its suffix; an unknown or missing suffix is a UserError."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise UserError(f"--out {path}: the suffix {suffix or '(none)'!s} names no image format vitlab writes; "
                        f"end the name with one of {', '.join(IMAGE_FORMATS)}")
    if Path(path).is_dir():
        raise UserError(f"--out {path} is a folder: give an image file name, e.g. {Path(path) / 'tokens.png'}")
    return IMAGE_FORMATS[suffix]


def token_source_map(model, image: torch.Tensor) -> torch.Tensor:
    """Run one image (C, H, W) through a token-reduced model with source tracing; return a (gh, gw) grid of token ids.

    Patch (y, x) gets the index of the final token that contains it, or -1 where its token was dropped (EViT without
    fusion). Prefix tokens (class, registers) are not patches and are left out. The grid is the one the first
    reducible block sees (a PVT's last stage, say); a model with several token sequences (CrossViT) is refused.
    """
    from ..tokens.patch import TokenReducingModel

    if not isinstance(model, TokenReducingModel):
        raise UserError("token_source_map needs a model with a token-reduction technique applied "
                         "(e.g. --apply tome:r=4 or --apply evit:keep_rate=0.7)")
    sequences = model.token_sequences
    if len(sequences) != 1 or sequences[0].grid is None:
        raise UserError(f"token_source_map draws one token sequence over a patch grid; {type(model).__name__} has "
                        f"{len(sequences)} sequences ({', '.join(s.name for s in sequences)})"
                        + ("" if len(sequences) != 1 else " without a known grid"))
    state = model.token_state
    previous, state.trace_source = state.trace_source, True
    try:
        with torch.inference_mode():
            model.eval()(image[None])
        source = state.source
    finally:
        state.trace_source = previous
    gh, gw = sequences[0].grid
    if source is None:  # no reduction happened in any block
        return torch.arange(gh * gw).view(gh, gw)
    patches = source[0, :, state.num_prefix:]                    # (N, num_patches)
    labels = torch.where(patches.sum(0) > 0, patches.argmax(0), torch.full_like(patches[0], -1, dtype=torch.long))
    return labels.long().view(gh, gw)


def plot_token_sources(image: torch.Tensor, labels: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Draw the token-source map over the image (C, H, W in [0, 1]): one color and outline per token, in the format
    `path`'s suffix names (.png, .jpg, .pdf, ...: `image_format`). Gray images are drawn as they are (0 black,
    1 white), not stretched to their own darkest and brightest pixels."""
    fmt = image_format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    c, h, w = image.shape
    scale = max(1, 224 // max(h, w))  # draw small images larger so token outlines stay thin
    image = F.interpolate(image[None], scale_factor=scale, mode="nearest")[0]
    c, h, w = image.shape
    picture = image.permute(1, 2, 0).numpy() if c == 3 else image[0].numpy()
    # nearest upsampling of the patch grid to the image
    grid = F.interpolate(labels[None, None].float(), size=(h, w), mode="nearest")[0, 0].long().numpy()
    ids = np.unique(grid[grid >= 0])
    rng = np.random.default_rng(0)
    palette = {i: rng.random(3) for i in ids}
    overlay = np.zeros((h, w, 4))
    for i in ids:
        overlay[grid == i, :3] = palette[i]
        overlay[grid == i, 3] = 0.45
    overlay[grid < 0] = (0, 0, 0, 0.85)                           # dropped patches
    edges = np.zeros((h, w), dtype=bool)
    edges[:, 1:] |= grid[:, 1:] != grid[:, :-1]
    edges[1:, :] |= grid[1:, :] != grid[:-1, :]
    overlay[edges] = (1, 1, 1, 0.9)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    shown = dict(cmap="gray", vmin=0.0, vmax=1.0) if c == 1 else {}  # no auto-contrast of a gray image
    axes[0].imshow(picture, **shown)
    axes[0].set_title("input")
    axes[1].imshow(picture, **shown)
    axes[1].imshow(overlay)
    axes[1].set_title(title or f"{len(ids)} tokens", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    plt.close(fig)
    return path
