"""A folder of images, one sub-folder per class (torchvision `ImageFolder` layout), read with PIL.

Layouts of `imagefolder:ROOT`:

* `ROOT/train/CLASS/*`, optional `ROOT/val/CLASS/*` and `ROOT/test/CLASS/*`. Without `val/`, val is a seeded 10 %
  hold-out of `train/` (and train the other 90 %); without `test/`, asking for the test split is an error.
  Classes are the sub-folders of `train/`.
* `ROOT/CLASS/*` (flat): test is the whole folder; train/val are a seeded 90/10 split of that same folder, with a
  warning that there is no separate test set.

Every file of the requested split is checked cheaply when the dataset is built (empty? does PIL `verify()` it?);
bad ones are skipped with a warning, or raise DataError if `strict`. A file that still fails to decode later (a
truncated JPEG passes `verify()`) is skipped in `__getitem__`, which warns and returns the next good item instead.
"""
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import v2

from .spec import DataError, DataSpec, DatasetNotFoundError, VisionDataset, check_aug, holdout, to_size, to_stats

__all__ = ["ImageFolderDataset", "IMG_EXTENSIONS", "find_classes", "load_image", "resolve_root"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VAL_FRACTION = 0.1
MAX_WARNINGS = 20  # per dataset build; the rest are summed up in one warning
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def find_classes(root: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `root`; DataError if there are none."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {root}: put images in {root}/CLASS_NAME/ (one sub-folder per class)")
    return classes


def _scan(root: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of every image-extension file under root/CLASS/, sorted; DataError on unknown class folders."""
    extra = sorted(set(find_classes(root)) - set(class_to_idx))
    if extra:
        raise DataError(f"{root} has class folder(s) {extra} that the training classes lack: "
                        f"make the class folders of train/, val/ and test/ match")
    samples = []
    for name, label in class_to_idx.items():
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames.sort()
            samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                        if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    if not samples:
        raise DataError(f"no images in {root}: expected files ending in {', '.join(IMG_EXTENSIONS)} "
                        f"under {root}/CLASS_NAME/")
    return samples


def resolve_root(spec: DataSpec) -> Path:
    """The root folder of an imagefolder spec; DatasetNotFoundError if it does not exist."""
    root = Path(spec.path).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"image folder {root} does not exist: pass an existing folder as 'imagefolder:PATH'")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass a folder with one sub-folder per class as 'imagefolder:PATH'")
    return root


def _split_samples(split: str, root: Path, seed: int) -> tuple[list[str], list[tuple[str, int]], Path]:
    """(classes, samples, folder read) of `split` under `root`, following the layouts in the module docstring."""
    nested = (root / "train").is_dir()
    source = root / "train" if nested else root
    classes = find_classes(source)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    if nested and (split == "test" or (split == "val" and (root / "val").is_dir())):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"{root} has train/ but no test/ folder: add {folder} with one sub-folder per class, "
                            f"or evaluate on split 'val'")
        return classes, _scan(folder, class_to_idx), folder
    samples = _scan(source, class_to_idx)
    if not nested and split == "test":
        return classes, samples, source
    if nested and (root / "val").is_dir():  # split == "train"
        return classes, samples, source
    if not nested:
        warnings.warn(f"{root} has no train/ folder, so there is no separate test set: train and val are a "
                      f"90/10 split of the whole folder, and split 'test' is the whole folder", stacklevel=4)
    if len(samples) < 2:
        raise DataError(f"{source} has {len(samples)} image(s), too few for a train/val hold-out: add images "
                        f"or a {root}/val folder")
    train_idx, val_idx = holdout(len(samples), max(1, round(len(samples) * VAL_FRACTION)), seed)
    return classes, [samples[i] for i in (train_idx if split == "train" else val_idx).tolist()], source


def _check_file(path: str) -> str | None:
    """Why `path` is not a usable image (cheap checks: size, PIL verify), or None if it looks fine."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # verify() raises many types (SyntaxError, struct.error, ...): all mean "bad file"
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def _to_8bit(im: Image.Image) -> Image.Image:
    """Map 16/32-bit integer ('I;16', 'I') and float ('F') images to 'L', scaling their range instead of clipping."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    elif a.size and a.max() > 255:
        a = a / 257.0  # 16-bit range 0..65535 -> 0..255
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), mode="L")


def load_image(path: str, in_chans: int) -> Image.Image:
    """Open `path` and convert it to 'L' (in_chans=1) or 'RGB' (in_chans=3); transparency is composited on white."""
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I") or im.mode == "F":
            im = _to_8bit(im)
        if "A" in im.getbands() or "transparency" in im.info:
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        if in_chans == 1:
            return im.convert("L") if im.mode in ("L", "1", "P", "RGB") else im.convert("RGB").convert("L")
        return im.convert("RGB")


def build_transform(in_chans: int, size: tuple[int, int], mean, std, train_aug: bool, cfg: dict):
    """PIL image -> normalized float tensor (in_chans, H, W): timm's eval transform, or a random train transform."""
    if not train_aug:  # resize the short side to the target (crop_pct=1), then center crop
        return create_transform(input_size=(in_chans, *size), is_training=False, mean=mean, std=std,
                                interpolation="bilinear", crop_pct=1.0)
    # Not timm's create_transform(is_training=True): its RandomResizedCropAndInterpolation and RandomErasing draw from
    # Python's `random`, and the training engine's seeding controls torch's RNG. These torchvision v2 transforms
    # reproduce timm's defaults (RRC scale 0.08..1, hflip 0.5, color jitter 0.4) drawing from torch's RNG.
    tfl = [v2.RandomResizedCrop(size, scale=tuple(cfg["scale"]), ratio=tuple(cfg["ratio"]),
                                interpolation=v2.InterpolationMode.BILINEAR, antialias=True)]
    if cfg["hflip"] > 0:
        tfl.append(v2.RandomHorizontalFlip(cfg["hflip"]))
    if cfg["color_jitter"] > 0:
        cj = float(cfg["color_jitter"])
        tfl.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj if in_chans == 3 else None))
    tfl += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if cfg["re_prob"] > 0:
        tfl.append(v2.RandomErasing(p=cfg["re_prob"], value=0.0))
    return v2.Compose(tfl)


