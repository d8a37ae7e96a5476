"""Fashion-MNIST from its four idx files, kept in memory as uint8 and transformed per item with tensor ops.

Splits: `train` = the 60,000 training images minus a fixed 5,000-image hold-out (`val`), chosen by a
`torch.Generator().manual_seed(seed)` permutation; `test` = the 10,000 t10k images. `fashion-mnist:imbalance=R`
keeps a long-tailed subset of `train` (CIFAR-LT's exponential profile, `long_tail_counts`); val and test stay balanced.
`fashion-mnist:percent=P` keeps a seeded stratified P % of `train` (few-label fine-tuning, `stratified_subset`).
"""
import functools
import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from .spec import DataError, DataSpec, DatasetNotFoundError, VisionDataset, check_aug, holdout, to_size, to_stats

__all__ = ["FashionMNIST", "FMNIST_DIR", "FMNIST_CLASSES", "FMNIST_MEAN", "FMNIST_STD", "read_idx", "load_split",
           "long_tail_counts", "long_tail_subset", "stratified_subset"]

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
NATIVE_SHAPE = (1, 28, 28)
VAL_SIZE = 5000
_FILES = {  # source -> (images, labels) file stems; each is read as STEM.gz, or STEM if that is absent
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08
_REFETCH = "reinstall it with 'apt-get install --reinstall dataset-fashion-mnist' or pass --data-dir DIR"


def find_file(data_dir: str | os.PathLike, stem: str) -> Path:
    """Path of `STEM.gz` (or plain `STEM`) in `data_dir`; DatasetNotFoundError if neither exists."""
    for name in (f"{stem}.gz", stem):
        path = Path(data_dir) / name
        if path.is_file():
            return path
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found in {data_dir} (missing {stem}.gz): "
        f"install it with 'apt-get install dataset-fashion-mnist' or pass --data-dir DIR")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Decode an idx ubyte file (gzip or plain) to a uint8 tensor; cached per process on (path, mtime, size)."""
    st = os.stat(path)
    return _read_idx_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> torch.Tensor:
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path} is truncated or corrupt ({e}): {_REFETCH}") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _IDX_UBYTE or data[3] not in (1, 3):
        raise DataError(f"{path} is not an idx ubyte file (header {data[:4].hex() or 'empty'}, "
                        f"expected 00000801 or 00000803): {_REFETCH}")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path} is truncated ({len(data)} bytes, header alone needs {offset}): {_REFETCH}")
    shape = struct.unpack(f">{ndim}I", data[4:offset])
    expected = offset + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path} is truncated or padded: {len(data)} bytes, expected {expected} "
                        f"for shape {shape}: {_REFETCH}")
    array = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()
    return torch.from_numpy(array)


def load_split(data_dir: str | os.PathLike, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of the 'train' or 'test' idx files, checked for consistency."""
    image_path, label_path = (find_file(data_dir, stem) for stem in _FILES[source])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dim() != 3 or tuple(images.shape[1:]) != NATIVE_SHAPE[1:]:
        raise DataError(f"{image_path} holds images of shape {tuple(images.shape)}, expected (N, 28, 28): {_REFETCH}")
    if labels.dim() != 1 or len(labels) != len(images):
        raise DataError(f"{label_path} holds {tuple(labels.shape)} labels for {len(images)} images "
                        f"in {image_path}: {_REFETCH}")
    if int(labels.max()) >= len(FMNIST_CLASSES):
        raise DataError(f"{label_path} has label {int(labels.max())}, expected 0..9: {_REFETCH}")
    return images.unsqueeze(1), labels.long()


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Images kept per class: n_i = int(n_max * (1 / imbalance) ** (i / (C - 1))), class 0 the most frequent.

    The "exp" profile of CIFAR-10/100-LT (Cao et al., LDAM-DRW, 2019), as DeiT-LT builds it
    (val-iisc/DeiT-LT@bc36970 datasets.py `get_img_num_per_cls`, with imb_factor = 1 / imbalance).
    """
    return [int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def long_tail_subset(indices: torch.Tensor, labels: torch.Tensor, imbalance: float, seed: int) -> torch.Tensor:
    """The sorted subset of `indices` (with `labels`, both (N,)) that keeps `long_tail_counts` images per class,
    n_max being the smallest class's count; each class's images are a seeded random choice."""
    num_classes = int(labels.max()) + 1
    per_class = [indices[labels == c] for c in range(num_classes)]
    counts = long_tail_counts(min(len(rows) for rows in per_class), num_classes, imbalance)
    gen = torch.Generator().manual_seed(seed)
    kept = [rows[torch.randperm(len(rows), generator=gen)[:n]] for rows, n in zip(per_class, counts)]
    return torch.cat(kept).sort().values


def stratified_subset(indices: torch.Tensor, labels: torch.Tensor, percent: int, seed: int) -> torch.Tensor:
    """The sorted subset of `indices` (with `labels`, both (N,)) keeping round(n_c * percent / 100) (at least 1) of
    each class's n_c images, a seeded random choice per class: the label share of every class stays as it was."""
    gen = torch.Generator().manual_seed(seed)
    kept = []
    for c in labels.unique().tolist():
        rows = indices[labels == c]
        kept.append(rows[torch.randperm(len(rows), generator=gen)[:max(1, round(len(rows) * percent / 100))]])
    return torch.cat(kept).sort().values


