"""GiT (boxes as tokens on a plain ViT) vs a DETR-style head on the same ViT, fmnist-scenes detection, equal steps.

    OMP_NUM_THREADS=1 python benchmarks/agents_git.py --sweep-only --steps 1000 --git-lrs 1e-3 3e-3 1e-2 --detr-lrs 3e-4 1e-3 3e-3 1e-2
    OMP_NUM_THREADS=1 python benchmarks/agents_git.py --seeds 0 1 2 --git-lr 3e-3 --detr-lr 3e-3 --out rows.json
    python benchmarks/agents_git.py --table rows-0.json rows-1.json rows-2.json    # merge runs made in parallel

Both arms start from the trained reference ViT `checkpoints/fashion-mnist-reference-v4` (resized to 64 px scenes) and
train with the same loop (`vitlab.agents.git.train_detector`: `--opt` Muon (default; embeddings and output layers on
its AdamW fallback) or AdamW, warm-up + cosine, seeded batches of the same scenes) for the same number of optimizer
steps (`--steps`, default 3000): GiT (`vitlab.agents.git.GiT`: a 5 x 5 grid of points, box tokens
over 2 x 64 bins, grid-point matching, teacher-forced parallel decoding, 2 new ViT blocks as GiT's "new_more_layers")
with its token cross-entropy, and `detr-lite` (vitlab/dense/heads.py: ViTDet simple feature pyramid + 3-layer DETR
decoder, 20 queries) with the Hungarian `BoxCriterion` (class CE + L1 + GIoU). Each head trains at its own learning
rate, chosen by `--git-lrs` / `--detr-lrs`: a sweep (`vitlab.agents.git.sweep_lr`, seed 0, same steps) scored on
`--val-scenes` scenes of the `val` split, never the test scenes. AP by the shared `DenseMetrics` (torchmetrics
MeanAveragePrecision, pycocotools backend) on the first `--test-scenes` test scenes; GiT decodes greedily.
Prints a markdown table, the GiT/DETR AP ratio per seed, the verdict on the toy-scale target (GiT AP >= 80 % of the
DETR-style AP) per seed and on the mean, CPU and threads.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vitlab.agents.git import compare, sweep_lr
from vitlab.profiling.cpu import cpu_name

LABELS = {"git": "GiT (box tokens, grid matching)", "detr": "detr-lite (L1 + GIoU)"}


def _sweep(kind: str, lrs: list[float], args) -> float:
    """The LR of `lrs` with the best val AP (ties: AP50) for head `kind`; prints the sweep's rows."""
    options = {"grid": args.grid} if kind == "git" else {}
    res = sweep_lr(kind, lrs, args.sweep_steps or args.steps, args.train_scenes, args.val_scenes, args.init,
                   seed=0, batch_size=args.batch_size, opt=args.opt, **options)
    for lr, m in res.items():
        print(f"# sweep {kind} lr {lr:g}: val AP {m['ap']:.2f} AP50 {m['ap50']:.2f} AP75 {m['ap75']:.2f} "
              f"loss curve {m['curve']}", flush=True)
    return max(res, key=lambda lr: (res[lr]["ap"], res[lr]["ap50"]))


def table(rows: list[dict]) -> None:
    """Markdown table of the rows, the per-seed GiT / DETR ratios and the verdict."""
    first = rows[0]
    print(f"\nGiT vs DETR-style head on fmnist-scenes detection, {first['steps']} steps x batch {first['batch_size']}, "
          f"{first.get('opt', 'adamw')}, "
          f"AP on {first['test_scenes']} test scenes; {cpu_name()}, {torch.get_num_threads()} thread\n")
    print("| head | seed | lr | params | AP | AP50 | AP75 | loss first -> last | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for kind, label in LABELS.items():
            if f"{kind}_ap" in r:
                curve = r.get(f"{kind}_curve") or [float("nan")]
                print(f"| {label} | {r['seed']} | {r[f'{kind}_lr']:g} | {r[f'{kind}_params'] / 1e3:.0f}k "
                      f"| {r[f'{kind}_ap']:.2f} | {r[f'{kind}_ap50']:.2f} | {r[f'{kind}_ap75']:.2f} "
                      f"| {curve[0]:.3f} -> {r[f'{kind}_final_loss']:.3f} | {r[f'{kind}_train_s']:.0f} |")
    both = [r for r in rows if "git_ap" in r and "detr_ap" in r]
    if not both:
        return
    ratios = [r["git_ap"] / r["detr_ap"] if r["detr_ap"] > 0 else float("nan") for r in both]
    met = sum(x >= 0.8 for x in ratios)
    git_ap, detr_ap = statistics.mean(r["git_ap"] for r in both), statistics.mean(r["detr_ap"] for r in both)
    ratio = git_ap / detr_ap if detr_ap > 0 else float("nan")
    print("\nGiT / DETR AP per seed: " + ", ".join(f"seed {r['seed']} {x:.2f}" for r, x in zip(both, ratios)))
    print(f"GiT AP >= 80 % of the DETR-style AP: {'reproduced' if ratio >= 0.8 else 'not reproduced'} on the mean "
          f"({git_ap:.2f} vs {detr_ap:.2f}, ratio {ratio:.2f}), met in {met} of {len(both)} seed(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--git-lr", type=float, help="GiT's learning rate (default: the best of --git-lrs)")
    parser.add_argument("--detr-lr", type=float, help="detr-lite's learning rate (default: the best of --detr-lrs)")
    parser.add_argument("--git-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--detr-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--sweep-steps", type=int, help="steps of each sweep run (default --steps)")
    parser.add_argument("--sweep-only", action="store_true", help="run the val sweeps, print them, stop")
    parser.add_argument("--heads", nargs="+", default=["git", "detr"], choices=["git", "detr"])
    parser.add_argument("--train-scenes", type=int, default=6000)
    parser.add_argument("--val-scenes", type=int, default=200)
    parser.add_argument("--test-scenes", type=int, default=200)
    parser.add_argument("--grid", type=int, default=5)
    parser.add_argument("--opt", default="muon", choices=["adamw", "muon"],
                        help="optimizer of both heads (muon: timm's Muon, embeddings and output layers on AdamW)")
    parser.add_argument("--init", default="checkpoints/fashion-mnist-reference-v4")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the table of rows saved by --out, stop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.table:
        merged: dict[int, dict] = {}   # one head per file is fine: rows of the same seed are joined
        for path in args.table:
            for row in json.loads(Path(path).read_text()):
                merged.setdefault(row["seed"], {}).update(row)
        table([merged[seed] for seed in sorted(merged)])
        return

    lrs = {"git": args.git_lr, "detr": args.detr_lr}
    for kind in args.heads:
        if lrs[kind] is None or args.sweep_only:
            lrs[kind] = _sweep(kind, args.git_lrs if kind == "git" else args.detr_lrs, args)
            print(f"# {kind}: val-selected lr {lrs[kind]:g}", flush=True)
    if args.sweep_only:
        return
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        rows.append({"seed": seed, **compare(args.steps, args.train_scenes, args.test_scenes, args.init, seed=seed,
                                             batch_size=args.batch_size, grid=args.grid, git_lr=lrs["git"],
                                             detr_lr=lrs["detr"], heads=tuple(args.heads), opt=args.opt),
                     "wall_s": round(time.perf_counter() - start, 1)})
        print(f"# seed {seed}: {rows[-1]}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    table(rows)


if __name__ == "__main__":
    main()
