"""A folder of images, one sub-folder per class (torchvision `ImageFolder` layout), read with PIL.

Layouts of `imagefolder:ROOT`:

* `ROOT/train/CLASS/*`, optional `ROOT/val/CLASS/*` and `ROOT/test/CLASS/*`. Without `val/`, val is a seeded 10 %
  hold-out of `train/` (and train the other 90 %); without `test/`, asking for the test split is an error.
  Classes are the sub-folders of `train/`.
* `ROOT/CLASS/*` (flat): test is the whole folder; train/val are a seeded 90/10 split of that same folder, with a
  warning that there is no separate test set.

Symbolic links are followed once: a link back to a folder already walked (a loop) or to one reached before is not
followed again, and a file reached twice (links, hard links) is counted once, each with a warning. A class folder
without images is kept as a class, with a warning.

Every file of the requested split is checked cheaply when the dataset is built (empty? does PIL `verify()` it?);
bad ones are left out with a warning and listed in `.bad`, or raise DataError if `strict`. A file that still fails
to decode later (a truncated JPEG passes `verify()`): `get_or_skip(i)` returns a `Skipped` record for it (what
`evaluate` uses: the image is dropped and reported, never replaced), while `ds[i]` (training loaders) warns and
returns the next good item instead. With `strict`, both raise DataError.

Evaluation images go through `vitlab.data.transforms.image_transform` (the one preprocessing of every verb); file
and class names that are not UTF-8 are shown with \\xNN escapes (`classes` holds those display names).
"""
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from .spec import DataError, DataSpec, DatasetNotFoundError, VisionDataset, check_aug, holdout, to_size, to_stats
from .transforms import CROP_MODES, INTERPOLATIONS, Preprocessing, display_name, image_transform, to_channels

__all__ = ["ImageFolderDataset", "IMG_EXTENSIONS", "Skipped", "find_classes", "load_image", "resolve_root"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VAL_FRACTION = 0.1
MAX_WARNINGS = 20  # per dataset build; the rest are summed up in one warning
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Skipped:
    """An item that could not be read: its file (display name) and why."""

    path: str
    reason: str


def find_classes(root: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `root` (as on disk); DataError if there are none."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {display_name(str(root))}: put images in "
                        f"{display_name(str(root))}/CLASS_NAME/ (one sub-folder per class)")
    return classes


class _Notes:
    """Warnings of one dataset build, the first MAX_WARNINGS shown and the rest counted in one line."""

    def __init__(self):
        self.count = 0

    def warn(self, message: str) -> None:
        self.count += 1
        if self.count <= MAX_WARNINGS:
            warnings.warn(message, stacklevel=4)

    def close(self, where: str) -> None:
        if self.count > MAX_WARNINGS:
            warnings.warn(f"{self.count - MAX_WARNINGS} more warnings about {where} not shown", stacklevel=4)


def _file_key(path: str):
    """What identifies a file (device, inode, following links), or None where it cannot be stat'ed (dangling)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(class_dir: str, seen_dirs: dict, seen_files: dict, notes: _Notes) -> list[str]:
    """Image files under class_dir, sorted, each folder and file once (links followed once, loops cut)."""
    key = _file_key(class_dir)
    if key in seen_dirs:
        notes.warn(f"not reading {display_name(class_dir)}: it is the folder {display_name(seen_dirs[key])} again "
                   f"(a symbolic link)")
        return []
    seen_dirs[key] = class_dir
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            sub = os.path.join(dirpath, d)
            key = _file_key(sub)
            if key is None:
                continue
            if key in seen_dirs:
                target, here = os.path.realpath(sub), os.path.realpath(dirpath)
                loop = here == target or here.startswith(target + os.sep)
                notes.warn(f"not following {display_name(sub)}: "
                           f"{'a symbolic link loop' if loop else 'a folder already read'} "
                           f"({display_name(seen_dirs[key])})")
                continue
            seen_dirs[key] = sub
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if f.startswith(".") or not f.lower().endswith(IMG_EXTENSIONS):
                continue
            path = os.path.join(dirpath, f)
            key = _file_key(path)
            if key is not None and key in seen_files:
                notes.warn(f"counting {display_name(path)} once: it is the same file as "
                           f"{display_name(seen_files[key])} (a link)")
                continue
            if key is not None:
                seen_files[key] = path
            files.append(path)
    return files


def _scan(root: Path, class_dirs: list[str], labels: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of every image-extension file under root/CLASS/; DataError on unknown class folders."""
    extra = sorted(set(find_classes(root)) - set(labels))
    if extra:
        raise DataError(f"{display_name(str(root))} has class folder(s) {[display_name(e) for e in extra]} that the "
                        f"training classes lack: make the class folders of train/, val/ and test/ match")
    samples, notes, seen_dirs, seen_files, empty = [], _Notes(), {}, {}, []
    for name in class_dirs:
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        files = _walk(str(class_dir), seen_dirs, seen_files, notes)
        if not files:
            empty.append(name)
        samples += [(f, labels[name]) for f in files]
    if not samples:
        raise DataError(f"no images in {display_name(str(root))}: expected files ending in "
                        f"{', '.join(IMG_EXTENSIONS)} under {display_name(str(root))}/CLASS_NAME/")
    for name in empty:
        notes.warn(f"class folder {display_name(str(root / name))} has no images: class {display_name(name)!r} "
                   f"gets no samples here")
    notes.close(display_name(str(root)))
    return samples


def resolve_root(spec: DataSpec) -> Path:
    """The root folder of an imagefolder spec; DatasetNotFoundError if it does not exist."""
    root = Path(spec.path).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"image folder {display_name(str(root))} does not exist: pass an existing folder "
                                   f"as 'imagefolder:PATH'")
    if not root.is_dir():
        raise DataError(f"{display_name(str(root))} is not a folder: pass a folder with one sub-folder per class as "
                        f"'imagefolder:PATH'")
    return root


