"""GiT (boxes as tokens on a plain ViT) vs a DETR-style head on the same ViT, fmnist-scenes detection, equal steps.

    OMP_NUM_THREADS=1 python benchmarks/agents_git.py                    # seed 0, 200 steps of batch 8 per arm
    OMP_NUM_THREADS=1 python benchmarks/agents_git.py --seeds 0 1 2 --steps 600

Both arms start from the trained reference ViT `checkpoints/fashion-mnist-reference-v2` (resized to 64 px scenes) and
train with the same loop (`vitlab.agents.git.train_detector`: AdamW, warm-up + cosine, seeded batches of the same
scenes) for the same number of optimizer steps: GiT (`vitlab.agents.git.GiT`: a 5 x 5 grid of points, box tokens
over 2 x 64 bins, grid-point matching, teacher-forced parallel decoding, 2 new ViT blocks as GiT's "new_more_layers")
with its token cross-entropy, and `detr-lite` (vitlab/dense/heads.py: ViTDet simple feature pyramid + 3-layer DETR
decoder, 20 queries) with the Hungarian `BoxCriterion` (class CE + L1 + GIoU). AP by the shared `DenseMetrics`
(torchmetrics MeanAveragePrecision, pycocotools backend) on the first `--test-scenes` test scenes; GiT decodes greedily.
Prints a markdown table, the verdict on the toy-scale target (GiT AP >= 80 % of the DETR-style AP), CPU and threads.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vitlab.agents.git import compare
from vitlab.profiling.cpu import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--test-scenes", type=int, default=200)
    parser.add_argument("--grid", type=int, default=5)
    parser.add_argument("--init", default="checkpoints/fashion-mnist-reference-v2")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        rows.append({"seed": seed, **compare(args.steps, args.train_scenes, args.test_scenes, args.init, seed=seed,
                                             batch_size=args.batch_size, lr=args.lr, grid=args.grid),
                     "wall_s": round(time.perf_counter() - start, 1)})
        print(f"# seed {seed}: {rows[-1]}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")

    print(f"\nGiT vs DETR-style head on fmnist-scenes detection, {args.steps} steps x batch {args.batch_size}, "
          f"init {args.init}, AP on {args.test_scenes} test scenes; {cpu_name()}, {torch.get_num_threads()} thread\n")
    print("| head | seed | params | AP | AP50 | AP75 | final loss | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for kind, label in (("git", "GiT (box tokens, grid matching)"), ("detr", "detr-lite (L1 + GIoU)")):
            print(f"| {label} | {r['seed']} | {r[f'{kind}_params'] / 1e3:.0f}k | {r[f'{kind}_ap']:.2f} "
                  f"| {r[f'{kind}_ap50']:.2f} | {r[f'{kind}_ap75']:.2f} | {r[f'{kind}_final_loss']:.3f} "
                  f"| {r[f'{kind}_train_s']:.0f} |")
    git_ap = statistics.mean(r["git_ap"] for r in rows)
    detr_ap = statistics.mean(r["detr_ap"] for r in rows)
    ratio = git_ap / detr_ap if detr_ap > 0 else float("nan")
    print(f"\nGiT AP >= 80 % of the DETR-style AP: {'reproduced' if ratio >= 0.8 else 'not reproduced'} "
          f"(mean {git_ap:.2f} vs {detr_ap:.2f}, ratio {ratio:.2f} over {len(rows)} seed(s)); "
          f"wall {sum(r['wall_s'] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
