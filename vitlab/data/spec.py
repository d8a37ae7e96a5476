"""Dataset specs (`fashion-mnist`, `imagefolder:PATH`, `synthetic:n=64,classes=5`), errors and shared helpers.

Nothing here touches the disk: parsing a spec only checks its syntax.
"""
from ..errors import UserError
from dataclasses import dataclass
from numbers import Real
from typing import Any, Sequence

import torch

__all__ = ["SPLITS", "KINDS", "DataSpec", "DataError", "DatasetNotFoundError"]

SPLITS = ("train", "val", "test")
KINDS = ("fashion-mnist", "imagefolder", "synthetic", "moving-fashion-mnist", "moving-fashion-mnist-cls",
         "moving-fashion-mnist-pose",
         "moving-fashion-mnist-events", "videofolder",
         "fmnist-scenes", "coco")
DENSE_KINDS = ("fmnist-scenes", "coco")  # items (image, target dict) for --task panoptic|semantic|detection
_ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "image-folder": "imagefolder"}
SYNTHETIC_DEFAULTS = {"n": 256, "classes": 10, "frames": 0}   # frames=T: clips (C, T, H, W)
# fashion-mnist:imbalance=R: a long-tailed train split, n_i = n_max * (1/R)^(i/(C-1)) (fashion_mnist.long_tail_counts)
# fashion-mnist:percent=P: a seeded stratified P % of the train split's images (fashion_mnist.stratified_subset)
FMNIST_DEFAULTS = {"imbalance": 1, "percent": 100}
# moving-fashion-mnist[-cls]:clips=N,frames=T: N train clips (val N // 10, test N // 5) of T frames (video.py)
VIDEO_DEFAULTS = {"clips": 10000, "frames": 10}
VIDEO_KINDS = ("moving-fashion-mnist", "moving-fashion-mnist-cls", "moving-fashion-mnist-pose",
               "moving-fashion-mnist-events")  # -pose: video_pose.py
# fmnist-scenes:n=N,size=S,items=K: N train canvases (val N // 20, test N // 10) of S x S px, 1..K items (scenes.py)
SCENES_DEFAULTS = {"n": 20000, "size": 64, "items": 6}
_OPTION_DEFAULTS = {"synthetic": SYNTHETIC_DEFAULTS, "fashion-mnist": FMNIST_DEFAULTS,
                    **dict.fromkeys(VIDEO_KINDS, VIDEO_DEFAULTS), "fmnist-scenes": SCENES_DEFAULTS}
# moving-fashion-mnist-events:clips=N,frames=T,threshold=C: the -cls clips as polarity event counts (events.py);
# videofolder:PATH[:frames=T]: users' clip files, T frames sampled uniformly per clip (videofolder.py)
_OPTION_DEFAULTS.update({"moving-fashion-mnist-events": {**VIDEO_DEFAULTS, "threshold": 0.2},
                         "videofolder": {"frames": 10}})
# moving-fashion-mnist-cls:interaction=1: the pass-through / bounce classes instead of the motion classes (video.py)
_OPTION_DEFAULTS["moving-fashion-mnist-cls"] = {**VIDEO_DEFAULTS, "interaction": 0}
FLOAT_OPTIONS = ("threshold",)   # options that take a positive float (the others take positive ints)
FLAG_OPTIONS = ("interaction",)  # options that take 0 or 1
SPEC_HELP = ("use 'fashion-mnist[:imbalance=R,percent=P]', 'imagefolder:PATH', 'synthetic[:n=N,classes=K]' or "
             "'moving-fashion-mnist[-cls|-pose][:clips=N,frames=T]' (-cls also interaction=1), "
             "'moving-fashion-mnist-events[:clips=N,frames=T,threshold=C]', 'videofolder:PATH[:frames=T]'; "
             "dense tasks: 'fmnist-scenes[:n=N,size=S,items=K]' or "
             "'coco:PATH'")


class DataError(UserError):
    """Bad data input (spec, split, files, shapes); the message is one line that says how to fix it."""


