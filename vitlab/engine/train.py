"""A plain training loop: AdamW, warm-up + cosine, label smoothing, mixup/cutmix, random erasing, EMA, clipping.

Seeded and deterministic on CPU; resumable mid-epoch with bitwise-identical results; multi-process with
`torchrun --nproc_per_node=N -m vitlab train ...` (DistributedDataParallel, same *global* batch semantics: each of
N ranks takes its 1/N slice of the global batch, so N processes compute the same update as one).

Run folder (`--out RUN_DIR`):
    model.safetensors + config.json   the checkpoint (latest epoch; EMA weights when --ema is on)
    train_state.pt                    everything `--resume` needs (tensors and plain types: loads weights_only=True)
    metrics.jsonl                     one JSON line per epoch
"""
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, create_model, default_preprocessing, save_checkpoint
from ..techniques import apply_, parse_apply
from ..utils.io import atomic_path
from .runtime import Runtime, rng_state, seed_everything, set_rng_state, setup_runtime

__all__ = ["TrainConfig", "fit", "TrainInterrupted"]

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


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


class TrainInterrupted(RuntimeError):
    """Raised by the test hook `_crash_at_step` to simulate a killed run."""


def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    if cfg.init:
        model = create_model(cfg.init, **cfg.model_kwargs)
        if cfg.model and model.vitlab_model_spec["name"] != cfg.model:
            raise ValueError(f"--model {cfg.model} differs from the --init checkpoint's {model.vitlab_model_spec['name']}")
        if getattr(model, "num_classes", num_classes) != num_classes:
            model.reset_classifier(num_classes)
            model.vitlab_model_spec["kwargs"]["num_classes"] = num_classes
    else:
        kwargs = dict(cfg.model_kwargs)
        kwargs.setdefault("num_classes", num_classes)
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(cfg.model, **kwargs)
    return model


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers under `blocks` (what --l1 penalizes and --keep-zeros holds)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".blocks." in f".{n}"]


def _zero_masks(cfg: TrainConfig, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, keep mask) for every block Linear with zero weights, when zeros are held (--keep-zeros, or by
    default for an --init checkpoint that `vitlab prune --apply lpvit:...` wrote): a block-sparse model stays
    block-sparse while it is fine-tuned, as LPViT's recovery does."""
    keep = cfg.keep_zeros
    if keep is None:
        pruned = getattr(model, "vitlab_checkpoint", {}).get("config", {}).get("training", {}).get("pruned", {})
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
    from ..data import build_dataset

    pre = default_preprocessing(model)
    c, h, w = pre["input_size"]
    common = dict(img_size=(h, w), in_chans=c, mean=pre["mean"], std=pre["std"], data_dir=cfg.data_dir)
    aug = {"hflip": cfg.hflip, "re_prob": cfg.re_prob}
    if cfg.crop_padding is not None:
        aug["crop_padding"] = cfg.crop_padding
    train = build_dataset(cfg.data, "train", train_aug=True, aug=aug, **common)
    val = build_dataset(cfg.data, "val", **common) if cfg.eval_val else None
    return train, val, pre


class _EpochBatches(torch.utils.data.Sampler):
    """This rank's slice of each global batch of a seeded per-epoch permutation, starting at `start_step`."""

    def __init__(self, n: int, batch_size: int, epoch: int, seed: int, start_step: int, rt: Runtime):
        self.perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        self.batch_size, self.start_step, self.rt = batch_size, start_step, rt
        self.steps = n // batch_size

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self):
        local = self.batch_size // self.rt.world_size
        for step in range(self.start_step, self.steps):
            batch = self.perm[step * self.batch_size:(step + 1) * self.batch_size]
            yield batch[self.rt.rank * local:(self.rt.rank + 1) * local].tolist()


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


