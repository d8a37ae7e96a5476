"""Scenes for dense prediction: `fmnist-scenes` canvases of pasted Fashion-MNIST items, and `coco:PATH` sets.

`FmnistScenes`: each `size` x `size` canvas (64 by default) holds 1..`max_items` real Fashion-MNIST items, each
resized to `round(28 * s)` px with s uniform in [0.6, 1.4] (bilinear, antialiased when shrinking), pasted at a
uniform random position inside the canvas, later items covering earlier ones. An item's silhouette is its pixels
brighter than `MASK_THRESHOLD` (of 255); only silhouette pixels are pasted, so the background is exactly 0 and the
image shows precisely what the labels say. Items with fewer than `MIN_VISIBLE` visible pixels are dropped from the
target (their few pixels count as background). Each canvas gives panoptic, semantic and box labels at once
(`targets_from_owner`), with the thing classes 0-9 of Fashion-MNIST and the stuff class `BACKGROUND` = 10.

Splits draw items from disjoint images, as `fashion-mnist` splits them: `train` and `val` from the train file minus /
within its fixed 5,000-image hold-out, `test` from the t10k file. Canvas k of a split is drawn from
`numpy.random.default_rng((seed, split number, k))` alone, so it is the same in every process and worker.

`CocoScenes`: a user's small COCO-format instances set, read with pycocotools, resized to `size` and labelled the
same way (categories remapped to 0..K-1 in id order, background K).
"""
import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import masks_to_boxes

from .fashion_mnist import FMNIST_CLASSES, FMNIST_DIR, FMNIST_MEAN, FMNIST_STD, VAL_SIZE, load_split
from .spec import SPLITS, DataError, DatasetNotFoundError, DataSpec, VisionDataset, check_split, holdout, to_stats
from .video import CANVAS, ITEM

__all__ = ["FmnistScenes", "CocoScenes", "collate_scenes", "targets_from_owner", "NUM_THINGS", "BACKGROUND",
           "NUM_CLASSES", "CLASS_NAMES", "MASK_THRESHOLD", "MIN_VISIBLE", "SCALE_RANGE", "SCENE_DEFAULTS"]

NUM_THINGS = len(FMNIST_CLASSES)        # thing classes 0..9
BACKGROUND = NUM_THINGS                 # the stuff class: every pixel no item covers
NUM_CLASSES = NUM_THINGS + 1
CLASS_NAMES = (*FMNIST_CLASSES, "background")
MASK_THRESHOLD = 10                     # an item pixel > this (of 255) belongs to its silhouette
MIN_VISIBLE = 16                        # an item needs this many visible pixels to be labelled
SCALE_RANGE = (0.6, 1.4)                # item side = round(28 * scale)
SCENE_DEFAULTS = {"train": 20000, "val": 1000, "test": 2000}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def targets_from_owner(owner: torch.Tensor, labels: torch.Tensor, background: int,
                       min_visible: int = MIN_VISIBLE) -> dict[str, torch.Tensor]:
    """The target dict of a scene whose pixel (y, x) shows layer `owner[y, x]` (-1: background).

    Layers with fewer than `min_visible` pixels are dropped; the kept ones are numbered 1..N in layer order.
    Boxes are pixel extents: x1 = last column + 1, so a box's width is the mask's number of columns.

    Args:
        owner: (S, S) int64 layer index per pixel, -1 where no layer is visible.
        labels: (L,) int64 class of each layer.
    """
    visible = owner[None] == torch.arange(len(labels))[:, None, None]  # (L, S, S)
    keep = visible.flatten(1).sum(1) >= min_visible
    # lookups indexed by owner: layer l -> its value, and index -1 (no layer) -> the last entry
    instance = torch.cat([torch.where(keep, torch.cumsum(keep, 0) - 1, -1), torch.tensor([-1])])[owner]  # (S, S)
    semantic = torch.cat([torch.where(keep, labels, background), torch.tensor([background])])[owner]  # (S, S)
    masks, labels = visible[keep], labels[keep]
    boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]) if len(masks) else torch.zeros(0, 4)
    return {"labels": labels, "masks": masks, "boxes": boxes.float(),
            "semantic": semantic, "panoptic": torch.stack([semantic, instance + 1], dim=-1)}