class DatasetNotFoundError(DataError):
    """The dataset's files or folder are not where they were looked for."""


@dataclass(frozen=True)
class DataSpec:
    """What to load: a dataset kind plus its path (imagefolder) or options (synthetic).

    `str(spec)` gives the text form, and `DataSpec.parse(str(spec)) == spec`.
    """
    kind: str
    path: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        text = _spec_text(self.kind, self.path, self.options)
        if self.kind not in KINDS:
            raise DataError(f"unknown dataset {text!r}: {SPEC_HELP}")
        if self.kind in ("imagefolder", "coco", "videofolder"):
            if not self.path:
                raise DataError(f"dataset {text!r} needs a path: use '{self.kind}:/path/to/root'")
        elif self.path:
            fix = SPEC_HELP
            if self.kind == "fashion-mnist":
                fix = "pass the folder of idx files as data_dir (--data-dir DIR)"
            raise DataError(f"dataset {text!r}: {self.kind} takes no path: {fix}")
        known = _OPTION_DEFAULTS.get(self.kind, {})
        if self.options and not known:
            raise DataError(f"dataset {text!r}: only synthetic, fashion-mnist and the moving sets take options: "
                            f"{SPEC_HELP}")
        keys = [key for key, _ in self.options]
        if len(set(keys)) != len(keys):
            raise DataError(f"dataset {text!r} repeats an option: give each of {', '.join(keys)} once")
        for key, value in self.options:
            if key not in known:
                raise DataError(f"dataset {text!r}: unknown option {key!r}: "
                                f"{self.kind} knows {', '.join(known)}")
            if key in FLOAT_OPTIONS:
                if not _positive_float(value):
                    raise DataError(f"dataset {text!r}: option {key}={value!r} must be a positive number, "
                                    f"e.g. {key}=0.2")
                continue
            if key in FLAG_OPTIONS:
                if value not in ("0", "1"):
                    raise DataError(f"dataset {text!r}: option {key}={value!r} must be 0 or 1, e.g. {key}=1")
                continue
            if not (value.isdigit() and int(value) > 0):
                raise DataError(f"dataset {text!r}: option {key}={value!r} must be a positive integer, e.g. {key}=64")

    @classmethod
    def parse(cls, text: "str | DataSpec") -> "DataSpec":
        """Parse 'fashion-mnist', 'imagefolder:PATH' or 'synthetic[:n=N,classes=K]'; a DataSpec passes through."""
        if isinstance(text, DataSpec):
            return text
        if not isinstance(text, str):
            raise DataError(f"dataset spec must be a string, got {text!r} ({type(text).__name__}): {SPEC_HELP}")
        kind, _, rest = text.strip().partition(":")
        kind = _ALIASES.get(kind.lower(), kind.lower())
        if kind not in KINDS:
            raise DataError(f"unknown dataset {text!r}: {SPEC_HELP}")
        if kind == "videofolder":   # PATH[:frames=T]: options only after the last ':', so PATH may hold ':'
            path, _, tail = rest.rpartition(":")
            if path and "=" in tail:
                return cls(kind, path=path, options=tuple(tuple(part.strip() for part in item.partition("=")[::2])
                                                          for item in tail.split(",")))
            return cls(kind, path=rest or None)
        if kind in ("imagefolder", "coco"):
            return cls(kind, path=rest or None)
        if rest and (kind == "synthetic" or (kind in ("fashion-mnist", "fmnist-scenes", *VIDEO_KINDS) and "=" in rest)):
            options = []
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise DataError(f"dataset {text!r}: option {item!r} is not KEY=VALUE, "
                                    f"e.g. 'synthetic:n=64,classes=5'")
                options.append((key.strip(), value.strip()))
            return cls(kind, options=tuple(options))
        return cls(kind, path=rest or None)

    def option(self, key: str) -> int | float:
        """An option of this kind (synthetic, fashion-mnist, a moving set, fmnist-scenes, videofolder) as an int
        (a float for FLOAT_OPTIONS), or its default."""
        value = dict(self.options).get(key, _OPTION_DEFAULTS[self.kind][key])
        return float(value) if key in FLOAT_OPTIONS else int(value)

    def __str__(self) -> str:
        return _spec_text(self.kind, self.path, self.options)


