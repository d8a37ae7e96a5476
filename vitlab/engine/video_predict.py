"""Spatio-temporal prediction: `fit_predict(cfg)` trains a frame predictor (PredFormer, ConvLSTM, ...) on
`moving-fashion-mnist` clips with an MSE loss; `evaluate_predict(model, dataset)` reports MSE / MAE per frame and SSIM.

The loop follows `vitlab.dense.engine` (PredFormer's recipe as defaults: AdamW lr 1e-3, weight decay 1e-2, batch 16,
scripts/mmnist/mm_PredFormer_TSST_train.sh; timm's warm-up + cosine schedule instead of its one-cycle), step-budgeted
and seeded: batch k of epoch e is a slice of a permutation seeded by (seed, e) alone, so `resume=` continues a run
exactly where it stopped. Items are (input frames normalized, target frames in [0, 1]), both (C, T, H, W).

Metrics follow OpenSTL's `openstl/core/metrics.py` (the numbers PredFormer's paper reports): `mse` / `mae` per frame
are the squared / absolute errors summed over a frame's pixels and averaged over frames and clips (Moving MNIST's
"MSE"), `mse_per_frame` lists that for each predicted time step, `mse_pixel` is the plain per-pixel mean, and `ssim`
is torchmetrics' `StructuralSimilarityIndexMeasure` (Gaussian 11x11 window, sigma 1.5, data range 1) over every
predicted frame, predictions clipped to [0, 1] first.

Run folder (`cfg.out`) as `vitlab train` writes it: `model.safetensors` + `config.json` (its "training" records
`task: "predict"`, which `is_predict_checkpoint` reads), `train_state.pt`, `metrics.jsonl`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm.optim
import timm.scheduler
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..record import update_record
from ..checkpoint import create_model, default_preprocessing, is_checkpoint, load_config, save_checkpoint
from ..errors import UserError
from ..data import build_dataset
from ..data.spec import DataSpec
from ..engine.runtime import rng_state, seed_everything, set_rng_state, setup_runtime
from ..engine.train import (METRICS_FILE, STATE_FILE, _Aside, _Progress, _append_line, _delete_replaced, _existing_run,
                            _load_state, _save_state)
from ..utils.lock import kill_point, lock_folder

__all__ = ["PredictTrainConfig", "fit_predict", "evaluate_predict", "is_predict_checkpoint", "load_predictor",
           "build_predictor", "predict_datasets", "TASK"]

TASK = "predict"


@dataclass
class PredictTrainConfig:
    """One prediction training run: `model` a vitlab / timm name of a frame predictor (clips (B, C, T, H, W) ->
    the next T frames); its `num_frames` follows the data's `frames=` unless `model_kwargs` sets it."""

    out: str
    model: str = "vl_predformer_mmnist_small"
    model_kwargs: dict = field(default_factory=dict)
    data: str = "moving-fashion-mnist"
    data_dir: str | None = None
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-2
    warmup: int | None = None                # warm-up steps; None: steps // 20
    clip_grad: float | None = 1.0
    seed: int = 0
    threads: int | None = None
    eval_every: int = 0                      # evaluate on val (and save) every N steps; 0: at the end only
    eval_clips: int | None = None            # val clips per evaluation (None: all)
    progress: bool = True

    def validate(self) -> None:
        kind = DataSpec.parse(self.data).kind
        if kind != "moving-fashion-mnist":
            raise UserError(f"--task predict needs --data moving-fashion-mnist[:clips=N,frames=T] (input + target "
                            f"frames), got {self.data} ({kind})")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")

    @property
    def warmup_steps(self) -> int:
        return min(self.steps - 1, self.steps // 20 if self.warmup is None else self.warmup)


# ----------------------------------------------------------------------------------------------- model, data

def build_predictor(cfg: PredictTrainConfig) -> nn.Module:
    """The model of `cfg` with the data's clip length (via `vitlab.create_model`, which records its kwargs)."""
    kwargs = {"num_frames": DataSpec.parse(cfg.data).option("frames"), **cfg.model_kwargs}
    try:
        model = create_model(cfg.model, **kwargs)
    except TypeError as e:
        raise UserError(f"--model {cfg.model} is not a frame predictor taking num_frames ({e}); use a prediction "
                        "model, e.g. vl_predformer_mmnist_small or vl_convlstm_mmnist_small") from None
    if getattr(model, "num_classes", None) != 0 or not hasattr(model, "num_frames"):
        raise UserError(f"--model {cfg.model} is a classifier, not a frame predictor: --task predict takes models "
                        "that map clips to the next frames (vl_predformer_*, vl_convlstm_*)")
    return model


def predict_datasets(model: nn.Module, data: str, splits: tuple[str, ...], data_dir: str | None = None) -> list:
    """`data`'s splits at the model's frame size, normalized with its preprocessing's mean / std."""
    pre = default_preprocessing(model)
    sets = [build_dataset(data, split, img_size=tuple(pre["input_size"][1:]), in_chans=pre["in_chans"],
                          mean=pre["mean"], std=pre["std"], data_dir=data_dir) for split in splits]
    if sets[0].num_frames != model.num_frames:
        raise UserError(f"--data {data} has {sets[0].num_frames} input frames but the model takes "
                        f"{model.num_frames}: give --data {sets[0].spec.kind}:frames={model.num_frames}")
    return sets


def _batch(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*(dataset[int(i)] for i in indices))
    return torch.stack(inputs), torch.stack(targets)  # (B, C, T, H, W) each


@torch.no_grad()
def evaluate_predict(model: Any, dataset, *, batch_size: int = 16, limit: int | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """MSE / MAE per frame (summed over a frame's pixels), per-pixel MSE, MSE of each predicted time step and SSIM
    of `model` (a module or a vitlab runner) on `dataset`'s (input, target) clips; `n` clips."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    n = len(dataset) if limit is None else min(limit, len(dataset))
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    module = model if isinstance(model, nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    sq_sum, abs_sum, step_sq, frames = 0.0, 0.0, None, 0
    starts = range(0, n, batch_size)
    try:
        for start in _maybe_progress(starts, progress, "eval"):
            inputs, target = _batch(dataset, range(start, min(start + batch_size, n)))
            pred = model(inputs).float()
            if pred.shape != target.shape:
                raise UserError(f"the model predicts {tuple(pred.shape)} for targets {tuple(target.shape)}: it is "
                                "not a frame predictor for this data")
            err = pred - target  # (B, C, T, H, W)
            per_step = err.pow(2).sum(dim=(1, 3, 4)).sum(dim=0)  # (T,): summed over clips and a frame's pixels
            step_sq = per_step if step_sq is None else step_sq + per_step
            sq_sum += float(per_step.sum())
            abs_sum += float(err.abs().sum())
            frames += target.shape[0] * target.shape[2]
            ssim.update(_frames(pred.clamp(0, 1)), _frames(target))
    finally:
        if module is not None:
            module.train(was_training)
    pixels = target.shape[1] * target.shape[3] * target.shape[4]  # per frame
    return {"mse": sq_sum / frames, "mae": abs_sum / frames, "mse_pixel": sq_sum / frames / pixels,
            "ssim": float(ssim.compute()), "mse_per_frame": (step_sq / n).tolist(), "n": n}


def _frames(clips: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W): every frame an image."""
    return clips.transpose(1, 2).flatten(0, 1)


def _maybe_progress(items, enabled: bool, what: str):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=what, transient=True)


# ----------------------------------------------------------------------------------------------- checkpoints

def is_predict_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a vitlab checkpoint written by `vitlab train --task predict`."""
    return is_checkpoint(path) and load_config(path).get("training", {}).get("task") == TASK


def load_predictor(path: str | Path) -> nn.Module:
    """The frame predictor of checkpoint folder `path`, in eval mode, with `vitlab.checkpoint` (its config) set."""
    if not is_predict_checkpoint(path):
        raise UserError(f"{path} is not a prediction checkpoint (written by vitlab train --task predict)")
    model = create_model(path)
    update_record(model, checkpoint={"path": str(path), "config": load_config(path)})
    return model


# ----------------------------------------------------------------------------------------------- training

def fit_predict(cfg: PredictTrainConfig | None = None, *, resume: str | None = None,
                overwrite: bool = False) -> Path:
    """Train as `cfg` says (or continue the run in folder `resume` with its saved settings); return the folder.
    A new run refuses an `out` that holds a run unless `overwrite` (replaced once the new run has finished)."""
    if resume is not None:
        if cfg is not None:
            raise ValueError("give a PredictTrainConfig or resume=RUN_DIR, not both")
        state = _load_state(Path(resume) / STATE_FILE)
        cfg = PredictTrainConfig(**{**state["config"], "out": str(resume)})
    else:
        state = None
        cfg.validate()
        if not overwrite and (refusal := _existing_run(Path(cfg.out))):
            raise refusal
    out = Path(cfg.out)
    with lock_folder(out, "vitlab train", "--resume" if resume is not None else "--out"):
        aside = _Aside(out) if overwrite else None
        try:
            _fit(cfg, state)
        except BaseException:
            if aside is not None:
                aside.restore()
            raise
        _delete_replaced(out)
    return out


def _fit(cfg: PredictTrainConfig, state: dict | None) -> None:
    setup_runtime(device="cpu", threads=cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    model = build_predictor(cfg)
    train_set, val_set = predict_datasets(model, cfg.data, ("train", "val"), cfg.data_dir)
    per_epoch = len(train_set) // cfg.batch_size
    if per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training clips of "
                        f"--data {cfg.data}: give a smaller --batch-size or more clips (clips=N)")
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=cfg.steps - warmup, lr_min=cfg.min_lr, warmup_t=warmup, warmup_lr_init=cfg.lr * 1e-3,
        warmup_prefix=True, t_in_epochs=False)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        set_rng_state(state["rng"])
    scheduler.step_update(step)
    pre = default_preprocessing(model)
    out.mkdir(parents=True, exist_ok=True)
    progress = _Progress(enabled=cfg.progress, total=cfg.steps, done=step, every=max(1, cfg.steps // 20))
    loss_sum, seen, trained, start = 0.0, 0, 0, time.perf_counter()

    def save(record: dict) -> None:
        metrics = {k: v for k, v in record.items() if k.startswith("val_") and not isinstance(v, list)}
        save_checkpoint(model, out, preprocessing=pre, data={"spec": str(cfg.data), "split": "train"},
                        metrics=metrics, training={**dataclasses.asdict(cfg), "task": TASK, "step": step})
        _save_state(out / STATE_FILE, config=dataclasses.asdict(cfg), model=model.state_dict(),
                    optimizer=optimizer.state_dict(), step=step, rng=rng_state())

    try:
        model.train()
        while step < cfg.steps:
            epoch, k = divmod(step, per_epoch)
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            inputs, targets = _batch(train_set, order[k * cfg.batch_size:(k + 1) * cfg.batch_size])
            loss = F.mse_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            loss_sum, seen, trained = loss_sum + loss.item(), seen + 1, trained + len(inputs)
            progress.update(step, epoch, loss.item(), optimizer.param_groups[0]["lr"],
                            trained / (time.perf_counter() - start))
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                record: dict[str, Any] = {"step": step, "train_loss": loss_sum / seen,
                                          "lr": optimizer.param_groups[0]["lr"],
                                          "elapsed_s": time.perf_counter() - start}
                val = evaluate_predict(model, val_set, batch_size=cfg.batch_size, limit=cfg.eval_clips)
                record.update({f"val_{name}": value for name, value in val.items()})
                progress.log({k: v for k, v in record.items() if not isinstance(v, list)})
                save(record)
                _append_line(out / METRICS_FILE, record)
                loss_sum, seen = 0.0, 0
            kill_point(f"predict-step-{step}")
    finally:
        progress.close()
