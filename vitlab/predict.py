"""`vitlab predict`: top-k classes of image files, preprocessed as the checkpoint says."""
from pathlib import Path

import torch
from torch import nn

from . import loader
from .checkpoint import create_model, default_preprocessing
from .data.transforms import load_image_tensor, resolve_preprocessing
from .record import record
from .runner import as_runner

__all__ = ["predict", "load_image"]


def load_image(path: str | Path, preprocessing) -> torch.Tensor:
    """One image file -> normalized float tensor (C, H, W), prepared as `preprocessing` (a model or
    `vitlab.data.Preprocessing`) says: the same function `eval` uses on an image folder (vitlab.data.transforms)."""
    return load_image_tensor(path, preprocessing)


def predict(checkpoint, images: list[str | Path], *, top: int = 5, apply=(),
            runner=None) -> dict[str, list[tuple[str, float]]]:
    """{image path: [(class name, probability)] * top}, best first.

    `checkpoint`: a model name, a checkpoint folder or a model `vitlab.create_model` loaded; `apply`: an `--apply`
    stack of techniques that need no calibration images; `runner`: the model with a stack already applied (the
    CLI's route for techniques that calibrate), used instead of `apply`."""
    if runner is not None and apply:
        raise ValueError("give the --apply stack either as `apply` or already applied as `runner`, not both")
    model = checkpoint if isinstance(checkpoint, nn.Module) else create_model(checkpoint)
    config = record(model).config
    pre = config.get("preprocessing") or default_preprocessing(model)
    # no calibration images here: a technique that needs them refuses in its own handler (the CLI calibrates first)
    runner = as_runner(runner if runner is not None else loader.load(model, apply or (), calibration=lambda m: None))
    names = pre.get("class_names") or [str(i) for i in range(runner.num_classes)]

    resolved = resolve_preprocessing(model)
    batch = torch.stack([load_image(p, resolved) for p in images])
    probs = runner(batch).softmax(dim=-1)
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=-1)
    return {str(p): [(names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
            for p, vals, idx in zip(images, values, indices)}