class ImageFolderDataset(VisionDataset):
    """Images of one split of an image folder as normalized float tensors (in_chans, H, W); in_chans is 1 or 3.

    Attributes beyond the common ones: `root` (the folder given), `samples` (list of (path, label)),
    `class_to_idx`, `bad` (paths skipped so far), `strict`.
    """

    AUG_DEFAULTS = {"hflip": 0.5, "re_prob": 0.0, "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "color_jitter": 0.4}

    def __init__(
            self,
            spec: DataSpec | str,
            split: str = "test",
            *,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            mean=(0.5,),
            std=(0.5,),
            train_aug: bool = False,
            aug: dict | None = None,
            strict: bool = False,
            seed: int = 0,
    ):
        size = to_size(img_size)
        if in_chans not in (1, 3):
            raise DataError(f"imagefolder reads images as grayscale (in_chans=1) or RGB (in_chans=3), "
                            f"not in_chans={in_chans}: create the model with in_chans=1 or 3")
        mean, std = to_stats(mean, std, in_chans)
        cfg = check_aug(aug, self.AUG_DEFAULTS, "imagefolder")
        self.spec, self.split, self.strict = DataSpec.parse(spec), split, strict
        self.input_size, self.train_aug = (in_chans, *size), train_aug
        self.root = resolve_root(self.spec)
        self.classes, samples, folder = _split_samples(split, self.root, seed)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.bad: list[str] = []

        reasons = [(path, _check_file(path)) for path, _ in samples]
        for n, (path, reason) in enumerate((p, r) for p, r in reasons if r):
            if strict:
                raise DataError(f"bad image {path}: {reason}: fix or delete it, or pass strict=False to skip bad files")
            self.bad.append(path)
            if n < MAX_WARNINGS:
                warnings.warn(f"skipping {path}: {reason}", stacklevel=3)
        if len(self.bad) > MAX_WARNINGS:
            warnings.warn(f"skipping {len(self.bad) - MAX_WARNINGS} more bad images in {folder} (see .bad)",
                          stacklevel=3)
        self.samples = [s for s, (_, reason) in zip(samples, reasons) if reason is None]
        if not self.samples:
            raise DataError(f"none of the {len(samples)} image files in {folder} is readable: check the files")
        self._labels = [label for _, label in self.samples]
        self._bad_idx: set[int] = set()
        self.transform = build_transform(in_chans, size, mean, std, train_aug, cfg)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for k in range(n):
            j = (index + k) % n
            if j in self._bad_idx:
                continue
            path, label = self.samples[j]
            try:
                image = load_image(path, self.input_size[0])
            except _DECODE_ERRORS as e:
                if self.strict:
                    raise DataError(f"cannot decode image {path} ({e}): fix or delete it, "
                                    f"or pass strict=False to skip bad files") from e
                self._bad_idx.add(j)
                self.bad.append(path)
                warnings.warn(f"skipping {path}: cannot decode it ({e}); returning the next image instead")
                continue
            return self.transform(image).as_subclass(torch.Tensor), label
        raise DataError(f"no image of {self.root} ({self.split}) can be decoded: check the files")
