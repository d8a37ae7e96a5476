"""A plain training loop: AdamW, warm-up + cosine, label smoothing, mixup/cutmix, random erasing, EMA, clipping.

Seeded and deterministic on CPU; resumable mid-epoch with bitwise-identical results; multi-process with
`torchrun --nproc_per_node=N -m vitlab train ...` (DistributedDataParallel, same *global* batch semantics: each of
N ranks takes its 1/N slice of the global batch, so N processes compute the same update as one).

Run folder (`--out RUN_DIR`):
    model.safetensors + config.json   the checkpoint (latest epoch; EMA weights when --ema is on)
    train_state.pt                    everything `--resume` needs (tensors and plain types: loads weights_only=True)
    metrics.jsonl                     one JSON line per epoch (each written with one write + fsync)

Nothing lost: a folder that already holds a run is refused (`RunExists`; `overwrite=True` moves the old run aside and
deletes it only once the new one has finished), the folder is locked while a run writes it (vitlab/utils/lock.py),
and `--resume` is bitwise also with DataLoader workers: the order of the images is a seeded permutation per epoch,
a resumed epoch skips the batches already trained on, and torch's RNG is re-seeded for every image from
(seed, epoch, step, position), so augmentation does not depend on which worker loads an image, nor on --workers.
(vitlab's datasets draw their augmentation from torch's RNG; Python's `random` and numpy are not re-seeded per
image.) A resumed run keeps its settings: only `epochs` (extends or shortens the schedule) and settings that do not
change what is trained (threads, workers, progress, save_every, log_every, max_steps; another thread count may
round floats differently) may be changed.
"""
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import timm.data
import timm.optim
import timm.scheduler
import timm.utils
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..record import record, update_record
from ..checkpoint import CONFIG, WEIGHTS, CheckpointError, create_model, default_preprocessing, save_checkpoint
from ..errors import UserError
from .. import loader as model_loader
from ..utils.io import atomic_path, atomic_write_text
from ..utils.lock import kill_point, lock_folder
from ..recipes import Step, parse_recipe
from .progressive import check_sizes, make_any_size, phase_size
from .resformer import resize_batch
from .runtime import Runtime, rng_state, seed_everything, set_rng_state, setup_runtime
from .speed import PRECISIONS, autocast, choose_precision, compile_forward
from ..data import DataError, build_dataset, dataset_info
from .distill import add_distill_token, distill_loss
from .evaluate import evaluate
from .sam import SAM

__all__ = ["TrainConfig", "fit", "TrainInterrupted", "RunExists", "RESUME_CHANGEABLE"]

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
RUN_FILES = (STATE_FILE, METRICS_FILE, WEIGHTS, CONFIG, "checkpoint")   # what a run writes into its folder
REPLACED_PREFIX = ".vitlab-replaced-"   # an old run moved aside by overwrite=True until the new one finishes
DATA_ORDER = "per-image-seed-v1"        # how batches and augmentation seeds derive from (seed, epoch, step)
# settings a resumed run may change: they do not change its result (and `epochs`, which extends the schedule)
RESUME_CHANGEABLE = ("epochs", "threads", "workers", "progress", "save_every", "log_every", "max_steps", "compile",
                     "channels_last")


