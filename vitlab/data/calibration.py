"""Calibration images for techniques that look at data (quantizer ranges, pruning scores): one seeded subset.

    batches = calibration_batches(model, "fashion-mnist", "train", 256)              # [images (B, C, H, W), ...]
    pairs = calibration_batches(model, "fashion-mnist", "train", 512, labels=True,
                                batch_size=64)                                   # [(images, labels (B,)), ...]

The images are the first `num_images` decodable items of the split in the order of
`torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))`, prepared by
`transforms.dataset_for_model` (the preprocessing every verb uses), so the same arguments give the same images in
the same order whether labels are asked for or not. The test split is refused: it is for the final number only.
"""
import torch
import torch.nn as nn

from ..record import record
from ..runner import model_input_size
from .build import build_dense_dataset
from .spec import DENSE_KINDS, DataError, DataSpec
from .transforms import dataset_for_model

__all__ = ["CalibrationError", "calibration_batches"]


class CalibrationError(DataError):
    """A calibration request that cannot be met (the test split, no images, none decodable)."""


def calibration_batches(model: nn.Module, data: str, split: str = "train", num_images: int = 256, *, seed: int = 0,
                        labels: bool = False, batch_size: int = 32, data_dir: str | None = None,
                        split_flag: str = "--calib-split") -> list:
    """`num_images` images (a seeded random subset of `data`/`split`), preprocessed for `model`, in batches.

    labels=False: image batches; the classes need not be the model's, and a dense model (vitlab.dense) given scenes
    (fmnist-scenes, coco:PATH) calibrates on their images. labels=True: (images, labels) batches for criteria that
    score with labels, so the model's classes are checked against the data's first. An image file that cannot be
    decoded is left out (with a warning) and the next of the seeded order taken, never repeated. `split_flag` is the
    caller's option named in the refusal of the test split.
    """
    if split == "test":
        raise CalibrationError("calibration on the test split is refused (it would leak into the reported accuracy): "
                               f"use {split_flag} train (default) or val")
    if num_images < 1:
        raise CalibrationError(f"--calib-images must be >= 1, got {num_images}")
    dense = None if labels else _dense_calibration_set(model, data, split, data_dir)
    dataset = dense or dataset_for_model(model, data, split, data_dir=data_dir, check=labels)
    get = getattr(dataset, "get_or_skip", dataset.__getitem__)
    picked = []
    for i in torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist():
        item = get(i)
        if isinstance(item, tuple):  # else a Skipped record: an undecodable file
            picked.append(item)
            if len(picked) == num_images:
                break
    if not picked:
        raise CalibrationError(f"none of the images of {data} [{split}] can be decoded: check the files")
    images = torch.stack([item[0] for item in picked]).split(batch_size)  # (B, C, H, W) each
    if not labels:
        return list(images)
    return list(zip(images, torch.tensor([int(item[1]) for item in picked]).split(batch_size)))


def _dense_calibration_set(model: nn.Module, data: str, split: str, data_dir: str | None):
    """The scenes of a dense data spec (fmnist-scenes, coco:PATH) for calibrating a dense model (vitlab.dense),
    items (image, target dict); None otherwise (a classifier given scenes gets the data module's own refusal)."""
    if record(model).dense is None or DataSpec.parse(data).kind not in DENSE_KINDS:
        return None
    return build_dense_dataset(data, split, data_dir=data_dir, in_chans=model_input_size(model)[0])
