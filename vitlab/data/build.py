"""Build a split of a dataset from its spec: `build_dataset` (labelled images or clips), `dataset_info` (classes and
native shape without loading images) and `build_dense_dataset` (scenes for dense prediction)."""
import os

import torch

from .events import MovingFashionMNISTEvents
from .fashion_mnist import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, NATIVE_SHAPE, FashionMNIST
from .imagefolder import ImageFolderDataset, find_classes, resolve_root
from .scenes import CLASS_NAMES, CocoScenes, FmnistScenes
from .spec import DENSE_KINDS, DataError, DataSpec, check_aug, check_split, to_stats
from .synthetic import SyntheticDataset
from .transforms import display_name
from .video import CANVAS, CLS_CLASSES, INTERACTION_CLASSES, MovingFashionMNIST
from .video_pose import MovingFashionMNISTPose
from .videofolder import VideoFolderDataset, video_classes

__all__ = ["build_dataset", "dataset_info", "build_dense_dataset"]


def build_dataset(
        spec: str | DataSpec,
        split: str = "test",
        *,
        img_size: int | tuple[int, int] = 28,
        in_chans: int = 1,
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
        train_aug: bool = False,
        aug: dict | None = None,
        data_dir: str | os.PathLike | None = None,
        strict: bool = False,
        seed: int = 0,
        interpolation: str = "bilinear",
        crop_pct: float = 1.0,
        crop_mode: str = "center",
        classes: list[str] | None = None,
) -> torch.utils.data.Dataset:
    """Build one split of a dataset, returning items (float tensor (in_chans, H, W), int label).

    Args:
        spec: 'fashion-mnist', 'imagefolder:PATH' or 'synthetic[:n=N,classes=K]' (or a DataSpec).
            'moving-fashion-mnist[-cls][:clips=N,frames=T]' gives clips (1, T, H, W) instead of images;
            'moving-fashion-mnist-pose' items (clip, label, keypoints (T, 10, 2)) (video_pose.py).
            'moving-fashion-mnist-events[:clips=N,frames=T,threshold=C]' event counts (2, T, H, W) (events.py);
            'videofolder:PATH[:frames=T]' users' clips (C, T, H, W) decoded with PyAV (videofolder.py).
        split: one of SPLITS.
        img_size: output H = W, or (H, W); images of another size are resized (Fashion-MNIST: bilinear, antialias).
        in_chans: channels of the output; Fashion-MNIST needs 1, imagefolder converts to 1 (L) or 3 (RGB).
        mean, std: per-channel normalization (one value is used for every channel); synthetic ignores them.
        train_aug: random augmentation (draws from torch's global RNG); synthetic ignores it.
        aug: overrides of augmentation defaults: Fashion-MNIST knows hflip, crop_padding, re_prob;
            imagefolder knows hflip, re_prob, scale, ratio, color_jitter.
        data_dir: folder of the Fashion-MNIST idx files (default FMNIST_DIR); other kinds ignore it.
        strict: imagefolder: raise DataError on a bad image file instead of skipping it with a warning.
        seed: chooses the val hold-out (fixed forever at the default 0) and the synthetic data.
        interpolation, crop_pct, crop_mode: imagefolder's eval preprocessing (timm's: resize the short side to
            size / crop_pct, crop the centre); Fashion-MNIST (resized as above) and synthetic ignore them.
        classes: the class names in the model's output order; imagefolder labels its class folders so (they must be
            the same names), other kinds only accept their own order. `transforms.dataset_for_model` passes it.

    `transforms.dataset_for_model(model, spec, split)` calls this with the model's preprocessing and checked classes.
    """
    spec = DataSpec.parse(spec)
    check_split(split)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataError(f"seed={seed!r} must be an int")
    if spec.kind in DENSE_KINDS:
        raise DataError(f"--data {spec} holds scenes for dense prediction, not labelled images: pass "
                        f"--task panoptic, semantic or detection (with --head NAME), or classify with "
                        f"--data fashion-mnist")
    if classes is not None and spec.kind not in ("imagefolder", "videofolder"):
        own = dataset_info(spec)["classes"]
        if list(classes) != own:
            raise DataError(f"{spec} has classes {own}, which cannot be relabelled as {list(classes)}")
    if spec.kind == "fashion-mnist":
        return FashionMNIST(split, img_size=img_size, in_chans=in_chans, mean=mean, std=std, train_aug=train_aug,
                            aug=aug, data_dir=data_dir, seed=seed, imbalance=spec.option("imbalance"),
                            percent=spec.option("percent"))
    if spec.kind == "moving-fashion-mnist-pose":  # items (clip, label, keypoints): see video_pose.py
        return MovingFashionMNISTPose(split, img_size=img_size, in_chans=in_chans, mean=mean, std=std,
                                      train_aug=train_aug, aug=aug, data_dir=data_dir, seed=seed,
                                      clips=spec.option("clips"), frames=spec.option("frames"))
    if spec.kind == "moving-fashion-mnist-events":  # event counts (2, T, H, W): see events.py
        return MovingFashionMNISTEvents(split, img_size=img_size, in_chans=in_chans, mean=mean, std=std,
                                        train_aug=train_aug, aug=aug, data_dir=data_dir, seed=seed,
                                        clips=spec.option("clips"), frames=spec.option("frames"),
                                        threshold=spec.option("threshold"))
    if spec.kind == "videofolder":  # users' clips (C, T, H, W) decoded with PyAV: see videofolder.py
        return VideoFolderDataset(spec, split, img_size=img_size, in_chans=in_chans, mean=mean, std=std,
                                  train_aug=train_aug, aug=aug, seed=seed, frames=spec.option("frames"),
                                  classes=classes)
    if spec.kind.startswith("moving-fashion-mnist"):  # clips (1, T, H, W): see video.py
        task = "classify" if spec.kind.endswith("-cls") else "predict"
        return MovingFashionMNIST(task, split, img_size=img_size, in_chans=in_chans, mean=mean, std=std,
                                  train_aug=train_aug, aug=aug, data_dir=data_dir, seed=seed,
                                  clips=spec.option("clips"), frames=spec.option("frames"),
                                  interaction=task == "classify" and bool(spec.option("interaction")))
    if spec.kind == "imagefolder":
        return ImageFolderDataset(spec, split, img_size=img_size, in_chans=in_chans, mean=mean, std=std,
                                  train_aug=train_aug, aug=aug, strict=strict, seed=seed, interpolation=interpolation,
                                  crop_pct=crop_pct, crop_mode=crop_mode, classes=classes)
    # synthetic: still reject malformed arguments, so a typo does not pass unnoticed in tests
    to_stats(mean, std, in_chans)
    check_aug(aug, {**FashionMNIST.AUG_DEFAULTS, **ImageFolderDataset.AUG_DEFAULTS}, "synthetic")
    return SyntheticDataset(spec, split, img_size=img_size, in_chans=in_chans, seed=seed)