def _label_order(found: list[str], classes: list[str] | None, folder: Path) -> list[str]:
    """The class folders in label order: sorted, or `classes` (display names, a permutation of the found ones)."""
    if classes is None:
        return found
    by_name = {display_name(c): c for c in found}
    if sorted(by_name) != sorted(classes):
        raise DataError(f"{display_name(str(folder))} has class folders {sorted(by_name)}, not the classes "
                        f"{list(classes)} asked for: use data with those classes")
    return [by_name[c] for c in classes]


def _split_samples(split: str, root: Path, seed: int, classes: list[str] | None = None
                   ) -> tuple[list[str], list[tuple[str, int]], Path]:
    """(class folders in label order, samples, folder read) of `split` under `root`, as the module docstring says."""
    nested = (root / "train").is_dir()
    source = root / "train" if nested else root
    class_dirs = _label_order(find_classes(source), classes, source)
    labels = {c: i for i, c in enumerate(class_dirs)}
    if nested and (split == "test" or (split == "val" and (root / "val").is_dir())):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"{display_name(str(root))} has train/ but no test/ folder: add "
                            f"{display_name(str(folder))} with one sub-folder per class, or evaluate on split 'val'")
        return class_dirs, _scan(folder, class_dirs, labels), folder
    samples = _scan(source, class_dirs, labels)
    if not nested and split == "test":
        return class_dirs, samples, source
    if nested and (root / "val").is_dir():  # split == "train"
        return class_dirs, samples, source
    if not nested:
        warnings.warn(f"{display_name(str(root))} has no train/ folder, so there is no separate test set: train and "
                      f"val are a 90/10 split of the whole folder, and split 'test' is the whole folder", stacklevel=4)
    if len(samples) < 2:
        raise DataError(f"{display_name(str(source))} has {len(samples)} image(s), too few for a train/val hold-out: "
                        f"add images or a {display_name(str(root))}/val folder")
    train_idx, val_idx = holdout(len(samples), max(1, round(len(samples) * VAL_FRACTION)), seed)
    return class_dirs, [samples[i] for i in (train_idx if split == "train" else val_idx).tolist()], source


