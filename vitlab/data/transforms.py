"""One preprocessing for every verb that reads image files (eval on an image folder, predict, explain, calibration).

    pre = resolve_preprocessing(model)      # from the checkpoint's config.json, else the model's timm pretrained_cfg
    x = image_transform(pre)(pil_image)     # any PIL mode -> normalized float tensor (C, H, W)
    x = load_image_tensor("photo.jpg", pre) # the same, from a file; one-line DataError for a bad file
    ds = dataset_for_model(model, "imagefolder:DIR", "test")   # classes checked against the checkpoint's first

As timm's `resolve_data_config` + `create_transform(is_training=False)`: the short side is resized to
`floor(size / crop_pct)` with the checkpoint's interpolation, then the centre is cropped (`crop_mode` 'squash' resizes
both sides instead). The image is first converted to the model's channels: 'L' for in_chans=1, 'RGB' for 3; alpha is
composited on white, 16-bit and float images are scaled to 8 bits, and the EXIF orientation is applied.

Fashion-MNIST's idx files are not image files: `FashionMNIST` keeps its own tensor pipeline (bilinear resize when the
model's size is not 28), which is what every Fashion-MNIST checkpoint was trained and measured with.
"""
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform

from ..record import record
from ..checkpoint import default_preprocessing, is_checkpoint, load_config
from .spec import DataError, DataSpec, to_stats