def _positive_float(text: str) -> bool:
    try:
        return 0 < float(text) < float("inf")
    except ValueError:
        return False


def _spec_text(kind, path, options) -> str:
    text = str(kind)
    if path:
        text += f":{path}"
    if options:
        text += ":" + ",".join(f"{k}={v}" for k, v in options)
    return text


# ---------------------------------------------------------------------------------------------------------------------
# argument checks shared by the dataset builders

def check_split(split: str) -> str:
    """Return `split` if it is one of SPLITS, else raise DataError listing them."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


def to_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """`28` -> (28, 28); `(32, 48)` -> (32, 48) as (H, W)."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise DataError(f"img_size={img_size!r} is not a positive int or (height, width) pair: "
                        f"pass e.g. 28 or (28, 28)")
    return size


def to_stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std with `in_chans` values each; a single value is repeated for every channel."""
    if not isinstance(in_chans, int) or in_chans < 1:
        raise DataError(f"in_chans={in_chans!r} must be a positive int (1 for grayscale, 3 for RGB)")
    out = []
    for name, values in (("mean", mean), ("std", std)):
        values = (float(values),) if isinstance(values, Real) else tuple(float(v) for v in values)
        if len(values) == 1:
            values = values * in_chans
        if len(values) != in_chans:
            raise DataError(f"{name}={values} has {len(values)} values but in_chans={in_chans}: "
                            f"pass one value per channel, or a single value for all")
        if name == "std" and min(values) <= 0:
            raise DataError(f"std={values} must be positive")
        out.append(values)
    return out[0], out[1]


def check_aug(aug: dict | None, defaults: dict[str, Any], kind: str) -> dict[str, Any]:
    """Merge `aug` over `defaults`; unknown keys and out-of-range values raise DataError."""
    aug = dict(aug or {})
    unknown = sorted(set(aug) - set(defaults))
    if unknown:
        raise DataError(f"unknown aug option(s) {unknown} for {kind}: it knows {', '.join(sorted(defaults))}")
    merged = {**defaults, **aug}
    for key, value in aug.items():
        if key in ("hflip", "re_prob"):
            ok = isinstance(value, Real) and 0.0 <= value <= 1.0
            hint = "a probability in [0, 1]"
        elif key == "crop_padding":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            hint = "an int >= 0 (pixels)"
        elif key == "color_jitter":
            ok = isinstance(value, Real) and value >= 0
            hint = "a float >= 0"
        else:  # scale, ratio
            ok = (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, Real) for v in value)
                  and 0 < value[0] <= value[1])
            hint = "a (low, high) pair with 0 < low <= high"
        if not ok:
            raise DataError(f"aug option {key}={value!r} for {kind} must be {hint}")
    return merged


def holdout(n: int, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split range(n) into sorted (train, val) index tensors; val is the first `n_val` of a seeded permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[perm[:n_val]] = True  # a mask sorts in O(n); torch.sort of 60k indices took ~0.1 s on a busy CPU
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)


class VisionDataset(torch.utils.data.Dataset):
    """Common attributes of vitlab datasets: `spec`, `split`, `classes`, `num_classes`, `input_size`, `targets`."""

    spec: DataSpec
    split: str
    classes: list[str]
    input_size: tuple[int, int, int]  # (C, H, W) of the returned images
    train_aug: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> torch.Tensor:
        """The label of every item, as a LongTensor."""
        return torch.as_tensor(self._labels, dtype=torch.long)

    def __repr__(self) -> str:
        c, h, w = self.input_size
        return (f"{type(self).__name__}(spec='{self.spec}', split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, input_size=({c}, {h}, {w}), train_aug={self.train_aug})")