def _check_file(path: str) -> str | None:
    """Why `path` is not a usable image (cheap checks: size, PIL verify), or None if it looks fine."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # verify() raises many types (SyntaxError, struct.error, ...): all mean "bad file"
        return f"not a readable image ({type(e).__name__}: {display_name(str(e))})"
    return None


def load_image(path: str, in_chans: int) -> Image.Image:
    """Open `path` and convert it to 'L' (in_chans=1) or 'RGB' (in_chans=3) with `transforms.to_channels`."""
    with Image.open(path) as im:
        im.load()
        return to_channels(im, in_chans)


def build_transform(in_chans: int, size: tuple[int, int], mean, std, train_aug: bool, cfg: dict,
                    interpolation: str = "bilinear", crop_pct: float = 1.0, crop_mode: str = "center"):
    """PIL image (any mode) -> normalized float tensor (in_chans, H, W): the eval preprocessing
    (`transforms.image_transform`), or a random train transform after the same channel conversion."""
    if not train_aug:
        return image_transform(Preprocessing(input_size=(in_chans, *size), mean=tuple(mean), std=tuple(std),
                                             interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode))
    # Not timm's create_transform(is_training=True): its RandomResizedCropAndInterpolation and RandomErasing draw from
    # Python's `random`, and the training engine's seeding controls torch's RNG. These torchvision v2 transforms
    # reproduce timm's defaults (RRC scale 0.08..1, hflip 0.5, color jitter 0.4) drawing from torch's RNG.
    tfl = [v2.Lambda(functools.partial(to_channels, in_chans=in_chans)),
           v2.RandomResizedCrop(size, scale=tuple(cfg["scale"]), ratio=tuple(cfg["ratio"]),
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

    `interpolation`, `crop_pct`, `crop_mode`: the eval preprocessing (see `vitlab.data.transforms`); the defaults
    resize the short side (bilinear) and crop the centre. `classes`: the class names in the order the model's
    outputs have them (a permutation of the class folders; default: sorted).

    Attributes beyond the common ones: `root` (the folder given), `samples` (list of (path, label)),
    `class_to_idx`, `bad` (display names of the files left out so far), `strict`.
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
            interpolation: str = "bilinear",
            crop_pct: float = 1.0,
            crop_mode: str = "center",
            classes: list[str] | None = None,
    ):
        size = to_size(img_size)
        if in_chans not in (1, 3):
            raise DataError(f"imagefolder reads images as grayscale (in_chans=1) or RGB (in_chans=3), "
                            f"not in_chans={in_chans}: create the model with in_chans=1 or 3")
        mean, std = to_stats(mean, std, in_chans)
        cfg = check_aug(aug, self.AUG_DEFAULTS, "imagefolder")
        if interpolation not in INTERPOLATIONS or crop_mode not in CROP_MODES or not 0 < crop_pct <= 1:
            raise DataError(f"imagefolder: interpolation={interpolation!r}, crop_pct={crop_pct!r}, "
                            f"crop_mode={crop_mode!r}: use one of {', '.join(INTERPOLATIONS)}, a crop_pct in (0, 1] "
                            f"and one of {', '.join(CROP_MODES)}")
        self.spec, self.split, self.strict = DataSpec.parse(spec), split, strict
        self.input_size, self.train_aug = (in_chans, *size), train_aug
        self.root = resolve_root(self.spec)
        class_dirs, samples, folder = _split_samples(split, self.root, seed, classes)
        self.classes = [display_name(c) for c in class_dirs]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.bad: list[str] = []

        reasons = [(path, _check_file(path)) for path, _ in samples]
        for n, (path, reason) in enumerate((p, r) for p, r in reasons if r):
            if strict:
                raise DataError(f"bad image {display_name(path)}: {reason}: fix or delete it, or leave out --strict "
                                f"(strict=False) to skip bad files")
            self.bad.append(display_name(path))
            if n < MAX_WARNINGS:
                warnings.warn(f"skipping {display_name(path)}: {reason}", stacklevel=3)
        if len(self.bad) > MAX_WARNINGS:
            warnings.warn(f"skipping {len(self.bad) - MAX_WARNINGS} more bad images in {display_name(str(folder))} "
                          f"(see .bad)", stacklevel=3)
        self.samples = [s for s, (_, reason) in zip(samples, reasons) if reason is None]
        if not self.samples:
            raise DataError(f"none of the {len(samples)} image files in {display_name(str(folder))} is readable: "
                            f"check the files")
        self._labels = [label for _, label in self.samples]
        self._bad_idx: set[int] = set()
        self.transform = build_transform(in_chans, size, mean, std, train_aug, cfg, interpolation=interpolation,
                                         crop_pct=crop_pct, crop_mode=crop_mode)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, j: int) -> torch.Tensor:
        path = self.samples[j][0]
        try:
            with Image.open(path) as im:
                im.load()
                return self.transform(im).as_subclass(torch.Tensor)
        except _DECODE_ERRORS as e:
            reason = f"cannot decode it ({type(e).__name__}: {display_name(str(e))})"
            if self.strict:
                raise DataError(f"cannot decode image {display_name(path)} ({display_name(str(e))}): fix or delete "
                                f"it, or leave out --strict (strict=False) to skip bad files") from e
            self._bad_idx.add(j)
            if display_name(path) not in self.bad:
                self.bad.append(display_name(path))
            raise _Undecodable(reason) from e

    def get_or_skip(self, index: int) -> "tuple[torch.Tensor, int] | Skipped":
        """Item `index`, or a `Skipped` record (with a warning) if its file cannot be decoded; never another item."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        path = display_name(self.samples[index][0])
        if index in self._bad_idx:
            return Skipped(path, "cannot decode it")
        try:
            return self._read(index), self._labels[index]
        except _Undecodable as e:
            warnings.warn(f"skipping {path}: {e}")
            return Skipped(path, str(e))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Item `index`; for a file that cannot be decoded, a warning and the next good item (training loaders need
        an item; `evaluate` uses `get_or_skip`, which drops it instead)."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for k in range(n):
            j = (index + k) % n
            if j in self._bad_idx:
                continue
            try:
                return self._read(j), self._labels[j]
            except _Undecodable as e:
                warnings.warn(f"skipping {display_name(self.samples[j][0])}: {e}; returning the next image instead")
        raise DataError(f"no image of {display_name(str(self.root))} ({self.split}) can be decoded: check the files")


class _Undecodable(Exception):
    pass