def fit(cfg: TrainConfig | None = None, *, resume: str | None = None, _crash_at_step: int | None = None) -> Path:
    """Train as `cfg` says (or continue the run in folder `resume`); return the run folder."""
    import timm.data
    import timm.optim
    import timm.scheduler
    import timm.utils

    state = None
    if resume is not None:
        state = _load_state(Path(resume) / STATE_FILE)
        cfg = TrainConfig(**{**state["config"], "out": str(resume)})
    cfg.validate()
    rt = setup_runtime(threads=cfg.threads)
    if cfg.batch_size % rt.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {rt.world_size} processes")
    seed_everything(cfg.seed)
    out = Path(cfg.out)

    from ..data import dataset_info

    num_classes = dataset_info(cfg.data, data_dir=cfg.data_dir)["num_classes"]
    model = _build_model(cfg, num_classes)
    model = apply_(model, parse_apply(cfg.apply))
    train_set, val_set, pre = _datasets(cfg, model)
    pre["class_names"] = list(train_set.classes)
    model.to(rt.device)

    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    from .distill import add_distill_token, distill_loss

    teacher = None
    if cfg.teacher:
        teacher = create_model(cfg.teacher).to(rt.device).eval().requires_grad_(False)
        if cfg.distill == "token":
            model = add_distill_token(model).to(rt.device)
    if cfg.opt == "sam":
        from .sam import SAM

        base_opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        optimizer = SAM(model.parameters(), base_opt, rho=cfg.sam_rho)
    else:
        optimizer = timm.optim.create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    train_model = nn.parallel.DistributedDataParallel(model) if rt.distributed else model

    global_step, epoch, step_in_epoch, history = 0, 0, 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        global_step, epoch, step_in_epoch = state["global_step"], state["epoch"], state["step_in_epoch"]
        set_rng_state(state["rng"][rt.rank] if rt.rank < len(state["rng"]) else state["rng"][0])

    def checkpoint_state() -> dict:
        rngs = [rng_state()]
        if rt.distributed:
            gathered = [None] * rt.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return dict(config=dataclasses.asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
                    ema=ema.module.state_dict() if ema else None, global_step=global_step, epoch=epoch,
                    step_in_epoch=step_in_epoch, rng=rngs)

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
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers,
                                                 generator=torch.Generator().manual_seed(cfg.seed + epoch))
            loss_sum, seen, epoch_start = 0.0, 0, time.perf_counter()
            for images, targets in loader:
                images, targets = images.to(rt.device), targets.to(rt.device)
                soft = None
                if mixup is not None:
                    images, soft = mixup(images, targets)
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)

                teacher_r = draw_teacher_r(model, consistency) if consistency is not None else 0

                def compute_loss() -> torch.Tensor:
                    if consistency is not None:  # student + teacher CE + consistency (vitlab/tokens/consistency.py)
                        def criterion(logits: torch.Tensor) -> torch.Tensor:
                            if soft is not None:
                                return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
                            return F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)

                        return consistency_loss_step(model, images, targets, criterion, consistency, teacher_r,
                                                     mixed=soft is not None)
                    out = train_model(images)
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

                def backward() -> torch.Tensor:
                    loss = compute_loss()
                    loss.backward()
                    if cfg.clip_grad:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
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
                progress.update(global_step, epoch, loss.item(), optimizer.param_groups[0]["lr"],
                                seen * rt.world_size / (time.perf_counter() - epoch_start))
                if cfg.save_every and global_step % cfg.save_every == 0:
                    _checkpoint_state = checkpoint_state()
                    if rt.is_main:
                        _save_state(out / STATE_FILE, **_checkpoint_state)
                if _crash_at_step is not None and global_step == _crash_at_step:
                    raise TrainInterrupted(f"simulated crash at step {global_step}")
                if global_step >= max_steps:
                    break
            epoch_done = step_in_epoch >= steps_per_epoch
            if epoch_done:
                epoch, step_in_epoch = epoch + 1, 0
            record = {"epoch": epoch if epoch_done else epoch + step_in_epoch / steps_per_epoch, "step": global_step,
                      "train_loss": loss_sum / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
                      "img_per_s": seen * rt.world_size / (time.perf_counter() - epoch_start),
                      "elapsed_s": time.perf_counter() - start}
            eval_model = ema.module if ema is not None else model
            eval_model = getattr(eval_model, "vit", eval_model)  # --distill token: the ViT with its class head
            _checkpoint_state = checkpoint_state()
            if rt.is_main:
                if val_set is not None:
                    from .evaluate import evaluate

                    val = evaluate(eval_model, val_set, batch_size=256, progress=False)
                    record.update(val_top1=val["top1"], val_top5=val["top5"], val_loss=val["loss"])
                history.append(record)
                progress.log(record)
                with open(out / METRICS_FILE, "a") as f:
                    f.write(json.dumps(record) + "\n")
                metrics = {k: v for k, v in record.items() if k.startswith("val_")}
                save_checkpoint(eval_model, out, preprocessing=pre,
                                data={"spec": str(cfg.data), "split": "train"}, metrics=metrics,
                                training={**dataclasses.asdict(cfg), "global_step": global_step,
                                          "weights": "ema" if ema is not None else "model"})
                _save_state(out / STATE_FILE, **_checkpoint_state)
            rt.barrier()
    finally:
        progress.close()
        rt.close()
    return out


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
