"""`vitlab predict` for dense checkpoints: masks (a colour overlay) and boxes with class names drawn on the user's
image, written as PNG.

The image is resized to the model's input (no aspect kept, as `coco:PATH` scenes are), predicted, and the
prediction is drawn back at the image's own size (nearest-neighbour for masks, boxes scaled); images smaller than
256 px are first enlarged by a whole factor (nearest) so that the labels stay legible.
"""
from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..record import record
from ..errors import UserError
from ..data.transforms import load_image_tensor, to_channels
from ..utils.io import atomic_path
from .engine import load_dense, predict_dense

__all__ = ["class_colour", "draw_prediction", "predict_files", "ALPHA", "MIN_SIDE"]

ALPHA = 0.5          # overlay opacity of a mask's colour
MIN_SIDE = 256       # smaller images are enlarged by a whole factor to at least this long side
_TAB10 = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def class_colour(index: int) -> tuple[int, int, int]:
    """Colour of class `index`: matplotlib's tab10 for the first ten, then golden-ratio hues."""
    if index < len(_TAB10):
        return _TAB10[index]
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def _blend(canvas: torch.Tensor, mask: torch.Tensor, colour: tuple[int, int, int]) -> None:
    """In place: canvas [H, W, 3] uint8 pixels under `mask` [H, W] become (1 - ALPHA) * pixel + ALPHA * colour."""
    c = torch.tensor(colour, dtype=torch.float32)
    canvas[mask] = ((1 - ALPHA) * canvas[mask].float() + ALPHA * c).round().to(torch.uint8)


def draw_prediction(image, prediction: Any, task: str, class_names: list[str], *, model_size: int,
                    threshold: float = 0.5):
    """The RGB PIL image with `prediction` (of `predict_dense` for one image, at the model's `model_size`) drawn on it.

    semantic [S, S]: every non-background class, panoptic [S, S, 2]: every segment, a colour overlay of its class
    named at its centre; detection {boxes, scores, labels}: boxes scoring >= `threshold` with name + score.
    The last class name is the background (fmnist-scenes, coco:PATH).
    """
    image = image.convert("RGB")
    factor = max(1, math.ceil(MIN_SIDE / max(image.size)))
    width, height = image.width * factor, image.height * factor
    image = image.resize((width, height), Image.NEAREST)
    background = len(class_names) - 1
    labels: list[tuple[tuple[float, float], str]] = []             # (segment centre, class name)
    boxes: list[tuple[list[float], str, tuple[int, int, int]]] = []
    if task in ("semantic", "panoptic"):
        pred = torch.as_tensor(prediction)
        pred = pred[..., None] if pred.dim() == 2 else pred                   # [S, S, 1 or 2]
        pred = F.interpolate(pred.permute(2, 0, 1)[None].float(), size=(height, width), mode="nearest")
        pred = pred[0].permute(1, 2, 0).long()                                # [H, W, 1 or 2]
        canvas = torch.from_numpy(np.asarray(image).copy())                    # [H, W, 3] uint8
        segments = torch.unique(pred.reshape(-1, pred.shape[-1]), dim=0)
        for segment in segments.tolist():
            cls = segment[0]
            if cls == background or not 0 <= cls < len(class_names):
                continue
            mask = (pred == torch.tensor(segment)).all(-1)
            _blend(canvas, mask, class_colour(cls))
            ys, xs = mask.nonzero(as_tuple=True)
            labels.append(((xs.float().mean().item(), ys.float().mean().item()), class_names[cls]))
        image = Image.fromarray(canvas.numpy())
    elif task == "detection":
        sx, sy = width / model_size, height / model_size
        for box, score, cls in zip(prediction["boxes"].tolist(), prediction["scores"].tolist(),
                                   prediction["labels"].tolist()):
            if score >= threshold:
                x0, y0, x1, y1 = box
                boxes.append(([x0 * sx, y0 * sy, x1 * sx, y1 * sy], f"{class_names[cls]} {score:.2f}",
                              class_colour(cls)))
    else:
        raise UserError(f"cannot draw a prediction of task {task!r}")
    draw = ImageDraw.Draw(image)
    for xy, text, colour in boxes:
        draw.rectangle(xy, outline=colour, width=2)
        draw.text((xy[0] + 2, xy[1] + 1), text, fill=colour)
    for (x, y), text in labels:
        draw.text((x, y), text, fill=(255, 255, 255), anchor="mm", stroke_width=1, stroke_fill=(0, 0, 0))
    return image


def predict_files(checkpoint, images: list[str | Path], out: str | Path, *, threshold: float = 0.5,
                  runner: Any = None) -> list[Path]:
    """Predict every image file with the dense checkpoint (a folder, or the model `load_dense` returned) and write
    the drawn PNGs: to `out` itself for one image, else into folder `out` as `<image stem>.png`. `runner`: what to
    run instead of the checkpoint's own model, e.g. it with an `--apply` stack (`vitlab.apply_`). Returns the
    written paths."""
    model = checkpoint if isinstance(checkpoint, torch.nn.Module) else load_dense(checkpoint)
    info, config = record(model).dense, record(model).config
    pre = config["preprocessing"]
    names = list(pre["class_names"])
    mean = torch.tensor(pre["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(pre["std"], dtype=torch.float32)[:, None, None]
    size = info["img_size"]

    def transform(im) -> torch.Tensor:   # PIL image -> [C, S, S] normalised, no aspect kept (as coco scenes)
        im = to_channels(im, info["in_chans"]).resize((size, size), Image.BILINEAR)
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).float() / 255.0
        return (pixels.reshape(size, size, -1).permute(2, 0, 1) - mean) / std

    out = Path(out)
    targets = [out] if len(images) == 1 and out.suffix.lower() == ".png" else \
        [out / f"{Path(p).stem}.png" for p in images]
    if len(images) > 1 and out.suffix:
        raise UserError(f"--out {out}: several images write one PNG each into a folder; give a folder")
    written = []
    for path, target in zip(images, targets):
        tensor = load_image_tensor(path, None, transform=transform)
        prediction = predict_dense(model if runner is None else runner, tensor[None], info["task"])[0]
        with Image.open(path) as original:
            drawn = draw_prediction(original, prediction, info["task"], names, model_size=size, threshold=threshold)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            drawn.save(tmp, format="PNG")
        written.append(target)
    return written
