"""TinyViT fast distillation at small scale: stored top-k teacher probabilities vs online distillation vs none.

    OMP_NUM_THREADS=1 python benchmarks/fastkd.py                  # 1 epoch of 55,000: ~4 min of CPU at 1 thread
    OMP_NUM_THREADS=1 python benchmarks/fastkd.py --data fashion-mnist:percent=10 --epochs 10   # 10 % of the images
    OMP_NUM_THREADS=1 python benchmarks/fastkd.py --epochs 0.02    # a quick smoke run

Teacher: checkpoints/fashion-mnist-reference (vl_vit_fmnist, width 96, depth 4). Student: a smaller vl_vit_fmnist
(width 32, depth 2, stem 8/16/32), trained for the same steps, seed and augmentation in three ways:
  none    label-smoothed cross-entropy (the engine's default loss)
  online  TinyViT's loss with the teacher run at every step: soft-target CE against its full softmax
  fastkd  the teacher run once beforehand (`save_teacher_logits`, = vitlab distill-logits), its top-k probabilities
          replayed with the rest of the mass spread uniformly (`--recipe fastkd:store=...`), no teacher forward
Prints a markdown table: test top-1 (10,000 images, read once per student), time per epoch, and the teacher's
share of the online run (its forwards, CPU-timed inside the step) next to the one-off cost of writing the store.
Speed is reported as process CPU time at 1 thread: on a shared machine the wall clock also counts waiting.
"""
import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine import TrainConfig, evaluate, fit
from vitlab.engine.fastkd import save_teacher_logits, soft_target_cross_entropy
from vitlab.engine.recipes import Recipe, Step, register_recipe
from vitlab.profiling import cpu_flags_text, cpu_name

ROOT = Path(__file__).resolve().parents[1]
STUDENT = dict(embed_dim=32, depth=2, num_heads=2, stem_widths=[8, 16, 32])
RUN = dict(model="vl_vit_fmnist", batch_size=128, lr=2e-3, warmup_epochs=0.1, hflip=0.5,
           crop_padding=0, seed=0, threads=1, eval_val=False, progress=False)


@register_recipe("_bench_online_tinyvit")
@dataclass
class OnlineTinyViT(Recipe):
    """fastkd's loss from a teacher forward at every step (full softmax), timing the teacher's share."""

    teacher: str = ""
    seconds: ClassVar[float] = 0.0   # the teacher forwards of the last run, read after fit()

    def setup(self, model, train_set, cfg, rt) -> None:
        self.model = vitlab.create_model(self.teacher).eval()
        OnlineTinyViT.seconds = 0.0

    def loss(self, step: Step) -> torch.Tensor:
        start = time.process_time()
        with torch.no_grad():
            targets = self.model(step.images).softmax(-1)   # (B, C)
        OnlineTinyViT.seconds += time.process_time() - start
        return soft_target_cross_entropy(step.train_model(step.images), targets)


def train(out: Path, data: str, epochs: float, **kw) -> tuple[dict, float, float]:
    """Train one student; return its test metrics, the training wall time and the process's CPU time (at 1 thread
    the compute itself, less sensitive than the wall clock to other work on a shared machine)."""
    cfg = TrainConfig(out=str(out), data=data, epochs=epochs, model_kwargs=STUDENT, **RUN, **kw)
    start, cpu = time.perf_counter(), time.process_time()
    run = fit(cfg, overwrite=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    model = vitlab.create_model(run)
    return evaluate(model, dataset_for(model, "fashion-mnist", "test"), progress=False), seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(ROOT / "checkpoints" / "fashion-mnist-reference"))
    parser.add_argument("--data", default="fashion-mnist",
                        help="training data, e.g. fashion-mnist:percent=10 (the teacher saw all of it)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--out", default="runs/fastkd")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    print(f"{cpu_name()} ({cpu_flags_text()}); torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    store = out / f"store-top{args.topk}"
    store_cpu = time.process_time()
    manifest = save_teacher_logits(args.teacher, store, data=args.data, epochs=args.epochs, topk=args.topk,
                                   overwrite=True, progress=False,
                                   **{k: RUN[k] for k in ("batch_size", "seed", "hflip", "crop_padding")})
    store_cpu = time.process_time() - store_cpu
    store_mb = sum(p.stat().st_size for p in store.iterdir()) / 2**20
    steps, per_epoch = manifest["steps"], manifest["steps_per_epoch"]
    rows = {}
    rows["none"] = train(out / "none", args.data, args.epochs)
    online = f"_bench_online_tinyvit:teacher={args.teacher}"
    rows["online"] = train(out / "online", args.data, args.epochs, recipe=online)
    online_teacher_s = OnlineTinyViT.seconds
    rows["fastkd"] = train(out / f"fastkd-top{args.topk}", args.data, args.epochs, recipe=f"fastkd:store={store}")
    teacher_s = manifest["teacher_seconds"]
    teacher = vitlab.create_model(args.teacher)
    teacher_top1 = evaluate(teacher, dataset_for(teacher, "fashion-mnist", "test"), progress=False)["top1"]

    print(f"\nteacher {Path(args.teacher).name}: {100 * teacher_top1:.2f} % test top-1; student vl_vit_fmnist "
          f"{json.dumps(STUDENT)}; {steps} steps of {RUN['batch_size']} ({args.epochs:g} epoch(s) of "
          f"{manifest['settings']['train_images']:,} {args.data} images), "
          f"seed {RUN['seed']}\n")
    print(f"| student loss | test top-1 | train wall s | CPU s | CPU s / epoch ({per_epoch} steps) |")
    print("|---|---|---|---|---|")
    names = {"none": "none (label-smoothed CE)", "online": "online TinyViT KD (teacher forward every step)",
             "fastkd": f"fastkd replay, top-{args.topk} of 10 stored"}
    for key, (metrics, seconds, cpu) in rows.items():
        print(f"| {names[key]} | {100 * metrics['top1']:.2f} % | {seconds:.0f} | {cpu:.0f} | "
              f"{cpu / steps * per_epoch:.0f} |")
    online_s, replay_s = rows["online"][2], rows["fastkd"][2]
    epoch = per_epoch / steps   # from this run's steps to one epoch
    print(f"\nper epoch (CPU s): online {online_s * epoch:.0f} vs replay {replay_s * epoch:.0f} "
          f"(saved {(online_s - replay_s) * epoch:.0f} s/epoch, {online_s / replay_s:.2f}x; the online run's "
          f"teacher forwards took {online_teacher_s / steps * per_epoch:.0f} s/epoch); writing the store once took "
          f"{teacher_s:.0f} s wall, {store_cpu:.0f} s CPU ({store_cpu / steps * per_epoch:.0f} CPU s/epoch, "
          f"{store_mb:.2f} MiB on disk, teacher top-1 on the augmented training images "
          f"{100 * manifest['teacher_top1_augmented']:.1f} %)")
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
