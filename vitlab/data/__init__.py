"""Datasets for vitlab: Fashion-MNIST, image folders and synthetic data, with fixed train/val/test splits.

    ds = build_dataset("fashion-mnist", "train", train_aug=True)
    x, y = ds[0]        # float tensor (in_chans, H, W), normalized with mean/std; int label
    ds.classes, ds.num_classes, ds.spec, ds.split

Splits (a contract other modules rely on): `train` is the training set minus a fixed hold-out, `val` is that
hold-out (a `torch.Generator().manual_seed(seed)` permutation, seed 0 by default), `test` is the test set. See
`fashion_mnist`, `imagefolder` and `synthetic` for each kind's details; `build` turns a spec into a dataset. Only
`transforms` and `calibration` read a model (its data config: `resolve_preprocessing`, `dataset_for_model`,
`calibration_batches`), so that every verb reading image files prepares them alike.
"""
from .fashion_mnist import FMNIST_CLASSES, FMNIST_DIR, FMNIST_MEAN, FMNIST_STD, NATIVE_SHAPE, FashionMNIST
from .imagefolder import ImageFolderDataset, find_classes, resolve_root
from .spec import (DENSE_KINDS, KINDS, SPLITS, DataError, DatasetNotFoundError, DataSpec, check_aug, check_split,
                   to_stats)
from .scenes import CLASS_NAMES, CocoScenes, FmnistScenes, collate_scenes
from .synthetic import SyntheticDataset
from .video import CLS_CLASSES, CANVAS, MovingFashionMNIST
from .transforms import (Preprocessing, check_classes, dataset_for_model, display_name, image_transform,
                         load_image_tensor, resolve_preprocessing)
from .build import build_dataset, build_dense_dataset, dataset_info
from .calibration import CalibrationError, calibration_batches

__all__ = [
    "SPLITS", "KINDS", "DataSpec", "DataError", "DatasetNotFoundError", "build_dataset", "dataset_info",
    "FashionMNIST", "ImageFolderDataset", "SyntheticDataset", "MovingFashionMNIST", "FMNIST_DIR", "FMNIST_MEAN", "FMNIST_STD",
    "Preprocessing", "resolve_preprocessing", "image_transform", "load_image_tensor", "check_classes",
    "dataset_for_model", "FmnistScenes", "CocoScenes", "collate_scenes", "build_dense_dataset",
    "calibration_batches", "CalibrationError",
]
