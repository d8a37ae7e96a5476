"""Training and evaluation of dense models: `fit_dense(cfg)`, `evaluate_dense(model, dataset, task)`, `predict_dense`.

A step-budgeted AdamW loop (timm's optimizer, which exempts norms and biases from weight decay, and its warm-up +
cosine schedule), seeded: batch b of step s is a slice of a seeded permutation of the training scenes that depends
on (seed, epoch) alone, so `resume=` continues a run exactly where it stopped. The loss follows what the head
returns: per-pixel `sem_logits` -> cross-entropy at image resolution; `pred_masks` -> `MaskCriterion`; `pred_boxes`
-> `BoxCriterion` (vitlab.dense.matching, Hungarian-matched DETR / Mask2Former losses).

Run folder (`cfg.out`), as `vitlab train` writes it (vitlab/engine/train.py): `model.safetensors` + `config.json`
(a `vl_dense` checkpoint: `vitlab.create_model(DIR)` rebuilds the model, whose config records task, head, its
options and the backbone architecture), `train_state.pt` (weights_only tensors for `resume`) and `metrics.jsonl`.
Every file is written atomically; the folder is locked while the run writes it.
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

from ..record import record, update_record
from ..checkpoint import create_model, is_checkpoint, load_config, save_checkpoint
from ..errors import UserError
from .heads import TASKS, format_head, parse_head
from . import matching
from ..data import build_dense_dataset
from ..data.scenes import collate_scenes
from ..engine.runtime import rng_state, seed_everything, set_rng_state, setup_runtime
from ..engine.train import (METRICS_FILE, STATE_FILE, _Aside, _Progress, _append_line, _delete_replaced, _existing_run,
                            _load_state, _save_state, muon_fallback_by_role)
from ..utils.lock import kill_point, lock_folder
from .matching import inference
from .metrics import DenseMetrics
from .eco_m2f import ExitWeightedCriterion
from .kmax_loss import KMaXCriterion

__all__ = ["DenseTrainConfig", "fit_dense", "evaluate_dense", "predict_dense", "build_model", "dense_loss",
           "make_criterion", "dense_optimizer", "prediction_layers", "load_dense", "is_dense_checkpoint", "DENSE_MODEL", "TASK_METRIC"]

DENSE_MODEL = "vl_dense"                     # the timm entrypoint dense checkpoints name (vitlab/entrypoints.py)
TASK_METRIC = {"panoptic": "pq", "semantic": "miou", "detection": "ap"}   # the headline number of each task
DENSE_OPTIMIZERS = ("adamw", "muon")


@dataclass
class DenseTrainConfig:
    """One dense training run. `head` is `NAME[:key=value,...]`; `backbone` a timm / vitlab name; `init` a vitlab
    classification checkpoint whose weights (and architecture) start the backbone."""

    out: str
    task: str = "semantic"
    head: str = "semantic-fpn"
    backbone: str | None = None              # default vl_vit_fmnist (or the --init checkpoint's model)
    init: str | None = None
    backbone_kwargs: dict = field(default_factory=dict)
    data: str = "fmnist-scenes"
    data_dir: str | None = None
    steps: int = 2000
    batch_size: int = 32
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    opt: str = "adamw"                       # adamw, or muon (hidden matrices; predictions on AdamW)
    warmup: int | None = None                # warm-up steps; None: steps // 20
    clip_grad: float | None = 1.0
    seed: int = 0
    threads: int | None = None
    eval_every: int = 0                      # evaluate on val (and save) every N steps; 0: at the end only
    eval_images: int | None = None           # val scenes per evaluation (None: all)
    progress: bool = True

    def validate(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"--task {self.task!r}: dense tasks are {', '.join(TASKS)} (classify: vitlab train "
                            "without --task)")
        parse_head(self.head, self.task)     # names an unknown head / option, or one that does not do the task
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if self.opt not in DENSE_OPTIMIZERS:
            raise UserError(f"--opt {self.opt!r}: dense training takes {' or '.join(DENSE_OPTIMIZERS)}")
        if self.init and self.backbone:
            spec = load_config(self.init)["model"]["name"]
            if spec != self.backbone:
                raise UserError(f"--model {self.backbone} differs from the --init checkpoint's {spec}: drop --model")

    @property
    def warmup_steps(self) -> int:
        return min(self.steps - 1, self.steps // 20 if self.warmup is None else self.warmup)


# ----------------------------------------------------------------------------------------------- model, loss

def _num_classes(task: str, dataset) -> int:
    """K: things + the background stuff class for panoptic / semantic, things only for detection."""
    return int(dataset.num_things) if task == "detection" else len(dataset.classes)


def build_model(cfg: DenseTrainConfig, dataset) -> nn.Module:
    """The `vl_dense` model of `cfg` for `dataset`'s input size and classes (via `vitlab.create_model`, which
    records the constructor kwargs the checkpoint needs)."""
    entry, options = parse_head(cfg.head, cfg.task)
    in_chans, size = dataset.input_size[0], dataset.input_size[-1]
    if cfg.init and (saved := load_config(cfg.init)["preprocessing"]["in_chans"]) != in_chans:
        raise UserError(f"--init {cfg.init} takes {saved}-channel images but --data {cfg.data} gives {in_chans}: "
                        "start from a checkpoint trained on images with as many channels")
    model = create_model(DENSE_MODEL, backbone=cfg.init or cfg.backbone or "vl_vit_fmnist", head=entry.name,
                         task=cfg.task, num_classes=_num_classes(cfg.task, dataset), in_chans=in_chans,
                         img_size=size, head_options=options, backbone_kwargs=cfg.backbone_kwargs)
    # record the architecture, not the --init folder: the checkpoint rebuilds without it
    update_record(model, spec={"name": DENSE_MODEL, "kwargs": dict(record(model).dense)})
    return model


def prediction_layers(model: nn.Module, num_classes: int) -> tuple[str, ...]:
    """Names of the Linear / Conv layers that output predictions: class logits (K or K + 1 channels, K =
    `num_classes`) or box coordinates (4). Muon leaves them to its AdamW fallback, as it leaves a classifier."""
    outputs = {num_classes, num_classes + 1, 4}
    return tuple(name for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and m.out_features in outputs
                 or isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.out_channels in outputs)


def dense_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float,
                    num_classes: int) -> torch.optim.Optimizer:
    """timm's AdamW, or timm's Muon on the hidden weight matrices with the prediction layers
    (`prediction_layers`), embeddings, query / position tables and 1-D parameters on its AdamW fallback
    (`vitlab.engine.train.muon_fallback_by_role`)."""
    if opt == "muon":
        return timm.optim.create_optimizer_v2(
            model, opt="muon", lr=lr, weight_decay=weight_decay,
            fallback_list=muon_fallback_by_role(model, prediction_layers(model, num_classes)))
    if opt != "adamw":
        raise UserError(f"--opt {opt!r}: dense training takes {' or '.join(DENSE_OPTIMIZERS)}")
    return timm.optim.create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay)


def dense_loss(outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]],
               criterion: nn.Module | None = None) -> torch.Tensor:
    """The training loss of a head's output dict (see the module docstring); `criterion` is the matched
    mask / box criterion for those outputs (built once by `make_criterion`)."""
    if "sem_logits" in outputs:
        size = targets[0]["semantic"].shape[-2:]
        logits = F.interpolate(outputs["sem_logits"], size=size, mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, torch.stack([t["semantic"] for t in targets]).to(logits.device))
    losses = criterion(outputs, targets)
    return sum(losses.values()) if isinstance(losses, dict) else losses


def make_criterion(outputs: dict[str, Any], task: str, num_classes: int) -> nn.Module | None:
    """The matched criterion for a head's output kind (None for per-pixel logits)."""
    if "pixel_feature" in outputs:  # a kMaX head with loss=kmax: kMaX-DeepLab's own criterion
        return KMaXCriterion(num_classes, task=task)
    if "loss_weights" in outputs:  # ECO-M2F's early exits: each exit's losses weighted (by its depth)
        return ExitWeightedCriterion(num_classes, task=task)
    if "pred_masks" in outputs:
        return matching.MaskCriterion(num_classes, task=task)
    if "pred_boxes" in outputs:
        return matching.BoxCriterion(num_classes)
    return None


