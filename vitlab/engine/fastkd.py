"""TinyViT fast pretraining distillation (Wu et al., ECCV 2022, sec. 3.1): the teacher runs once, ahead of training.

`save_teacher_logits` (`vitlab distill-logits TEACHER --out STORE ...`) runs the teacher over every image of every
step of a training run — the engine's own seeded data order and per-image augmentation (engine/train.py
`_EpochBatches`, `_SeededItems`: the augmentation of an image is seeded from (seed, epoch, step, position)) — and
keeps each image's top-k teacher probabilities and their classes. The recipe `fastkd:store=STORE` replays them while
the student trains with the same seed, batch size, epochs, augmentation and data: step (epoch, step) holds exactly
the images the teacher saw, so no teacher forward is needed during training.

A stored row is turned back into a distribution as TinyViT does (official `main.py`
`train_one_epoch_distill_using_saved_logits`): the top-k probabilities in their classes, the remaining mass
1 - sum(top-k) spread uniformly over the other C - k classes — a label-smoothed sparse soft target — and the student
is trained with soft-target cross-entropy against it (timm `SoftTargetCrossEntropy`, TinyViT's criterion when
distilling). Follows microsoft/Cream@4a13c40 (TinyViT/save_logits.py, TinyViT/main.py,
TinyViT/data/augmentation/dataset_wrapper.py). TinyViT stores float16 probabilities and int16 classes; the store
here keeps float32 probabilities (replayed targets equal the teacher's softmax to float32 rounding) and int16 classes.

Store folder (written atomically, `vitlab.utils.io.atomic_dir`):
    logits.safetensors   probs (T, B, k) float32, classes (T, B, k) int16, indices (T, B) int64 dataset indices,
                         labels (T, B) int64; row t = global step t = epoch * steps_per_epoch + step
    manifest.json        teacher, top-k, and the settings that fix which augmented images each step holds
"""
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..record import record
from ..errors import UserError
from ..recipes import Recipe, Step, register_recipe
from ..checkpoint import WEIGHTS, create_model, default_preprocessing
from ..data import dataset_info
from ..utils.io import atomic_dir
from .runtime import Runtime
from .train import DATA_ORDER, TrainConfig, _EpochBatches, _SeededItems, _datasets

__all__ = ["FastKD", "FastKDError", "StoreMismatch", "dense_targets", "load_store", "replay_settings",
           "save_teacher_logits", "soft_target_cross_entropy", "sparse_topk"]

FORMAT = "vitlab-fastkd-v1"
LOGITS_FILE = "logits.safetensors"
MANIFEST_FILE = "manifest.json"


class FastKDError(UserError):
    """A teacher-logit store that is missing, damaged, or cannot serve this training run."""


class StoreMismatch(FastKDError):
    """The training run's data order or augmentation differs from the one the store was written with."""


# ---------------------------------------------------------------------------------------------------------------------
# the math: sparse top-k storage and its label-smoothed reconstruction

