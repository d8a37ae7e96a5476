"""ViDT on fmnist-scenes detection at equal steps: (a) with vs without the deformable decoder neck, (b) [DET] x [PATCH]
cross-attention in the last stage only (ViDT's RAM) vs in every stage; AP on the test split, MACs by vitlab's counter.

    OMP_NUM_THREADS=1 python benchmarks/dense_vidt.py                  # seeds 0 1, 200 steps of batch 8 per run
    OMP_NUM_THREADS=1 python benchmarks/dense_vidt.py --seeds 0 1 2 --out vidt_rows.json

Every run is `vitlab train --task detection --head vidt[:options] --init checkpoints/fashion-mnist-swin` in-process
(`vitlab.dense.engine.fit_dense`: AdamW, warm-up + cosine, Hungarian-matched `BoxCriterion`, seeded batches), the
Swin classifier trained on 32 px Fashion-MNIST resized to 64 px scenes (patch 2, window 4, widths 24-192, depths
1/1/6/1). The checkpoint is reloaded with `vitlab.create_model` and scored with `evaluate_dense` (torchmetrics
`MeanAveragePrecision`, pycocotools backend) on the first `--test-scenes` test scenes. Prints a markdown table, the
per-claim verdicts, the CPU and the thread count.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vitlab
from vitlab.data import build_dense_dataset
from vitlab.dense.engine import DenseTrainConfig, evaluate_dense, fit_dense
from vitlab.profiling.cpu import cpu_name
from vitlab.profiling.flops import count_flops

ARMS = {  # label -> --head text
    "neck, last-stage cross": "vidt",
    "no neck, last-stage cross": "vidt:neck=false",
    "neck, every-stage cross": "vidt:cross_all_stages=true",
}


def run(label: str, head: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict:
    """Train one arm for `args.steps` steps, reload its checkpoint, return its test AP and MACs."""
    out = workdir / f"{label.replace(' ', '_').replace(',', '')}_s{seed}"
    start = time.perf_counter()
    fit_dense(DenseTrainConfig(out=str(out), task="detection", head=head, init=args.init,
                               data=f"fmnist-scenes:n={args.train_scenes}", steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr, seed=seed, threads=1, progress=False,
                               eval_images=args.val_scenes), overwrite=True)
    train_s = time.perf_counter() - start
    model = vitlab.create_model(str(out)).eval()
    test = build_dense_dataset("fmnist-scenes", "test")
    metrics = evaluate_dense(model, test, "detection", batch_size=32, limit=args.test_scenes)
    macs = count_flops(model, torch.zeros(1, 1, 64, 64)).macs
    return {"arm": label, "head": head, "seed": seed, "ap": 100 * metrics["ap"], "ap50": 100 * metrics["ap50"],
            "ap75": 100 * metrics["ap75"], "mmacs": macs / 1e6, "train_s": train_s,
            "wall_s": time.perf_counter() - start, "steps": args.steps, "batch_size": args.batch_size,
            "test_scenes": metrics["n"], "threads": torch.get_num_threads()}


def mean_ap(rows: list[dict], arm: str) -> float:
    return statistics.mean(r["ap"] for r in rows if r["arm"] == arm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--train-scenes", type=int, default=8000)
    parser.add_argument("--val-scenes", type=int, default=50)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--init", default="checkpoints/fashion-mnist-swin")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for label in args.arms:
                rows.append(run(label, ARMS[label], seed, args, Path(tmp)))
                r = rows[-1]
                print(f"# {label} seed {seed}: AP {r['ap']:.2f} ({r['wall_s']:.0f} s)", flush=True)
                if args.out:  # after every run, so a stopped sweep keeps what it measured
                    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")

    print(f"\nViDT on fmnist-scenes detection, {args.steps} steps x batch {args.batch_size}, init {args.init}, "
          f"AP on {rows[0]['test_scenes']} test scenes; {cpu_name()}, {torch.get_num_threads()} thread\n")
    print("| arm | seed | AP | AP50 | AP75 | MMACs | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['seed']} | {r['ap']:.2f} | {r['ap50']:.2f} | {r['ap75']:.2f} | {r['mmacs']:.1f} "
              f"| {r['train_s']:.0f} |")
    arms = set(args.arms)
    if {"neck, last-stage cross", "no neck, last-stage cross"} <= arms:
        neck, bare = mean_ap(rows, "neck, last-stage cross"), mean_ap(rows, "no neck, last-stage cross")
        wins = sum(a["ap"] > b["ap"] for a in rows for b in rows if a["seed"] == b["seed"]
                   and a["arm"] == "neck, last-stage cross" and b["arm"] == "no neck, last-stage cross")
        print(f"\nneck beats no neck in AP: {'reproduced' if neck > bare else 'not reproduced'} "
              f"(mean {neck:.2f} vs {bare:.2f}; {wins} of {len(args.seeds)} seeds)")
    if {"neck, last-stage cross", "neck, every-stage cross"} <= arms:
        last, every = mean_ap(rows, "neck, last-stage cross"), mean_ap(rows, "neck, every-stage cross")
        macs = {r["arm"]: r["mmacs"] for r in rows}
        ok = last >= every - 1.0 and macs["neck, last-stage cross"] < macs["neck, every-stage cross"]
        print(f"last-stage cross-attention within 1 AP of every stage at lower MACs: "
              f"{'reproduced' if ok else 'not reproduced'} (mean AP {last:.2f} vs {every:.2f}; "
              f"{macs['neck, last-stage cross']:.1f} vs {macs['neck, every-stage cross']:.1f} MMACs)")


if __name__ == "__main__":
    main()