@torch.no_grad()
def predict_dense(model: Any, images: torch.Tensor, task: str) -> Any:
    """Predictions at image resolution: semantic [B, S, S] class ids, panoptic [B, S, S, 2] (class, instance),
    detection a list of {boxes xyxy px, scores, labels} per image."""
    return inference(model(images), task, tuple(images.shape[-2:]))


def evaluate_dense(model: Any, dataset, task: str, *, batch_size: int = 32, limit: int | None = None,
                   progress: bool = False) -> dict[str, float]:
    """PQ / SQ / RQ (panoptic), mIoU (semantic) or AP / AP50 / AP75 (detection) of `model` (a module or a vitlab
    runner) on `dataset`, with the shared torchmetrics-based `DenseMetrics`; plus `n`, the number of scenes."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    metrics = DenseMetrics(task, len(dataset.classes))   # things + background, whatever the task
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                                         collate_fn=collate_scenes)
    module = model if isinstance(model, nn.Module) else None   # a runner (vitlab measure) is in eval mode already
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        for images, targets in _maybe_progress(loader, progress, "eval"):
            metrics.update(predict_dense(model, images, task), targets)
    finally:
        if module is not None:
            module.train(was_training)
    return {**{k: float(v) for k, v in metrics.compute().items()}, "n": n}


def _maybe_progress(loader, enabled: bool, what: str):
    if not enabled:
        return loader
    from rich.progress import track

    return track(loader, description=what, transient=True)


# ----------------------------------------------------------------------------------------------- checkpoints

def is_dense_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a vitlab checkpoint of a dense model (`vitlab train --task ...`)."""
    return is_checkpoint(path) and load_config(path)["model"]["name"] == DENSE_MODEL