def sparse_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) teacher logits -> the k largest softmax probabilities (B, k), descending, and their classes (B, k)."""
    probs = logits.float().softmax(dim=-1)
    values, classes = probs.topk(k, dim=-1, largest=True, sorted=True)
    return values, classes


def dense_targets(values: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, k) probabilities in (B, k) classes -> (B, C) soft targets: the stored ones in place, the rest of the
    mass, 1 - sum(values), shared equally by the C - k other classes (TinyViT main.py: `minor_value`)."""
    k = values.shape[-1]
    rest = (1.0 - values.sum(dim=-1, keepdim=True)).clamp_min(0) / max(num_classes - k, 1)   # (B, 1)
    targets = rest.expand(-1, num_classes).clone() if k < num_classes else values.new_zeros(len(values), num_classes)
    return targets.scatter_(-1, classes.long(), values.float())


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over the batch of -sum_c targets_c * log_softmax(logits)_c (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


# ---------------------------------------------------------------------------------------------------------------------
# what fixes the images of each step

def replay_settings(cfg: Any, preprocessing: dict, train_images: int) -> dict:
    """The settings that decide which augmented image sits at each (epoch, step, position) of a run of `cfg` (a
    TrainConfig): a store serves only a run whose settings are all equal to the ones it was written with."""
    return {"data": str(cfg.data), "train_images": int(train_images), "seed": int(cfg.seed),
            "batch_size": int(cfg.batch_size), "epochs": float(cfg.epochs), "hflip": float(cfg.hflip),
            "crop_padding": cfg.crop_padding, "re_prob": float(cfg.re_prob), "mixup": float(cfg.mixup),
            "cutmix": float(cfg.cutmix), "input_size": [int(v) for v in preprocessing["input_size"]],
            "mean": [round(float(v), 6) for v in preprocessing["mean"]],
            "std": [round(float(v), 6) for v in preprocessing["std"]], "data_order": DATA_ORDER}


_FLAGS = {"data": "--data", "train_images": "(training images)", "seed": "--seed", "batch_size": "--batch-size",
          "epochs": "--epochs", "hflip": "--hflip", "crop_padding": "--crop-padding", "re_prob": "--re-prob",
          "mixup": "--mixup", "cutmix": "--cutmix", "input_size": "(model input size)", "mean": "(model mean)",
          "std": "(model std)", "data_order": "(engine data order)"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _teacher_identity(teacher: str, model: nn.Module) -> dict:
    path = Path(teacher)
    identity = {"source": teacher, "model": (record(model).spec or {}).get("name", type(model).__name__)}
    if (path / WEIGHTS).is_file():
        identity.update(source=str(path.resolve()), weights_sha256=_sha256(path / WEIGHTS))
    return identity


# ---------------------------------------------------------------------------------------------------------------------
# writing a store

def save_teacher_logits(teacher: str, out: str | Path, *, data: str = "fashion-mnist", data_dir: str | None = None,
                        epochs: float = 10, batch_size: int = 128, seed: int = 0, topk: int = 10,
                        hflip: float = 0.5, crop_padding: int | None = None, re_prob: float = 0.0,
                        workers: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Run `teacher` (a checkpoint folder or model name) once over the images of every step of a run with these
    settings (`vitlab train --seed/--batch-size/--epochs/--hflip/--crop-padding/--re-prob`, no mixup) and write
    its top-k probabilities to the store folder `out`. Returns the manifest."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FastKDError(f"--out {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise FastKDError(f"--out {out} is a non-empty folder that holds no teacher-logit store; --overwrite only "
                          "replaces a store: choose another --out")
    cfg = TrainConfig(out=str(out), init=teacher, data=data, data_dir=data_dir, epochs=epochs, batch_size=batch_size,
                      seed=seed, hflip=hflip, crop_padding=crop_padding, re_prob=re_prob, eval_val=False)
    cfg.validate()
    num_classes = dataset_info(data, data_dir=data_dir)["num_classes"]
    if not 1 <= topk <= num_classes:
        raise FastKDError(f"--topk {topk} must be between 1 and the {num_classes} classes of --data {data}")
    if num_classes > torch.iinfo(torch.int16).max:
        raise FastKDError(f"--data {data} has {num_classes} classes; the store keeps classes as int16 (< 32768)")
    model = create_model(teacher).eval()
    if getattr(model, "num_classes", num_classes) != num_classes:
        raise FastKDError(f"teacher {teacher} predicts {model.num_classes} classes but --data {data} has "
                          f"{num_classes}; give a teacher trained on this data")
    train_set, _, pre = _datasets(cfg, model)
    steps_per_epoch = len(train_set) // batch_size
    if steps_per_epoch == 0:
        raise FastKDError(f"--batch-size {batch_size} is larger than the {len(train_set)} training images")
    total = max(1, math.ceil(epochs * steps_per_epoch))
    start = time.perf_counter()
    tensors, correct = _teacher_rows(model, train_set, total, batch_size, seed, topk, workers, progress)
    seconds = time.perf_counter() - start
    manifest = {"format": FORMAT, "teacher": _teacher_identity(teacher, model), "topk": topk,
                "num_classes": num_classes, "steps": total, "steps_per_epoch": steps_per_epoch,
                "settings": replay_settings(cfg, pre, len(train_set)), "data_dir": data_dir,
                "teacher_top1_augmented": correct / (total * batch_size), "teacher_seconds": seconds}
    _write_store(out, tensors, manifest)
    return manifest


@torch.no_grad()
def _teacher_rows(model: nn.Module, train_set: Any, total: int, batch_size: int, seed: int, topk: int, workers: int,
                  progress: bool) -> tuple[dict[str, torch.Tensor], int]:
    """The store's tensors for the first `total` steps of the engine's data order (and how many of those images the
    teacher classifies correctly): each step's images loaded exactly as `fit` loads them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    steps_per_epoch = len(train_set) // batch_size
    probs = torch.empty(total, batch_size, topk)
    classes = torch.empty(total, batch_size, topk, dtype=torch.int16)
    indices = torch.empty(total, batch_size, dtype=torch.int64)
    labels = torch.empty(total, batch_size, dtype=torch.int64)
    correct, step, start = 0, 0, time.perf_counter()
    for epoch in range(math.ceil(total / steps_per_epoch)):
        sampler = _EpochBatches(len(train_set), batch_size, epoch, seed, 0, Runtime())
        loader = torch.utils.data.DataLoader(_SeededItems(train_set), batch_sampler=sampler, num_workers=workers,
                                             generator=torch.Generator().manual_seed(seed + epoch))
        for in_epoch, (images, targets) in enumerate(loader):
            logits = model(images.to(device)).cpu()                  # (B, C)
            values, top = sparse_topk(logits, topk)                  # (B, k) each
            probs[step], classes[step] = values, top.to(torch.int16)
            indices[step], labels[step] = torch.as_tensor(sampler.indices(in_epoch)), targets
            correct += int((logits.argmax(-1) == targets).sum())
            step += 1
            if step == total:
                break
        if progress:
            print(f"distill-logits: epoch {epoch}: {step}/{total} steps, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
    return {"probs": probs, "classes": classes, "indices": indices, "labels": labels}, correct


def _write_store(out: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / LOGITS_FILE), metadata={"format": FORMAT})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def load_store(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of a store folder, checked for shape and format."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file() or not (path / LOGITS_FILE).is_file():
        raise FastKDError(f"store={path} holds no teacher-logit store ({MANIFEST_FILE} + {LOGITS_FILE}); write one "
                          "with vitlab distill-logits TEACHER --out STORE")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        tensors = load_file(str(path / LOGITS_FILE))
    except Exception as e:  # noqa: BLE001
        raise FastKDError(f"store={path} cannot be read ({e}); write it again with vitlab distill-logits") from None
    if manifest.get("format") != FORMAT:
        raise FastKDError(f"store={path} has format {manifest.get('format')!r}, this vitlab reads {FORMAT!r}; "
                          "write it again with vitlab distill-logits")
    t, b, k = manifest["steps"], manifest["settings"]["batch_size"], manifest["topk"]
    shapes = {"probs": (t, b, k), "classes": (t, b, k), "indices": (t, b), "labels": (t, b)}
    if any(tuple(tensors.get(name, torch.empty(0)).shape) != shape for name, shape in shapes.items()):
        raise FastKDError(f"store={path}: {LOGITS_FILE} does not hold the {t} steps x {b} images x top-{k} its "
                          "manifest names; write it again with vitlab distill-logits")
    return manifest, tensors


# ---------------------------------------------------------------------------------------------------------------------
# replaying a store

@register_recipe("fastkd")
@dataclass
class FastKD(Recipe):
    """TinyViT fast distillation: replays the teacher's top-k stored by `vitlab distill-logits`, no teacher forward.

    Loss: alpha * soft-target CE against the stored sparse targets + (1 - alpha) * label CE (TinyViT: alpha=1)."""

    store: str = ""
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not self.store:
            raise ValueError("give store=PATH, a folder written by vitlab distill-logits TEACHER --out PATH")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1] (1: only the stored teacher, as TinyViT)")

    def setup(self, model: nn.Module, train_set: Any, cfg: Any, rt: Any) -> None:
        if cfg.teacher or cfg.l1 > 0:
            raise FastKDError(f"--recipe {self.name} replays a stored teacher and replaces the step's loss: it "
                              "cannot be combined with --teacher or --l1; drop them")
        self.manifest, tensors = load_store(self.store)
        have = replay_settings(cfg, default_preprocessing(model), len(train_set))
        if have["mixup"] or have["cutmix"]:
            raise StoreMismatch(f"--recipe {self.name}: --mixup/--cutmix mix images with numbers drawn while "
                                "training, which a store cannot hold; train without them (TinyViT distils without)")
        stored = self.manifest["settings"]
        differ = [f"{_FLAGS.get(key, key)} {have[key]} (the store has {stored.get(key)})"
                  for key in have if have[key] != stored.get(key)]
        if differ:
            raise StoreMismatch(f"--recipe {self.name}:store={self.store} was written for other images: "
                                f"{'; '.join(differ)}; train with the store's settings or write a store for these "
                                "with vitlab distill-logits")
        if self.manifest["num_classes"] != train_set.num_classes:
            raise StoreMismatch(f"store={self.store} holds {self.manifest['num_classes']}-class teacher "
                                f"probabilities; --data {cfg.data} has {train_set.num_classes} classes")
        self.tensors, self.label_smoothing = tensors, cfg.label_smoothing
        self.first = rt.rank * (cfg.batch_size // rt.world_size)   # this rank's slice of each global batch

    def lookup(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored top-k probabilities (B, k) and classes (B, k) of this rank's images at `step`, after checking
        that they are the images the store was written for (their dataset indices and labels)."""
        row = step.epoch * self.manifest["steps_per_epoch"] + step.step
        if row >= self.manifest["steps"]:
            raise StoreMismatch(f"store={self.store} holds {self.manifest['steps']} steps; step {row} is past them")
        cols = slice(self.first, self.first + len(step.indices))
        indices, labels = self.tensors["indices"][row, cols], self.tensors["labels"][row, cols]
        if indices.tolist() != list(step.indices) or not torch.equal(labels, step.targets.cpu().long()):
            raise StoreMismatch(f"store={self.store}: step {row} holds other images than the store's (dataset "
                                f"indices {indices[:4].tolist()}... vs {list(step.indices)[:4]}...); was the data "
                                "changed since vitlab distill-logits?")
        return self.tensors["probs"][row, cols], self.tensors["classes"][row, cols]

    def loss(self, step: Step) -> torch.Tensor:
        values, classes = self.lookup(step)
        targets = dense_targets(values, classes, self.manifest["num_classes"]).to(step.images.device)   # (B, C)
        out = step.train_model(step.images)
        logits = out[0] if isinstance(out, tuple) else out
        loss = soft_target_cross_entropy(logits, targets)
        if self.alpha < 1:
            ce = F.cross_entropy(logits, step.targets, label_smoothing=self.label_smoothing)
            loss = self.alpha * loss + (1 - self.alpha) * ce
        return loss
