"""Pruning a checkpoint end to end (`vitlab prune`): calibration batches with labels, the technique applied, the
result saved atomically beside its summary."""
from pathlib import Path

import torch.nn as nn

from ..record import record
from ..checkpoint import create_model, save_checkpoint
from ..data.calibration import CalibrationError, calibration_batches
from .. import loader
from ..techniques import format_technique
from ..utils.lock import abandon_staged, commit_staged, kill_point, lock_folder, staging_folder
from .configs import Prune, PruneError
from .plan import model_macs

__all__ = ["labelled_calibration", "prune_checkpoint"]


def labelled_calibration(model: nn.Module, data: str, split: str = "train", num_images: int = 512, *,
                         batch_size: int = 64, seed: int = 0, data_dir: str | None = None) -> list:
    """(images, labels) batches: a seeded random subset of `data`/`split`, preprocessed for `model`.

    `vitlab.data.calibration_batches(..., labels=True)` (the same images in the same order) with the prune verb's
    defaults, its refusals raised as `PruneError`. The test split is refused: scores computed on it would leak into
    the reported accuracy.
    """
    if split == "test":
        raise PruneError("pruning on the test split is refused (it would leak into the reported accuracy): "
                         "use --split train (default) or val")
    try:
        return calibration_batches(model, data, split, num_images, seed=seed, labels=True, batch_size=batch_size,
                                   data_dir=data_dir)
    except CalibrationError as e:
        raise PruneError(str(e)) from None


def prune_checkpoint(source: str, out: str, cfg, *, data: str | None = None, split: str = "train",
                     num_images: int = 512, data_dir: str | None = None) -> tuple[nn.Module, dict]:
    """Load `source` (checkpoint folder or model name), prune it with `cfg` (`Prune`, `LPViT` or another pruning
    technique), save it to `out`; return (model, summary).

    `out` is locked for the whole run (a second process gets `FolderLocked`) and checked writable before any work.
    The checkpoint is written into a staging folder inside `out` and moved in as a whole (vitlab/utils/lock.py), so a
    killed prune leaves no half-written checkpoint: `out` holds the old one or the new one, and a rerun succeeds."""
    out_dir = Path(out)
    if Path(source).exists() and Path(source).resolve() == out_dir.resolve():
        raise PruneError(f"--out {out} is the checkpoint being pruned: choose another folder")
    with lock_folder(out_dir, "vitlab prune"):
        run = [name for name in ("train_state.pt", "metrics.jsonl") if (out_dir / name).exists()]
        if run:
            raise PruneError(f"--out {out} holds a training run ({', '.join(run)}): a pruned checkpoint there would "
                             "mix with it; choose another --out")
        model = create_model(source)
        config = record(model).config
        hint = ", or use --importance l1 / l2" if isinstance(cfg, Prune) else ""
        model = loader.load(model, [cfg], calibration=None if data is None else (
            lambda m: labelled_calibration(m, data, split, num_images, data_dir=data_dir)),
            missing_data=lambda stack: PruneError(f"{stack} scores with images: give --data SPEC (with --split "
                                                  f"train){hint}"))
        summary = dict(record(model).prune or {}, technique=format_technique(cfg), source=str(source),
                       data=data, split=split, calib_images=num_images)
        staging = staging_folder(out_dir)
        try:
            save_checkpoint(model, staging, preprocessing=config.get("preprocessing"),
                            data={"spec": data, "split": split} if data else None,
                            metrics={"macs": model_macs(model), "params": sum(p.numel() for p in model.parameters())},
                            training={"pruned": summary})
            kill_point("prune-staged")
            commit_staged(out_dir, staging)
        finally:
            abandon_staged(out_dir, staging)
    return model, summary