class FashionMNIST(VisionDataset):
    """Fashion-MNIST as normalized float tensors (1, H, W); resized (bilinear, antialias) when img_size != 28.

    Per item: uint8 -> normalized float in one op, then optional resize, then (train_aug) random crop with
    `crop_padding` zero pixels (zero *before* normalization), horizontal flip with prob `hflip`, and random erasing
    with prob `re_prob`. Augmentation draws from torch's global RNG only. Normalization commutes with bilinear
    resizing (its weights sum to 1), so it is done first.

    Attributes beyond the common ones: `images` (all images of the source file, uint8), `indices` (LongTensor of
    this split's rows in that file), `data_dir`.
    """

    AUG_DEFAULTS = {"hflip": 0.5, "crop_padding": None, "re_prob": 0.0}  # crop_padding None -> min(H, W) // 14

    def __init__(
            self,
            split: str = "test",
            *,
            img_size: int | tuple[int, int] = 28,
            in_chans: int = 1,
            mean=FMNIST_MEAN,
            std=FMNIST_STD,
            train_aug: bool = False,
            aug: dict | None = None,
            data_dir: str | os.PathLike | None = None,
            seed: int = 0,
            imbalance: int = 1,
            percent: int = 100,
    ):
        size = to_size(img_size)
        if isinstance(imbalance, bool) or not isinstance(imbalance, int) or imbalance < 1:
            raise DataError(f"imbalance={imbalance!r} must be an int >= 1 (most / fewest images per class), e.g. 100")
        if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
            raise DataError(f"percent={percent!r} must be an int in 1..100 (the share of train images kept), e.g. 10")
        if in_chans != 1:
            raise DataError(f"fashion-mnist images are 1x28x28 but the model expects {in_chans}x{size[0]}x{size[1]}: "
                            f"create the model with in_chans=1")
        (mean,), (std,) = to_stats(mean, std, 1)
        cfg = check_aug(aug, self.AUG_DEFAULTS, "fashion-mnist")
        options = (("imbalance", str(imbalance)),) if imbalance != 1 else ()
        options += (("percent", str(percent)),) if percent != 100 else ()
        self.spec, self.split, self.classes = DataSpec("fashion-mnist", options=options), split, list(FMNIST_CLASSES)
        self.input_size, self.train_aug = (1, *size), train_aug
        self.data_dir = str(data_dir or FMNIST_DIR)

        self.images, labels = load_split(self.data_dir, "test" if split == "test" else "train")
        if split == "test":
            self.indices = torch.arange(len(self.images))
        else:
            train_idx, val_idx = holdout(len(self.images), VAL_SIZE, seed)
            self.indices = train_idx if split == "train" else val_idx
            if split == "train" and imbalance != 1:
                self.indices = long_tail_subset(train_idx, labels[train_idx], imbalance, seed)
            if split == "train" and percent != 100:
                self.indices = stratified_subset(self.indices, labels[self.indices], percent, seed)
        self._rows = self.indices.tolist()
        self._labels = labels[self.indices].tolist()

        # x_norm = (x / 255 - mean) / std = bias + scale * x, computed as one torch.add from the uint8 image
        self._scale, self._bias = 1.0 / (255.0 * std), torch.tensor(-mean / std)
        self._fill = -mean / std  # a zero pixel, normalized
        self._resize = size != NATIVE_SHAPE[1:]
        self._antialias = min(size) < min(NATIVE_SHAPE[1:])  # antialiasing only changes downsampling
        self.hflip, self.re_prob = float(cfg["hflip"]), float(cfg["re_prob"])
        self.crop_padding = min(size) // 14 if cfg["crop_padding"] is None else cfg["crop_padding"]
        if self.crop_padding >= min(size):
            raise DataError(f"aug crop_padding={self.crop_padding} must be smaller than the image "
                            f"({size[0]}x{size[1]}): "
                            f"use e.g. crop_padding={min(size) // 14}")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self._rows[index]
        x = torch.add(self._bias, self.images[row], alpha=self._scale)  # (1, 28, 28) float32, normalized
        if self._resize:
            x = F.interpolate(x[None], size=self.input_size[1:], mode="bilinear", antialias=self._antialias,
                              align_corners=False)[0]
        if self.train_aug:
            x = self._augment(x)
        return x, self._labels[index]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop from the zero-padded image, horizontal flip, random erasing; one torch.rand draw."""
        _, h, w = x.shape
        p = self.crop_padding
        r = torch.rand(4).tolist()
        oy, ox = int(r[0] * (2 * p + 1)) - p, int(r[1] * (2 * p + 1)) - p  # shift of the crop window, in [-p, p]
        if oy or ox:
            out = torch.full_like(x, self._fill)
            out[:, max(0, -oy):h - max(0, oy), max(0, -ox):w - max(0, ox)] = \
                x[:, max(0, oy):h + min(0, oy), max(0, ox):w + min(0, ox)]
            x = out
        if r[2] < self.hflip:
            x = x.flip(-1)
        if r[3] < self.re_prob:
            x = random_erase(x)
        return x


def random_erase(x: torch.Tensor, scale=(0.02, 0.33), ratio=(0.3, 3.3), value: float = 0.0) -> torch.Tensor:
    """Set a random rectangle of `x` (C, H, W) to `value` (0 = the mean after normalization); torch RNG only.

    The parameters and sampling are those of torchvision's `v2.RandomErasing`, which costs ~150 us per call here
    (transform dispatch overhead) against ~15 us for this function.
    """
    _, h, w = x.shape
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        r = torch.rand(4).tolist()
        area = h * w * (scale[0] + (scale[1] - scale[0]) * r[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * r[1])
        eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if eh < h and ew < w:
            top, left = int(r[2] * (h - eh + 1)), int(r[3] * (w - ew + 1))
            x = x.clone()
            x[:, top:top + eh, left:left + ew] = value
            return x
    return x