__all__ = ["Preprocessing", "resolve_preprocessing", "image_transform", "load_image_tensor", "to_channels",
           "check_classes", "check_source_classes", "dataset_for_model", "display_name", "INTERPOLATIONS",
           "CROP_MODES"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
MAX_LISTED = 20  # class names shown per list in an error message


def display_name(text: str) -> str:
    """A file or class name that prints and serializes: undecodable bytes (a non-UTF-8 name) become \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for one model. `class_names` is None where the checkpoint does not know them
    (only placeholder names '0', '1', ... were stored); `num_classes` is None where the model does not say."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    source: str = "the model"  # names the checkpoint (or model) in messages

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        return out


def _modules(obj) -> list:
    """obj and the modules a runner wraps (`module`, `float_module`), in that order."""
    seen, out = set(), []
    for candidate in (obj, getattr(obj, "module", None), getattr(obj, "float_module", None)):
        if candidate is not None and id(candidate) not in seen:
            seen.add(id(candidate))
            out.append(candidate)
    return out


def resolve_preprocessing(model_or_runner) -> Preprocessing:
    """The preprocessing a model (or runner, or checkpoint-built model) expects.

    Each value comes from the first that has it: the checkpoint's config.json `preprocessing` (for a model built by
    `create_model(DIR)`), the model's timm `pretrained_cfg`, then defaults (bilinear, crop_pct 1, centre crop, mean and
    std 0.5). The input size is the runner's or model's actual one (a model built with another img_size says so).
    """
    config, pretrained, base, size, num_classes = {}, {}, None, None, None
    for m in _modules(model_or_runner):
        config = config or record(m).config
        pretrained = pretrained or dict(getattr(m, "pretrained_cfg", None) or {})
        if base is None and isinstance(m, torch.nn.Module):
            try:
                base = default_preprocessing(m)
            except ValueError:  # no input size to tell: the saved config must say it
                pass
        size = size or getattr(m, "input_size", None)  # a runner's
        num_classes = num_classes or getattr(m, "num_classes", None)
    saved = dict(config.get("preprocessing") or {}) if isinstance(config.get("preprocessing"), dict) else {}
    values = {**(base or {}), **{k: v for k, v in saved.items() if v is not None}}
    source, name = "", ""
    for m in _modules(model_or_runner):
        source = source or str((record(m).checkpoint or {}).get("path") or "")
        name = name or str((record(m).spec or {}).get("name") or "")
    source = f"checkpoint {source}" if source else f"model {name}" if name else "the model"

    size = tuple(int(v) for v in (size or (base or saved).get("input_size") or ()))  # the model's actual size
    if len(size) != 3 or min(size) < 1:
        raise DataError(f"{source} does not say its input size (C, H, W): store 'input_size' in its config.json "
                        f"'preprocessing', e.g. [3, 224, 224]")
    mean, std = to_stats(values.get("mean", (0.5,)), values.get("std", (0.5,)), size[0])
    interpolation = str(values.get("interpolation") or pretrained.get("interpolation") or "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"{source}: interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}: "
                        f"fix 'interpolation' in its config.json 'preprocessing'")
    crop_pct = values.get("crop_pct", pretrained.get("crop_pct"))
    crop_pct = 1.0 if crop_pct is None else crop_pct
    if not isinstance(crop_pct, (int, float)) or isinstance(crop_pct, bool) or not 0 < crop_pct <= 1:
        raise DataError(f"{source}: crop_pct {crop_pct!r} must be a number in (0, 1]: "
                        f"fix 'crop_pct' in its config.json 'preprocessing'")
    crop_mode = str(values.get("crop_mode") or pretrained.get("crop_mode") or "center")
    if crop_mode not in CROP_MODES:
        raise DataError(f"{source}: crop_mode {crop_mode!r} is not one of {', '.join(CROP_MODES)}")
    if not num_classes and saved.get("class_names"):
        num_classes = len(saved["class_names"])
    names = _known_names(saved.get("class_names"), num_classes)
    return Preprocessing(input_size=size, mean=mean, std=std, interpolation=interpolation, crop_pct=float(crop_pct),
                         crop_mode=crop_mode, num_classes=int(num_classes) if num_classes else None,
                         class_names=names, source=source)


def _known_names(names, num_classes: int | None) -> tuple[str, ...] | None:
    """Stored class names, or None for placeholders ('0', '1', ... from default_preprocessing) and stale lists."""
    if not isinstance(names, (list, tuple)) or not names:
        return None
    names = tuple(str(n) for n in names)
    if names == tuple(str(i) for i in range(len(names))) or (num_classes and len(names) != num_classes):
        return None
    return names


def _as_preprocessing(model_or_pre) -> Preprocessing:
    return model_or_pre if isinstance(model_or_pre, Preprocessing) else resolve_preprocessing(model_or_pre)


# ------------------------------------------------------------------------------------------------ reading images

def to_channels(im, in_chans: int):
    """A PIL image of any mode as 'L' (in_chans=1) or 'RGB' (in_chans=3).

    16/32-bit integer and float images are scaled to 8 bits (not clipped), transparency (alpha, or a palette's
    transparent index) is composited on white, CMYK / YCbCr / LAB / palette images are converted, and the EXIF
    orientation is applied.
    """
    if in_chans not in (1, 3):
        raise DataError(f"image files are read as grayscale (in_chans=1) or RGB (in_chans=3), not in_chans={in_chans}:"
                        f" create the model with in_chans=1 or 3")
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001  (a damaged EXIF block: keep the pixels as stored)
        pass
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif a.size and a.max() > 255:
            a = a / 257.0  # 16-bit range 0..65535 -> 0..255
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), mode="L")
    if im.has_transparency_data:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    if in_chans == 1:
        return im.convert("L") if im.mode in ("L", "1", "P", "RGB") else im.convert("RGB").convert("L")
    return im.convert("RGB")


def image_transform(model_or_pre):
    """PIL image (any mode) -> normalized float tensor (C, H, W), as the model's data config says (timm's eval
    transform after `to_channels`)."""
    pre = _as_preprocessing(model_or_pre)
    c, h, w = pre.input_size
    tf = create_transform(input_size=(c, h, w), is_training=False, mean=pre.mean, std=pre.std,
                          interpolation=pre.interpolation, crop_pct=pre.crop_pct, crop_mode=pre.crop_mode)

    def transform(im) -> torch.Tensor:
        return tf(to_channels(im, c)).as_subclass(torch.Tensor)

    transform.preprocessing = pre
    return transform


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def load_image_tensor(path: str | os.PathLike, model_or_pre, transform=None) -> torch.Tensor:
    """One image file -> normalized float tensor (C, H, W); a missing, empty or undecodable file is a one-line
    DataError naming it."""
    path = Path(path)
    shown = display_name(str(path))
    if path.is_dir():
        raise DataError(f"{shown} is a folder, not an image file: pass image files (e.g. {shown}/*.png), or "
                        f"evaluate a folder of class sub-folders with `vitlab eval CHECKPOINT --data imagefolder:DIR`")
    if not path.is_file():
        raise DataError(f"image {shown} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"image {shown} is empty (0 bytes): pass an image file")
    transform = transform or image_transform(model_or_pre)
    try:
        with Image.open(path) as im:
            im.load()
            return transform(im)
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {shown}: {display_name(str(e)) or type(e).__name__}: "
                        f"pass an image file PIL can decode (PNG, JPEG, ...)") from None


# ------------------------------------------------------------------------------------------------ class checks

def _listing(names) -> str:
    names = [display_name(str(n)) for n in names]
    shown = ", ".join(names[:MAX_LISTED])
    return f"[{shown}{f', ... (+{len(names) - MAX_LISTED} more)' if len(names) > MAX_LISTED else ''}]"


def check_classes(model_or_pre, classes, data: str | DataSpec) -> list[str] | None:
    """Compare the model's classes with a dataset's, before any image is read.

    Returns None when labels can be used as they are, or the dataset's classes in the model's order when the names
    are the same set in another order (only an image folder can be relabelled so: the caller passes it as
    `classes=`; a warning says so). A different count, or different names, is a one-line DataError with both lists.
    Synthetic data has no real names: only its count is compared.
    """
    pre = _as_preprocessing(model_or_pre)
    spec = DataSpec.parse(data)
    classes = [str(c) for c in classes]
    theirs = f"{spec} has {len(classes)} {_listing(classes)}"
    fix = (f"evaluate it on data with the same classes, or fine-tune it on this data "
           f"(vitlab train --init CHECKPOINT --data {spec} --out DIR)")
    mine = pre.class_names
    if pre.num_classes and pre.num_classes != len(classes):
        listed = _listing(mine) if mine else "(names not stored)"
        raise DataError(f"{pre.source} has {pre.num_classes} classes {listed} but {theirs}: {fix}")
    if mine is None or spec.kind == "synthetic" or list(mine) == classes:
        return None
    if sorted(mine) != sorted(classes) or len(set(mine)) != len(mine):
        raise DataError(f"{pre.source} has classes {_listing(mine)} but {theirs}: the names differ; {fix}")
    if spec.kind != "imagefolder":
        raise DataError(f"{pre.source} has classes {_listing(mine)} but {theirs}: the same names in another order, "
                        f"which {spec.kind} cannot be relabelled to; {fix}")
    warnings.warn(f"{spec}: class folders {_listing(classes)} are labelled in {pre.source}'s order "
                  f"{_listing(mine)} (matched by name)", stacklevel=2)
    return list(mine)


def check_source_classes(source, data: str | DataSpec, data_dir: str | None = None) -> None:
    """`check_classes` for a checkpoint folder from its config.json alone (no model built, no image read), so a
    verb can refuse mismatched data before loading or calibrating anything. A model name passes (checked later)."""
    from .build import dataset_info  # here: .build imports this module

    if not is_checkpoint(source):
        return
    config = load_config(source)
    saved = config.get("preprocessing") if isinstance(config.get("preprocessing"), dict) else {}
    names = saved.get("class_names")
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    num = (model.get("kwargs") if isinstance(model.get("kwargs"), dict) else {}).get("num_classes")
    if not (isinstance(num, int) and not isinstance(num, bool) and num > 0):
        num = len(names) if isinstance(names, list) and names else None  # default_preprocessing lists one per class
    pre = Preprocessing(input_size=(1, 1, 1), mean=(0.0,), std=(1.0,), num_classes=num,
                        class_names=_known_names(names, num), source=f"checkpoint {source}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a relabelling is announced when the dataset is built
        check_classes(pre, dataset_info(data, data_dir)["classes"], data)


def dataset_for_model(model_or_runner, data: str | DataSpec, split: str, *, data_dir: str | None = None,
                      strict: bool = False, check: bool = True):
    """The dataset `data`/`split` preprocessed as `resolve_preprocessing(model)` says, with the model's classes
    checked against the dataset's first (`check_classes`; an image folder in another order is relabelled)."""
    from .build import build_dataset, dataset_info  # here: .build imports this module

    pre = resolve_preprocessing(model_or_runner)
    order = check_classes(pre, dataset_info(data, data_dir)["classes"], data) if check else None
    c, h, w = pre.input_size
    return build_dataset(data, split, img_size=(h, w), in_chans=c, mean=pre.mean, std=pre.std, data_dir=data_dir,
                         strict=strict, interpolation=pre.interpolation, crop_pct=pre.crop_pct,
                         crop_mode=pre.crop_mode, classes=order)