@dataclass
class TrainConfig:
    out: str
    model: str | None = None
    init: str | None = None                 # checkpoint folder to start from
    model_kwargs: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    data_dir: str | None = None
    apply: list[str] = field(default_factory=list)
    epochs: float = 10
    batch_size: int = 128                   # global batch, over all processes
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    opt: str = "adamw"
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    hflip: float = 0.5
    crop_padding: int | None = None
    re_prob: float = 0.0
    drop_path: float | None = None
    ema: float = 0.0                        # EMA decay; 0 = off
    clip_grad: float | None = 1.0
    seed: int = 0
    threads: int | None = None
    workers: int = 0
    eval_val: bool = True
    save_every: int = 0                     # also save resume state every N steps (0: at epoch ends only)
    log_every: int = 20
    progress: bool = True
    max_steps: int | None = None            # stop early (for smoke runs); the schedule still spans `epochs`
    teacher: str | None = None              # checkpoint to distill from (DeiT), with `distill`
    distill: str | None = None              # soft | hard | token (engine/distill.py)
    distill_alpha: float = 0.5
    distill_tau: float = 1.0
    sam_rho: float = 0.05                   # with opt="sam": SAM around AdamW (engine/sam.py)
    l1: float = 0.0                         # Sparse-then-Prune: lambda * sum |w| of the blocks' Linear weights
    token_consistency: float = 0.0          # MCTF token-reduction consistency weight (official 3.0); 0 = off
    token_consistency_threshold: float = 0.4  # student confidence an image needs to enter the consistency term
    token_consistency_teacher_r: int | None = None  # teacher r ~ U{0..this-1}; None: r // 2 (tokens/consistency.py)
    keep_zeros: bool | None = None          # hold the blocks' zero Linear weights at zero; None: on for LPViT --init
    recipe: str | None = None               # NAME:key=value,... (engine/recipes.py): changes each step's loss
    precision: str = "fp32"                 # fp32 | bf16 | auto (bf16 autocast where measured faster; engine/speed.py)
    compile: bool = False                   # torch.compile the training forward (eager fallback on failure)
    channels_last: bool = False             # channels-last memory format for the model and the images
    progressive_sizes: list[int] = field(default_factory=list)  # image sides of equal phases (engine/progressive.py)

    def validate(self) -> None:
        if not self.model and not self.init:
            raise ValueError("give --model NAME or --init CHECKPOINT")
        for name in ("epochs", "batch_size", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if bool(self.teacher) != bool(self.distill):
            raise ValueError("--teacher CHECKPOINT and --distill soft|hard|token go together: give both or neither")
        if self.l1 < 0:
            raise ValueError(f"--l1 {self.l1} must be >= 0")
        if self.token_consistency < 0:
            raise ValueError(f"--token-consistency {self.token_consistency} must be >= 0 (0: off; official 3.0)")
        if self.token_consistency > 0 and (self.teacher or self.opt == "sam" or self.l1 > 0):
            raise ValueError("--token-consistency cannot be combined with --teacher, --opt sam or --l1; drop one")
        if any(int(s) < 1 for s in self.progressive_sizes):
            raise ValueError(f"--progressive-sizes {self.progressive_sizes}: every image side must be >= 1, "
                             "e.g. 20,24,28")
        if self.progressive_sizes and self.compile:   # inductor fails on the resampled pos_embed's backward
            raise ValueError("--progressive-sizes cannot be combined with --compile (torch.compile fails on the "
                             "position embedding resampled to each size); drop --compile")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.recipe:
            parse_recipe(self.recipe)   # names the bad recipe or option before anything runs
            if self.token_consistency > 0:
                raise ValueError("--recipe cannot be combined with --token-consistency; drop one")


class TrainInterrupted(RuntimeError):
    """Raised by the test hook `_crash_at_step` to simulate a killed run."""


class RunExists(UserError):
    """--out names a folder that already holds a run or a checkpoint (nothing in it is touched)."""


def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    if cfg.init:
        model = create_model(cfg.init, **cfg.model_kwargs)
        spec = record(model).spec
        if cfg.model and spec["name"] != cfg.model:
            raise ValueError(f"--model {cfg.model} differs from the --init checkpoint's {spec['name']}")
        if getattr(model, "num_classes", num_classes) != num_classes:
            model.reset_classifier(num_classes)
            update_record(model, spec={**spec, "kwargs": {**spec["kwargs"], "num_classes": num_classes}})
    else:
        kwargs = dict(cfg.model_kwargs)
        kwargs.setdefault("num_classes", num_classes)
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(cfg.model, **kwargs)
    return model


MUON_OPTIMIZERS = ("muon", "nmuon", "adamuon", "nadamuon")


def muon_fallback(model: nn.Module) -> list[str]:
    """Parameter-name patterns that Muon leaves to its AdamW fallback: the classifier and timm's no-weight-decay
    parameters (position embeddings, class / register / distillation tokens). Muon orthogonalises the update of a
    hidden weight matrix; its author keeps input embeddings, the output layer and gains on AdamW."""
    patterns = set(getattr(model, "no_weight_decay", lambda: ())())
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    for name in (classifier,) if isinstance(classifier, str) else classifier:
        patterns |= {name, f"{name}.*"}
    return sorted(patterns)


def muon_fallback_by_role(model: nn.Module, output_layers: tuple[str, ...] = ()) -> list[str]:
    """Muon's AdamW-fallback parameter names for a model without timm's metadata (detectors, HF models): every
    parameter of 2 or more dimensions that is not the weight of a hidden Linear / Conv / MultiheadAttention input
    projection (embedding, position, query and bias tables), plus the weights of `output_layers` (module names:
    class and box predictors). 1-D parameters go to the fallback anyway."""
    hidden = {f"{name}.weight" for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and name not in output_layers}
    hidden |= {f"{name}.in_proj_weight" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return sorted(n for n, p in model.named_parameters() if p.ndim >= 2 and n not in hidden)


def _create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer `cfg.opt`; `sam` wraps AdamW; the Muon family routes `muon_fallback` to AdamW."""
    if cfg.opt == "sam":
        base_opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        return SAM(model.parameters(), base_opt, rho=cfg.sam_rho)
    extra = {}
    if cfg.opt.lower() in MUON_OPTIMIZERS:
        extra = dict(fallback_list=muon_fallback(model), fallback_no_weight_decay=True)
    return timm.optim.create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers under `blocks` (what --l1 penalizes and --keep-zeros holds)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".blocks." in f".{n}"]


def _zero_masks(cfg: TrainConfig, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, keep mask) for every block Linear with zero weights, when zeros are held (--keep-zeros, or by
    default for an --init checkpoint that `vitlab prune --apply lpvit:...` wrote): a block-sparse model stays
    block-sparse while it is fine-tuned, as LPViT's recovery does."""
    keep = cfg.keep_zeros
    if keep is None:
        pruned = record(model).config.get("training", {}).get("pruned", {})
        keep = str(pruned.get("technique", "")).startswith("lpvit")
    if not keep:
        return []
    masks = [(m.weight, m.weight.detach() != 0) for _, m in _block_linears(model)]
    masks = [(w, mask) for w, mask in masks if not bool(mask.all())]
    if cfg.keep_zeros and not masks:
        raise ValueError(f"--keep-zeros: no Linear weight under the blocks of {type(model).__name__} is zero; "
                         "prune first (vitlab prune CKPT --apply lpvit:sparsity=0.5 --data ... --out DIR)")
    return masks


def _datasets(cfg: TrainConfig, model: nn.Module):
    pre = default_preprocessing(model)
    c, h, w = pre["input_size"]
    common = dict(img_size=(h, w), in_chans=c, mean=pre["mean"], std=pre["std"], data_dir=cfg.data_dir)
    aug = {"hflip": cfg.hflip, "re_prob": cfg.re_prob}
    if cfg.crop_padding is not None:
        aug["crop_padding"] = cfg.crop_padding
    train = build_dataset(cfg.data, "train", train_aug=True, aug=aug, **common)
    val = build_dataset(cfg.data, "val", **common) if cfg.eval_val else None
    return train, val, pre


def _item_seed(seed: int, epoch: int, step: int, position: int) -> int:
    """A 63-bit seed for one image of one step (splitmix64 over the four numbers): the same whichever process or
    DataLoader worker loads it, and whatever was loaded before."""
    x = 0
    for v in (seed, epoch, step, position):
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


class _SeededItems(torch.utils.data.Dataset):
    """`dataset[index]` with torch's CPU RNG seeded from the item's own seed, for keys (index, seed) that
    `_EpochBatches` yields. In the main process (--workers 0) the RNG is restored afterwards, so dropout, drop path
    and mixup draw the same numbers with or without workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        gen = torch.random.default_generator   # CPU only: torch.manual_seed would re-seed CUDA too
        saved = gen.get_state() if torch.utils.data.get_worker_info() is None else None
        gen.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                gen.set_state(saved)


class _EpochBatches(torch.utils.data.Sampler):
    """This rank's slice of each global batch of a seeded per-epoch permutation, starting at `start_step`; each
    item is (index, seed) for `_SeededItems`, the seed from (seed, epoch, step, position in the global batch)."""

    def __init__(self, n: int, batch_size: int, epoch: int, seed: int, start_step: int, rt: Runtime):
        self.perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        self.batch_size, self.start_step, self.rt = batch_size, start_step, rt
        self.seed, self.epoch = seed, epoch
        self.steps = n // batch_size

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self):
        local = self.batch_size // self.rt.world_size
        for step in range(self.start_step, self.steps):
            batch = self.perm[step * self.batch_size:(step + 1) * self.batch_size].tolist()
            first = self.rt.rank * local
            yield [(batch[i], _item_seed(self.seed, self.epoch, step, i)) for i in range(first, first + local)]

    def indices(self, step: int) -> list[int]:
        """The dataset indices of this rank's images at `step` (what __iter__ yields, without the seeds)."""
        local = self.batch_size // self.rt.world_size
        first = step * self.batch_size + self.rt.rank * local
        return self.perm[first:first + local].tolist()


def _save_state(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist (was the run started with --out {path.parent}?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot resume from {path}: {e}") from None


def _flag(name: str) -> str:
    return {"eval_val": "--no-val", "progress": "--no-progress"}.get(name, "--" + name.replace("_", "-"))


def _existing_run(out: Path) -> RunExists | None:
    """The refusal for an --out that already holds a run or a checkpoint, or None."""
    if not out.is_dir():
        return None
    have = [name for name in RUN_FILES if (out / name).exists()]
    if not have:
        return None
    if STATE_FILE in have or METRICS_FILE in have:
        return RunExists(f"{out} already holds a run; continue it with --resume {out} or choose another --out / "
                         "pass --overwrite")
    return RunExists(f"{out} already holds a checkpoint ({', '.join(have)}); choose another --out / pass --overwrite")


def _check_new_run(cfg: TrainConfig, overwrite: bool) -> None:
    """Everything about a new run that can be refused without reading an image (before the folder is touched)."""
    out = Path(cfg.out)
    for flag, other in (("--init", cfg.init), ("--teacher", cfg.teacher)):
        if other and Path(other).exists() and Path(other).resolve() == out.resolve():
            raise RunExists(f"--out {out} is the {flag} checkpoint: choose another --out")
    info = dataset_info(cfg.data, data_dir=cfg.data_dir)
    if info["num_classes"] < 2:
        raise DataError(f"--data {cfg.data} has {info['num_classes']} class ({', '.join(info['classes'])}): "
                        "training a classifier needs at least 2 classes")
    if info["kind"] == "moving-fashion-mnist-pose":  # items (clip, label, keypoints): see data/video_pose.py
        raise DataError(f"--data {cfg.data} gives keypoints beside each clip, which the training loop does not take: "
                        "train on moving-fashion-mnist-cls (the same clips), with --recipe paat to use the pose")
    if not overwrite and (refusal := _existing_run(out)):
        raise refusal
    if cfg.epochs < cfg.warmup_epochs:
        warnings.warn(f"--epochs {cfg.epochs:g} is less than --warmup-epochs {cfg.warmup_epochs:g}: the learning "
                      "rate never leaves its warm-up and never decays; give fewer --warmup-epochs or more --epochs",
                      stacklevel=3)


def _resumed_config(state: dict, run: Path, changes: dict | None) -> tuple[TrainConfig, float | None]:
    """The run's saved config with `changes` applied: RESUME_CHANGEABLE ones are taken; any other that differs
    from the saved value is refused by name (UserError). Returns (config, the old epochs if epochs changed)."""
    saved = {**state["config"], "out": str(run)}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    defaults = dataclasses.asdict(TrainConfig(out=str(run), model="x"))
    refused, old_epochs = [], None
    for key, value in (changes or {}).items():
        if key not in names:
            raise ValueError(f"unknown TrainConfig setting {key!r}")
        old = saved.get(key, defaults.get(key))
        if key == "out":
            if Path(value).resolve() != run.resolve():
                refused.append(f"--out {value} (the run is in {run})")
            continue
        if old == value:
            continue
        if key == "epochs":
            old_epochs = old
        elif key not in RESUME_CHANGEABLE:
            shown = json.dumps(value) if isinstance(value, (dict, list)) else value
            was = json.dumps(old) if isinstance(old, (dict, list)) else old
            if isinstance(value, bool):
                flag = "--no-keep-zeros" if key == "keep_zeros" and not value else _flag(key)
                refused.append(f"{flag} (sets {key}={value}; the run has {was})")
            else:
                refused.append(f"{_flag(key)} {shown} (the run has {was})")
            continue
        saved[key] = value
    if refused:
        raise UserError(f"--resume {run}: {'; '.join(refused)}: a resumed run keeps the settings it started with "
                        "(only --epochs and " + ", ".join(_flag(k) for k in RESUME_CHANGEABLE[1:]) +
                        " may change); drop " + ("this flag" if len(refused) == 1 else "these flags") +
                        ", or start a new run with another --out")
    fields = {k: v for k, v in saved.items() if k in names}
    return TrainConfig(**fields), old_epochs


def _repair_metrics(run: Path, state: dict) -> None:
    """metrics.jsonl as the state saw it: a torn last line (a kill while writing it) is dropped, and so are lines
    written after the state was saved (their epoch is trained again), each with a warning."""
    path = run / METRICS_FILE
    if not path.is_file():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    tail = lines.pop()        # "" when the file ends with a newline
    good, torn = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            torn.append(line)
            continue
        good.append((line, record))
    if tail.strip():
        torn.append(tail)
    if "metrics_lines" in state:
        keep = good[:state["metrics_lines"]]
    else:   # a state from before metrics_lines was saved
        keep = [(line, r) for line, r in good if not (isinstance(r, dict) and isinstance(r.get("step"), int)
                                                      and r["step"] > state["global_step"])]
    later = len(good) - len(keep)
    if torn:
        warnings.warn(f"{path}: dropping {len(torn)} torn line(s) (a run killed while writing it): "
                      f"{torn[-1][:60]!r}", stacklevel=3)
    if later:
        warnings.warn(f"{path}: dropping {later} line(s) written after the last saved state (step "
                      f"{state['global_step']}); that epoch's end is run again", stacklevel=3)
    if torn or later:
        atomic_write_text(path, "".join(line + "\n" for line, _ in keep))


def _append_line(path: Path, record: dict) -> None:
    """One JSON line, appended with one write, flushed to disk (fsync) before returning."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(fd, data)
        while written < len(data):   # only on a full disk or the like
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


class _Aside:
    """overwrite=True: the old run's files are moved into a hidden folder inside the run folder (so the new run
    never mixes with them), deleted once the new run has finished, and moved back if it fails with an error. A kill
    leaves them there; the next run to finish in the folder deletes them."""

    def __init__(self, out: Path):
        self.out, self.folder = out, None
        names = [n for n in RUN_FILES if (out / n).exists() or (out / n).is_symlink()]
        if names:
            self.folder = Path(tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=out))
            for name in names:
                os.replace(out / name, self.folder / name)
            kill_point("train-moved-aside")

    def restore(self) -> None:
        """The new run failed: delete its files and put the old run's back."""
        if self.folder is None:
            return

        for name in RUN_FILES:
            target = self.out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            if (self.folder / name).exists() or (self.folder / name).is_symlink():
                os.replace(self.folder / name, target)
        shutil.rmtree(self.folder, ignore_errors=True)


def _delete_replaced(out: Path) -> None:
    for entry in out.iterdir():
        if entry.name.startswith(REPLACED_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def fit(cfg: TrainConfig | None = None, *, resume: str | None = None, overwrite: bool = False,
        changes: dict | None = None, _crash_at_step: int | None = None) -> Path:
    """Train as `cfg` says (or continue the run in folder `resume`); return the run folder.

    A new run refuses an `out` that already holds a run or a checkpoint (`RunExists`) unless `overwrite`, which
    replaces it only once the new run has finished. `changes` (with `resume`): settings given again (e.g. from the
    command line); `epochs` and RESUME_CHANGEABLE ones are applied, any other that differs from the run's is
    refused by name. The folder is locked while the run writes it (`FolderLocked` for a second process).
    """
    is_main = int(os.environ.get("RANK", "0")) == 0
    if resume is not None:
        if cfg is not None:
            raise ValueError("give a TrainConfig or resume=RUN_DIR, not both")
        out = Path(resume)
        if not (out / STATE_FILE).is_file():
            _load_state(out / STATE_FILE)   # raises the error that names the missing file
    else:
        if changes:
            raise ValueError("changes= goes with resume=RUN_DIR")
        cfg.validate()
        _check_new_run(cfg, overwrite)
        out = Path(cfg.out)
    old_epochs = None
    lock = lock_folder(out, "vitlab train", "--resume" if resume is not None else "--out") if is_main else None
    aside = None
    try:
        state = None
        if resume is not None:
            state = _load_state(out / STATE_FILE)
            cfg, old_epochs = _resumed_config(state, out, changes)
            cfg.validate()
            if old_epochs is not None and cfg.epochs < cfg.warmup_epochs and is_main:
                warnings.warn(f"--epochs {cfg.epochs:g} is less than --warmup-epochs {cfg.warmup_epochs:g}: the "
                              "learning rate never decays", stacklevel=2)
            if state.get("data_order") != DATA_ORDER and is_main:
                warnings.warn(f"{out / STATE_FILE} was written by an older vitlab that ordered and augmented images "
                              "differently: the resumed run is not bitwise the run it continues", stacklevel=2)
            if is_main:
                _repair_metrics(out, state)
        elif is_main:
            if not overwrite and (refusal := _existing_run(out)):   # again, now that the folder is ours
                raise refusal
            if overwrite:
                aside = _Aside(out)
        try:
            result = _fit(cfg, state, _crash_at_step, old_epochs)
        except BaseException:
            if aside is not None:
                aside.restore()
            raise
        if is_main:
            _delete_replaced(out)
        return result
    finally:
        if lock is not None:
            lock.release()


def _fit(cfg: TrainConfig, state: dict | None, _crash_at_step: int | None, old_epochs: float | None) -> Path:
    rt = setup_runtime(threads=cfg.threads)
    if cfg.batch_size % rt.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {rt.world_size} processes")
    seed_everything(cfg.seed)
    out = Path(cfg.out)


    num_classes = dataset_info(cfg.data, data_dir=cfg.data_dir)["num_classes"]
    model = _build_model(cfg, num_classes)
    # no calibration images while training: a technique that needs them refuses in its own handler
    model = model_loader.load(model, cfg.apply, calibration=lambda m: None)
    train_set, val_set, pre = _datasets(cfg, model)
    pre["class_names"] = list(train_set.classes)
    model.to(rt.device)
    if cfg.progressive_sizes:   # the training copy takes any size; the checkpoint keeps the model's fixed grid
        make_any_size(model)
        check_sizes(model, cfg.progressive_sizes, pre["input_size"][0], pre["input_size"][-1])

    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))

    teacher = None
    if cfg.teacher:
        teacher = create_model(cfg.teacher).to(rt.device).eval().requires_grad_(False)
        if cfg.distill == "token":
            model = add_distill_token(model).to(rt.device)
    recipe = None
    if cfg.recipe:
        recipe = parse_recipe(cfg.recipe)
        recipe.setup(model, train_set, cfg, rt)
    optimizer = _create_optimizer(model, cfg)
    clipped = list(model.parameters())
    if recipe is not None and (extra := recipe.parameters()):
        if cfg.opt == "sam":
            raise ValueError(f"--recipe {cfg.recipe} trains parameters of its own, which --opt sam does not; use adamw")
        clipped += list(extra)
        optimizer.add_param_group({**{k: v for k, v in optimizer.param_groups[0].items() if k != "params"},
                                   "params": list(extra)})
    l1_weights = [m.weight for _, m in _block_linears(model)]
    zero_masks = _zero_masks(cfg, model)
    if zero_masks and rt.is_main:
        held = sum(int((~mask).sum()) for _, mask in zero_masks)
        total = sum(m.weight.numel() for _, m in _block_linears(model))
        print(f"holding {held} zero weights ({100 * held / total:.1f} % of the blocks' Linear weights) at zero"
              + ("" if cfg.keep_zeros else " (LPViT checkpoint; --no-keep-zeros lets them train)"))
    if cfg.l1 > 0 and not l1_weights:
        raise ValueError(f"--l1 {cfg.l1}: {type(model).__name__} has no Linear layers under `blocks` to regularize")
    consistency = None
    if cfg.token_consistency > 0:
        from ..tokens.consistency import TokenConsistency, consistency_loss_step, draw_teacher_r

        if rt.distributed:
            raise ValueError("--token-consistency runs the model twice per step; use one process (no torchrun)")
        consistency = TokenConsistency(weight=cfg.token_consistency, threshold=cfg.token_consistency_threshold,
                                       teacher_r_max=cfg.token_consistency_teacher_r)
        draw_teacher_r(model, consistency)  # fails early, naming the fix, if no mctf/tome is applied
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps - 1)
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=total_steps - warmup, lr_min=cfg.min_lr, warmup_t=warmup, warmup_lr_init=cfg.lr * 1e-3,
        warmup_prefix=True, t_in_epochs=False)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = timm.data.Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                                num_classes=num_classes)
    ema = timm.utils.ModelEmaV3(model, decay=cfg.ema) if cfg.ema > 0 else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = nn.parallel.DistributedDataParallel(model) if rt.distributed else model
    forward, precision, speed_info = train_model, None, {}

    global_step, epoch, step_in_epoch, history = 0, 0, 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        global_step, epoch, step_in_epoch = state["global_step"], state["epoch"], state["step_in_epoch"]
        set_rng_state(state["rng"][rt.rank] if rt.rank < len(state["rng"]) else state["rng"][0])
        if old_epochs is not None:
            if global_step >= total_steps:
                raise UserError(f"--epochs {cfg.epochs:g}: the run has already trained {global_step} steps "
                                f"({global_step / steps_per_epoch:.2f} epochs); give more --epochs to continue it")
            if rt.is_main:
                how = "extending" if cfg.epochs > old_epochs else "shortening"
                print(f"vitlab train: --epochs {cfg.epochs:g}: {how} the run from {old_epochs:g} to {cfg.epochs:g} "
                      f"epochs; the learning-rate schedule is recomputed for {cfg.epochs:g} epochs and followed from "
                      f"step {global_step} on", file=sys.stderr)
        scheduler.step_update(global_step)   # the learning rate the next step uses (the same unless epochs changed)

    def checkpoint_state() -> dict:
        rngs = [rng_state()]
        if rt.distributed:
            gathered = [None] * rt.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return dict(config=dataclasses.asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
                    ema=ema.module.state_dict() if ema else None, global_step=global_step, epoch=epoch,
                    step_in_epoch=step_in_epoch, rng=rngs, data_order=DATA_ORDER, epoch_loss_sum=loss_sum,
                    epoch_seen=seen, metrics_lines=metrics_lines)

    # the epoch in progress carries on from the state (its metrics line then covers the whole epoch), and
    # metrics.jsonl has exactly the lines the state has seen written (fit() dropped any later ones)
    carried = (0.0, 0)
    if state is not None and step_in_epoch > 0:
        carried = (state.get("epoch_loss_sum", 0.0), state.get("epoch_seen", 0))
    metrics_lines = 0
    if state is not None and (out / METRICS_FILE).is_file():
        metrics_lines = len((out / METRICS_FILE).read_text().splitlines())
    loss_sum, seen = carried

    progress = _Progress(enabled=cfg.progress and rt.is_main, total=total_steps, done=global_step,
                         every=max(1, steps_per_epoch // 10))
    out.mkdir(parents=True, exist_ok=True)
    max_steps = min(total_steps, cfg.max_steps or total_steps)
    start = time.perf_counter()
    try:
        while global_step < max_steps:
            train_model.train()
            sampler = _EpochBatches(len(train_set), cfg.batch_size, epoch, cfg.seed, step_in_epoch, rt)
            # own generator: a DataLoader iterator otherwise draws its seed from the global RNG, so a resumed run would
            # draw once more than an uninterrupted one
            loader = torch.utils.data.DataLoader(_SeededItems(train_set), batch_sampler=sampler,
                                                 num_workers=cfg.workers,
                                                 generator=torch.Generator().manual_seed(cfg.seed + epoch))
            (loss_sum, seen), carried = carried, (0.0, 0)
            ips_seen, epoch_start = 0, time.perf_counter()   # images/s counts the images of this process's run
            for images, targets in loader:
                images, targets = images.to(rt.device), targets.to(rt.device)
                if cfg.progressive_sizes:   # this step's phase size (val stays at the dataset's size)
                    images = resize_batch(images, phase_size(cfg.progressive_sizes, global_step, total_steps))
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if precision is None:   # the first step: engine flags decided on the run's own first batch
                    forward, precision, speed_info = _speed_setup(cfg, model, train_model, images, targets, rt)
                soft = None
                if mixup is not None:
                    images, soft = mixup(images, targets)
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)

                teacher_r = draw_teacher_r(model, consistency) if consistency is not None else 0

                def default_loss() -> torch.Tensor:
                    if consistency is not None:  # student + teacher CE + consistency (vitlab/tokens/consistency.py)
                        def criterion(logits: torch.Tensor) -> torch.Tensor:
                            if soft is not None:
                                return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
                            return F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)

                        return consistency_loss_step(model, images, targets, criterion, consistency, teacher_r,
                                                     mixed=soft is not None)
                    with autocast(precision, rt.device):
                        out = forward(images)
                    out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
                    logits, dist_logits = out if isinstance(out, tuple) else (out, None)
                    if soft is not None:
                        loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
                    else:
                        loss = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
                    if teacher_logits is not None:
                        loss = distill_loss(logits, teacher_logits, targets, cfg.distill, cfg.distill_alpha,
                                            cfg.distill_tau, base_loss=loss, dist_logits=dist_logits)
                    if cfg.l1 > 0:
                        loss = loss + cfg.l1 * sum(w.abs().sum() for w in l1_weights)
                    return loss

                def compute_loss() -> torch.Tensor:
                    if recipe is None:
                        return default_loss()
                    return recipe.loss(Step(model=model, train_model=train_model, images=images, targets=targets,
                                            soft=soft, indices=sampler.indices(step_in_epoch), epoch=epoch,
                                            step=step_in_epoch, global_step=global_step, default_loss=default_loss))

                def backward() -> torch.Tensor:
                    loss = compute_loss()
                    loss.backward()
                    if cfg.clip_grad:
                        nn.utils.clip_grad_norm_(clipped, cfg.clip_grad)
                    return loss

                optimizer.zero_grad(set_to_none=True)
                loss = backward()
                if cfg.opt == "sam":
                    optimizer.step(backward)  # second forward/backward at the perturbed weights
                else:
                    optimizer.step()
                with torch.no_grad():
                    for weight, mask in zero_masks:
                        weight.mul_(mask)
                global_step += 1
                step_in_epoch += 1
                scheduler.step_update(global_step)
                if ema is not None:
                    ema.update(model, step=global_step)
                loss_sum += loss.item() * images.shape[0]
                seen += images.shape[0]
                ips_seen += images.shape[0]
                progress.update(global_step, epoch, loss.item(), optimizer.param_groups[0]["lr"],
                                ips_seen * rt.world_size / (time.perf_counter() - epoch_start))
                if cfg.save_every and global_step % cfg.save_every == 0:
                    _checkpoint_state = checkpoint_state()
                    if rt.is_main:
                        _save_state(out / STATE_FILE, **_checkpoint_state)
                if _crash_at_step is not None and global_step == _crash_at_step:
                    raise TrainInterrupted(f"simulated crash at step {global_step}")
                kill_point(f"train-step-{global_step}")
                if global_step >= max_steps:
                    break
            epoch_done = step_in_epoch >= steps_per_epoch
            if epoch_done:
                epoch, step_in_epoch = epoch + 1, 0
            record = {"epoch": epoch if epoch_done else epoch + step_in_epoch / steps_per_epoch, "step": global_step,
                      "train_loss": loss_sum / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
                      "img_per_s": ips_seen * rt.world_size / (time.perf_counter() - epoch_start),
                      "elapsed_s": time.perf_counter() - start}
            eval_model = ema.module if ema is not None else model
            eval_model = getattr(eval_model, "vit", eval_model)  # --distill token: the ViT with its class head
            _checkpoint_state = checkpoint_state()
            if rt.is_main:
                if val_set is not None:
                    # the evaluation's DataLoader draws its seed from torch's RNG: it must not move the training's
                    # (the state was taken before it, so a run resumed from an epoch's end would draw differently)
                    with torch.random.fork_rng(devices=[]):
                        val = evaluate(eval_model, val_set, batch_size=256, progress=False)
                    record.update(val_top1=val["top1"], val_top5=val["top5"], val_loss=val["loss"])
                history.append(record)
                progress.log(record)
                _append_line(out / METRICS_FILE, record)
                metrics_lines += 1
                _checkpoint_state["metrics_lines"] = metrics_lines
                kill_point(f"train-epoch-{epoch}-metrics")
                metrics = {k: v for k, v in record.items() if k.startswith("val_")}
                save_checkpoint(eval_model, out, preprocessing=pre,
                                data={"spec": str(cfg.data), "split": "train"}, metrics=metrics,
                                training={**dataclasses.asdict(cfg), "global_step": global_step, **speed_info,
                                          "weights": "ema" if ema is not None else "model"})
                _save_state(out / STATE_FILE, **_checkpoint_state)
            rt.barrier()
    finally:
        progress.close()
        rt.close()
    return out