def load_dense(path: str | Path) -> nn.Module:
    """The dense model of checkpoint folder `path`, in eval mode, with `vitlab.dense` (task, head, ...) and
    `vitlab.checkpoint` (its config: class names, preprocessing) set."""
    if not is_dense_checkpoint(path):
        raise UserError(f"{path} is not a dense checkpoint (written by vitlab train --task panoptic|semantic|"
                        "detection); classification checkpoints go to vitlab eval / predict without --task")
    return create_model(path)


def _preprocessing(dataset) -> dict:
    """config.json's "preprocessing" for a scenes dataset: input size, normalisation, class names."""
    c, h, w = dataset.input_size
    mean = torch.as_tensor(dataset._mean, dtype=torch.float32).flatten().tolist()
    std = torch.as_tensor(dataset._std, dtype=torch.float32).flatten().tolist()
    return {"input_size": [c, h, w], "in_chans": c, "mean": mean * (c // len(mean)), "std": std * (c // len(std)),
            "interpolation": "bilinear", "class_names": list(dataset.classes)}


# ----------------------------------------------------------------------------------------------- training

def fit_dense(cfg: DenseTrainConfig | None = None, *, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train as `cfg` says (or continue the run in folder `resume`, with its saved settings); return the folder.

    A new run refuses an `out` that already holds a run (`RunExists`) unless `overwrite`, which replaces it once
    the new run has finished (vitlab/engine/train.py's `_Aside`)."""
    if resume is not None:
        if cfg is not None:
            raise ValueError("give a DenseTrainConfig or resume=RUN_DIR, not both")
        state = _load_state(Path(resume) / STATE_FILE)
        cfg = DenseTrainConfig(**{**state["config"], "out": str(resume)})
    else:
        state = None
        cfg.validate()
        if not overwrite and (refusal := _existing_run(Path(cfg.out))):
            raise refusal
    out = Path(cfg.out)
    with lock_folder(out, "vitlab train", "--resume" if resume is not None else "--out"):
        aside = _Aside(out) if overwrite else None   # the old run, deleted only once the new one has finished
        try:
            _fit(cfg, state)
        except BaseException:
            if aside is not None:
                aside.restore()
            raise
        _delete_replaced(out)
    return out


def _fit(cfg: DenseTrainConfig, state: dict | None) -> None:
    setup_runtime(device="cpu", threads=cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    train_set = build_dense_dataset(cfg.data, "train", data_dir=cfg.data_dir)
    val_set = build_dense_dataset(cfg.data, "val", data_dir=cfg.data_dir)
    model = build_model(cfg, train_set)
    task, num_classes = cfg.task, record(model).dense["num_classes"]
    optimizer = dense_optimizer(model, cfg.opt, cfg.lr, cfg.weight_decay, num_classes)
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
    per_epoch = len(train_set) // cfg.batch_size
    if per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training scenes of "
                        f"--data {cfg.data}: give a smaller --batch-size or more scenes (fmnist-scenes:n=N)")
    pre = _preprocessing(train_set)
    entry, options = parse_head(cfg.head, cfg.task)
    head_text = format_head(entry.name, options)
    out.mkdir(parents=True, exist_ok=True)
    progress = _Progress(enabled=cfg.progress, total=cfg.steps, done=step, every=max(1, cfg.steps // 20))
    criterion, loss_sum, seen, trained, start = None, 0.0, 0, 0, time.perf_counter()

    def save(row: dict) -> None:
        metrics = {k: v for k, v in row.items() if k.startswith("val_")}
        save_checkpoint(model, out, preprocessing=pre, data={"spec": str(cfg.data), "split": "train"},
                        metrics=metrics, training={**dataclasses.asdict(cfg), "head": head_text, "step": step},
                        model_name=DENSE_MODEL, model_kwargs=record(model).spec["kwargs"])
        _save_state(out / STATE_FILE, config=dataclasses.asdict(cfg), model=model.state_dict(),
                    optimizer=optimizer.state_dict(), step=step, rng=rng_state())

    try:
        model.train()
        while step < cfg.steps:
            epoch, k = divmod(step, per_epoch)
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            images, targets = collate_scenes([train_set[int(i)] for i in order[k * cfg.batch_size:
                                                                              (k + 1) * cfg.batch_size]])
            outputs = model(images)
            if criterion is None and "sem_logits" not in outputs:
                criterion = make_criterion(outputs, task, num_classes)
            loss = dense_loss(outputs, targets, criterion)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            loss_sum, seen, trained = loss_sum + loss.item(), seen + 1, trained + len(targets)
            progress.update(step, epoch, loss.item(), optimizer.param_groups[0]["lr"],
                            trained / (time.perf_counter() - start))
            finish = getattr(model, "finish_training", None) if step == cfg.steps else None
            if callable(finish):   # a head's own post-training steps (ECO-M2F fits its gate)
                done = finish(train_set)
                if done:
                    progress.log({"step": step, **done})
                model.train()
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                row: dict[str, Any] = {"step": step, "train_loss": loss_sum / seen,
                                          "lr": optimizer.param_groups[0]["lr"],
                                          "elapsed_s": time.perf_counter() - start}
                val = evaluate_dense(model, val_set, task, batch_size=cfg.batch_size, limit=cfg.eval_images)
                row.update({f"val_{name}": value for name, value in val.items()})
                progress.log(row)
                save(row)
                _append_line(out / METRICS_FILE, row)
                loss_sum, seen = 0.0, 0
            kill_point(f"dense-step-{step}")
    finally:
        progress.close()

