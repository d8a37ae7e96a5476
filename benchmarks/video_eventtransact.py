"""EventTransAct's VTN on moving-fashion-mnist-events, trained with and without the Event-Contrastive Loss.

All arms run the training engine (`vitlab train`) with the same seed, data, event augmentations (train_aug: the
official event drop), optimizer steps and schedule; the ECL arms add `--recipe ecl` (a second augmented view, NT-Xent
over 4 frames per clip; weight 1 is the official balance, 0.1 a lighter one; a second forward and backward per
step). Gradient clipping is off by default, as in the official train.py (`--clip-grad 1` is the engine's default:
there the ECL gradient, ~10x the CE one early on, takes up the whole clipped norm). Reported: val and test top-1 of
the final weights. The paper reports ECL helping on DVS Gesture and N-EPIC-Kitchens (its Table I / II); this is a
toy-scale check of whether the effect shows here, reported whichever way it goes.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/video_eventtransact.py
"""
import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine.evaluate import evaluate
from vitlab.engine.train import TrainConfig, fit


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vl_eventtransact_mfmnist")
    parser.add_argument("--clips", type=int, default=3200, help="train clips (val clips // 10, test clips // 5)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=2.0, help="the same optimizer steps in both arms")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-grad", type=float, default=0.0, help="0: no clipping (official)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = f"moving-fashion-mnist-events:clips={args.clips}"

    rows = []
    with tempfile.TemporaryDirectory(prefix="vitlab-eta-") as tmp:
        for arm, recipe in (("CE (no ECL)", None), ("CE + ECL (weight 1, official)", "ecl"),
                            ("CE + 0.1 ECL", "ecl:weight=0.1")):
            cfg = TrainConfig(out=f"{tmp}/{len(rows)}", model=args.model, data=data, epochs=args.epochs,
                              batch_size=args.batch, lr=args.lr, warmup_epochs=0.2, seed=args.seed, threads=1,
                              recipe=recipe, progress=False, clip_grad=args.clip_grad or None)
            start = time.perf_counter()
            run = fit(cfg)
            train_s = time.perf_counter() - start
            model = vitlab.create_model(str(run)).eval()
            acc = {split: evaluate(model, dataset_for(model, data, split), batch_size=64, progress=False)["top1"]
                   for split in ("val", "test")}
            steps = int(args.epochs * (args.clips // args.batch))
            rows.append((arm, steps, train_s, acc["val"], acc["test"]))

    print(f"\n{args.model} on {data} (2 x 10 x 32 x 32 event counts, 6 motion classes), batch {args.batch}, "
          f"lr {args.lr}, seed {args.seed}, clip-grad {args.clip_grad or 'off'}; {_cpu()}, 1 thread, "
          f"torch {torch.__version__}\n")
    print("| training | steps | train s | val top-1 | test top-1 |")
    print("|---|---|---|---|---|")
    for arm, steps, train_s, val, test in rows:
        print(f"| {arm} | {steps} | {train_s:.0f} | {100 * val:.1f} % | {100 * test:.1f} % |")


if __name__ == "__main__":
    main()