def _speed_setup(cfg: TrainConfig, model: nn.Module, train_model: nn.Module, images: torch.Tensor,
                 targets: torch.Tensor, rt: Runtime) -> tuple:
    """(forward, precision, info): --precision decided by measurement on this batch (rank 0's choice for every rank)
    and --compile applied with its eager fallback (engine/speed.py); `info` goes into the checkpoint."""
    def plain_loss(fn) -> torch.Tensor:
        out = fn(images)
        return F.cross_entropy((out[0] if isinstance(out, tuple) else out).float(), targets)

    precision, how = choose_precision(cfg.precision, model, lambda: plain_loss(model), rt.device)
    if rt.distributed:
        chosen = [precision]
        torch.distributed.broadcast_object_list(chosen, src=0)
        precision = chosen[0]
    forward, failed = train_model, None
    if cfg.compile:
        with autocast(precision, rt.device):
            forward, failed = compile_forward(train_model, plain_loss)
    info = {"precision_used": precision, "precision_choice": how,
            "compiled": cfg.compile and failed is None, **({"compile_error": failed} if failed else {})}
    if rt.is_main and (cfg.precision == "auto" or cfg.compile):
        trial = (f" (float32 {how['fp32_ms']} ms, bf16 {how['bf16_ms']} ms per step on the first batch)"
                 if how.get("how") == "trial" else f" ({how['how']})")
        print(f"vitlab train: precision {precision}{trial}" + (", compiled" if info["compiled"] else ""),
              file=sys.stderr)
    return forward, precision, info


class _Progress:
    """rich progress bar with loss, lr, images/s and ETA (main process only); a plain line per epoch."""

    def __init__(self, enabled: bool, total: int, done: int, every: int):
        self.enabled, self.total, self.every, self.start = enabled, total, every, time.perf_counter()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal  # no live bar in logs and pipes: a plain line every `every` steps
        self.bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[ips]:.0f} img/s"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
                            transient=False)
        self.task = self.bar.add_task("train", total=total, completed=done, epoch=0, loss=float("nan"), lr=0.0, ips=0.0)
        self.done = done
        if self.live:
            self.bar.start()

    def update(self, step: int, epoch: int, loss: float, lr: float, ips: float) -> None:
        if not self.enabled:
            return
        if self.live:
            self.bar.update(self.task, completed=step, epoch=epoch, loss=loss, lr=lr, ips=ips)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(step - self.done, 1) * (self.total - step)
            self.console.print(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} {ips:.0f} img/s "
                               f"elapsed {elapsed / 60:.1f} min ETA {eta / 60:.1f} min", highlight=False)

    def log(self, record: dict) -> None:
        if self.enabled:
            text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.enabled and self.live:
            self.bar.stop()