def dataset_info(spec: str | DataSpec, data_dir: str | os.PathLike | None = None) -> dict:
    """{"kind", "num_classes", "classes", "native_shape": (C, H, W) or None} without loading any image.

    native_shape is None where images have no fixed shape (imagefolder) or take the requested one (synthetic).
    imagefolder lists the class sub-folders (of ROOT/train if present); `data_dir` is accepted for symmetry
    with build_dataset and is not read.
    """
    spec = DataSpec.parse(spec)
    if spec.kind in DENSE_KINDS:  # classes: things, then the background stuff class
        if spec.kind == "coco":
            classes, shape = CocoScenes.read_classes(spec.path), None
        else:
            classes, shape = list(CLASS_NAMES), (1, spec.option("size"), spec.option("size"))
    elif spec.kind == "fashion-mnist":
        classes, shape = list(FMNIST_CLASSES), NATIVE_SHAPE
    elif spec.kind == "moving-fashion-mnist-events":  # 2 channels: positive and negative event counts
        classes, shape = list(CLS_CLASSES), (2, CANVAS, CANVAS)
    elif spec.kind == "videofolder":
        classes, shape = video_classes(spec), None
    elif spec.kind.startswith("moving-fashion-mnist"):  # the prediction set has no classes; shape is per frame
        classes, shape = (list(CLS_CLASSES) if spec.kind.endswith(("-cls", "-pose")) else []), (1, CANVAS, CANVAS)
        if spec.kind.endswith("-cls") and spec.option("interaction"):
            classes = list(INTERACTION_CLASSES)
    elif spec.kind == "imagefolder":
        root = resolve_root(spec)
        found = find_classes(root / "train" if (root / "train").is_dir() else root)
        classes, shape = [display_name(c) for c in found], None
    else:
        classes, shape = [f"class_{i}" for i in range(spec.option("classes"))], None
    return {"kind": spec.kind, "num_classes": len(classes), "classes": classes, "native_shape": shape}


def build_dense_dataset(
        spec: str | DataSpec,
        split: str = "test",
        *,
        data_dir: str | os.PathLike | None = None,
        seed: int = 0,
        in_chans: int = 1,
        mean=None,
        std=None,
) -> "FmnistScenes | CocoScenes":
    """One split of a dense-prediction set: items (image (C, S, S), target dict); see `scenes`.

    'fmnist-scenes[:n=N,size=S,items=K]': N train canvases (default 20000), val N // 20, test N // 10 (at least 1).
    'coco:PATH': a COCO-format set (PATH/annotations.json, PATH/images/), resized to 64 px.
    mean/std default to Fashion-MNIST's for 1 channel and ImageNet's for 3.
    """
    spec = DataSpec.parse(spec)
    check_split(split)
    if spec.kind not in DENSE_KINDS:
        raise DataError(f"--data {spec} has no dense labels: use 'fmnist-scenes[:n=N,size=S,items=K]' or "
                        f"'coco:PATH' with --task, or drop --task to classify")
    if spec.kind == "coco":
        return CocoScenes(spec.path, split, in_chans=in_chans, seed=seed, mean=mean, std=std)
    if in_chans != 1:
        raise DataError(f"fmnist-scenes canvases are grayscale (1 channel) but the model expects {in_chans}: "
                        f"create the model with in_chans=1")
    n = spec.option("n")
    n = {"train": n, "val": max(1, n // 20), "test": max(1, n // 10)}[split]
    return FmnistScenes(split, n=n, size=spec.option("size"), max_items=spec.option("items"), data_dir=data_dir,
                        seed=seed, mean=FMNIST_MEAN if mean is None else mean, std=FMNIST_STD if std is None else std)