def collate_scenes(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """DataLoader collate: (images (B, C, S, S), list of B target dicts); targets hold varying numbers of items."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def _positive_int(name: str, value, example: int, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"{name}={value!r} must be an int >= {low}, e.g. {name}={example}")
    return value


class FmnistScenes(VisionDataset):
    """`n` seeded canvases of pasted Fashion-MNIST items: (image (1, S, S) normalized, target dict); see the module.

        ds = FmnistScenes("train", n=100)
        image, target = ds[0]   # target: labels (N,), masks (N, S, S), boxes (N, 4), semantic (S, S), panoptic

    `classes` = CLASS_NAMES (10 things, then background), `num_things` = 10, `background` = 10.
    """

    def __init__(self, split: str = "train", n: int | None = None, size: int = CANVAS, max_items: int = 6,
                 data_dir: str | os.PathLike | None = None, seed: int = 0, mean=FMNIST_MEAN, std=FMNIST_STD):
        check_split(split)
        n = SCENE_DEFAULTS[split] if n is None else _positive_int("n", n, 1000)
        _positive_int("size", size, CANVAS, low=16)
        _positive_int("items", max_items, 6)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed={seed!r} must be an int >= 0")
        (self._mean,), (self._std,) = to_stats(mean, std, 1)
        options = tuple((k, str(v)) for k, v, d in (("size", size, CANVAS), ("items", max_items, 6)) if v != d)
        self.spec, self.split, self.classes = DataSpec("fmnist-scenes", options=options), split, list(CLASS_NAMES)
        self.input_size, self.num_things, self.background = (1, size, size), NUM_THINGS, BACKGROUND
        self.n, self.size, self.max_items, self.seed = n, size, max_items, seed
        self.data_dir = str(data_dir or FMNIST_DIR)
        self.images, self.item_labels = load_split(self.data_dir, "test" if split == "test" else "train")
        if split == "test":
            self.rows = torch.arange(len(self.images))
        else:
            train_idx, val_idx = holdout(len(self.images), VAL_SIZE, 0)  # the fashion-mnist splits' images
            self.rows = train_idx if split == "train" else val_idx

    def __len__(self) -> int:
        return self.n

    def layout(self, index: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(item rows (K,) in the idx file, sides (K,) px, top-left corners (K, 2) as (y, x)) of canvas `index`."""
        if not -self.n <= index < self.n:
            raise IndexError(f"canvas {index} out of range for {self.n} canvases")
        rng = np.random.default_rng((self.seed, SPLITS.index(self.split), index % self.n))
        count = int(rng.integers(1, self.max_items + 1))
        picks = self.rows[torch.from_numpy(rng.integers(len(self.rows), size=count))]
        sides = np.clip(np.rint(ITEM * rng.uniform(*SCALE_RANGE, size=count)), 1, self.size).astype(np.int64)
        corners = rng.integers(0, self.size - sides[:, None] + 1, size=(count, 2))
        return picks, sides, corners

    def render(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(canvas (S, S) float in 0..255, owner (S, S) int64 layer per pixel or -1, labels (K,)) of canvas `index`."""
        picks, sides, corners = self.layout(index)
        canvas = torch.zeros(self.size, self.size)
        owner = torch.full((self.size, self.size), -1, dtype=torch.long)
        for layer, (row, side, (y, x)) in enumerate(zip(picks.tolist(), sides.tolist(), corners.tolist())):
            item = self.images[row].float()[None]  # (1, 1, 28, 28)
            if side != ITEM:
                item = F.interpolate(item, size=(side, side), mode="bilinear", align_corners=False,
                                     antialias=side < ITEM)
            item = item[0, 0]
            silhouette = item > MASK_THRESHOLD
            canvas[y:y + side, x:x + side][silhouette] = item[silhouette]
            owner[y:y + side, x:x + side][silhouette] = layer
        return canvas, owner, self.item_labels[picks]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        canvas, owner, labels = self.render(index)
        image = ((canvas / 255.0 - self._mean) / self._std)[None]  # (1, S, S)
        return image, targets_from_owner(owner, labels, BACKGROUND)

    def __repr__(self) -> str:
        return (f"FmnistScenes(split={self.split!r}, n={self.n}, size={self.size}, max_items={self.max_items}, "
                f"seed={self.seed})")


def _read_coco(path: str | os.PathLike) -> "tuple[object, Path]":
    """(pycocotools COCO index of PATH/annotations.json, PATH); missing or malformed files raise DataError."""
    root = Path(path).expanduser()
    file = root / "annotations.json"
    if not file.is_file():
        raise DatasetNotFoundError(f"coco:{path}: {file} not found: a COCO set is PATH/annotations.json "
                                   f"(instances format) and PATH/images/")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"coco:{path}: {file} is not valid JSON ({e}): write a COCO instances file") from e
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict) or key not in data]
    if missing:
        raise DataError(f"coco:{path}: {file} lacks {', '.join(missing)}: a COCO instances file has images, "
                        f"annotations and categories")
    try:
        from pycocotools.coco import COCO
    except ImportError as e:
        raise DataError("coco:PATH needs pycocotools: pip install 'vitlab[dense]'") from e
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as e:
            raise DataError(f"coco:{path}: {file} has a malformed entry (missing {e}): check its images, "
                            f"annotations and categories against the COCO format") from e
    return coco, root


class CocoScenes(VisionDataset):
    """A user's small COCO-format instances set as scenes: (image (C, S, S) normalized, target dict as FmnistScenes).

    Layout: PATH/annotations.json (images, annotations with polygon or RLE `segmentation`, categories) and the
    images under PATH/images/ (`file_name` relative to it). Each image is resized to `size` x `size` (no aspect
    kept); each mask is resized alike (bilinear, then >= 0.5). Overlaps are resolved by painting larger instances
    first, so a small object on a large one stays visible; crowd annotations are skipped. Categories are remapped to
    0..K-1 in id order, background is K. Splits: with 3 or more images, val and test are each a seeded
    max(1, n // 10) of them and train the rest; a set of 1-2 images serves the same images as every split.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", size: int = CANVAS, in_chans: int = 1,
                 seed: int = 0, mean=None, std=None):
        check_split(split)
        _positive_int("size", size, CANVAS, low=16)
        if in_chans not in (1, 3):
            raise DataError(f"in_chans={in_chans!r}: coco images are read as grayscale (1) or RGB (3)")
        gray = in_chans == 1
        mean = (FMNIST_MEAN if gray else _IMAGENET_MEAN) if mean is None else mean
        std = (FMNIST_STD if gray else _IMAGENET_STD) if std is None else std
        mean, std = to_stats(mean, std, in_chans)
        self._mean, self._std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        self.coco, self.root = _read_coco(path)
        categories = sorted(self.coco.getCatIds())
        self._category_index = {c: i for i, c in enumerate(categories)}
        self.spec, self.split = DataSpec("coco", path=str(path)), split
        self.classes = [self.coco.cats[c]["name"] for c in categories] + ["background"]
        self.num_things = self.background = len(categories)
        self.input_size, self.size, self._mode = (in_chans, size, size), size, "L" if gray else "RGB"
        ids = torch.tensor(sorted(self.coco.getImgIds()), dtype=torch.long)
        if len(ids) == 0:
            raise DataError(f"coco:{path}: annotations.json lists no images: add some")
        if len(ids) >= 3:
            held = max(1, len(ids) // 10)
            perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
            part = {"val": perm[:held], "test": perm[held:2 * held], "train": perm[2 * held:]}[split]
            ids = ids[part.sort().values]
        self.image_ids = ids.tolist()
        unknown = {a["category_id"] for a in self.coco.anns.values()} - set(categories)
        if unknown:
            raise DataError(f"coco:{path}: annotations use category ids {sorted(unknown)} that categories does not "
                            f"list: add them to categories or drop those annotations")
        for image_id in self.image_ids:
            file = self.root / "images" / self.coco.imgs[image_id]["file_name"]
            if not file.is_file():
                raise DatasetNotFoundError(f"coco:{path}: image {file} (id {image_id}) not found: put the images "
                                           f"under {self.root / 'images'}")

    @staticmethod
    def read_classes(path: str | os.PathLike) -> list[str]:
        """The class names of coco:PATH (categories in id order, then 'background') without reading an image."""
        coco, _ = _read_coco(path)
        return [coco.cats[c]["name"] for c in sorted(coco.getCatIds())] + ["background"]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.coco.imgs[self.image_ids[index]]
        with Image.open(self.root / "images" / info["file_name"]) as file:
            pixels = np.asarray(file.convert(self._mode), dtype=np.float32) / 255.0
        image = torch.from_numpy(pixels).reshape(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1)  # (C, H, W)
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        annotations = [a for a in self.coco.imgToAnns[info["id"]] if not a.get("iscrowd", 0)]
        with warnings.catch_warnings():  # pycocotools 2.0.11 warns about numpy 2's copy keyword on every decode
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = [torch.from_numpy(self.coco.annToMask(a)).float() for a in annotations]  # (H, W) each
        masks = F.interpolate(torch.stack(masks)[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)[0] >= 0.5 if masks else torch.zeros(0, 1, 1)
        order = masks.flatten(1).sum(1).argsort(descending=True, stable=True).tolist()  # large first: small on top
        annotations = [annotations[i] for i in order]
        owner = torch.full((self.size, self.size), -1, dtype=torch.long)
        for layer, i in enumerate(order):
            owner[masks[i]] = layer
        labels = torch.tensor([self._category_index[a["category_id"]] for a in annotations], dtype=torch.long)
        target = targets_from_owner(owner, labels, self.background)
        return (image - self._mean) / self._std, target

    def __repr__(self) -> str:
        return f"CocoScenes({str(self.root)!r}, split={self.split!r}, n={len(self)}, classes={self.num_things})"
