"""The dense baselines on fmnist-scenes: Semantic FPN (mIoU) and DETR-lite boxes (AP) over a plain ViT and Swin.

Each (backbone, head) pair trains for the same optimizer steps on the same batches through the product path
(`vitlab.dense.engine.fit_dense`, what `vitlab train --task ... --head ...` runs: AdamW, warm-up + cosine, the
shared criteria of vitlab.dense.matching) and is scored on the test scenes with the shared torchmetrics metrics
(`evaluate_dense`). Backbones:

- `vl_vit_fmnist`, random init, through ViTDet's simple feature pyramid (strides 4/8/16/32);
- `vl_vit_fmnist` from `checkpoints/fashion-mnist-reference-v2` (the `--init` path: Fashion-MNIST classification
  weights, position embedding resampled from 7x7 to 16x16 tokens), same pyramid;
- a small Swin (timm `swin_tiny_patch4_window7_224` with embed_dim 32, depths 2/2/2/2, window 4), random init,
  its four stages as the features (hierarchical path).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/dense_baselines.py
    .venv/bin/python benchmarks/dense_baselines.py --steps 5 --test 16      # smoke run
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/dense_baselines.py --steps 150 --backbones 1 2
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vitlab.data import build_dense_dataset
from vitlab.dense.engine import TASK_METRIC, DenseTrainConfig, evaluate_dense, fit_dense, load_dense
from vitlab.profiling import cpu_name

REFERENCE = str(Path(__file__).resolve().parent.parent / "checkpoints" / "fashion-mnist-reference-v2")
SWIN = dict(window_size=4, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])
BACKBONES = {   # label -> (backbone, init, backbone_kwargs)
    "vl_vit_fmnist (scratch)": ("vl_vit_fmnist", None, {}),
    "vl_vit_fmnist (--init reference-v2)": (None, REFERENCE, {}),
    "Swin 32/2-2-2-2 (scratch)": ("swin_tiny_patch4_window7_224", None, SWIN),
}
HEADS = {"semantic-fpn": "semantic", "detr-lite": "detection"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--scenes", type=int, default=4000, help="training canvases (test: scenes // 10)")
    ap.add_argument("--test", type=int, default=None, help="score on the first N test scenes (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbones", nargs="+", type=int, default=list(range(len(BACKBONES))),
                    help=f"which backbones, by index: {', '.join(f'{i} {k}' for i, k in enumerate(BACKBONES))}")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = f"fmnist-scenes:n={args.scenes}"
    test = build_dense_dataset(data, "test")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dense_baselines_") as tmp:
        for label in [list(BACKBONES)[i] for i in args.backbones]:
            backbone, init, kwargs = BACKBONES[label]
            for head, task in HEADS.items():
                out = Path(tmp) / f"{len(rows)}"
                start = time.perf_counter()
                fit_dense(DenseTrainConfig(out=str(out), task=task, head=head, backbone=backbone, init=init,
                                           backbone_kwargs=kwargs, data=data, steps=args.steps,
                                           batch_size=args.batch, lr=args.lr, seed=args.seed, eval_images=50,
                                           progress=False))
                train_s = time.perf_counter() - start
                model = load_dense(out)
                result = evaluate_dense(model, test, task, limit=args.test)
                params = sum(p.numel() for p in model.parameters())
                rows.append((label, head, task, result, params, train_s))
                metric = TASK_METRIC[task]
                print(f"{label} + {head}: {metric} {100 * result[metric]:.2f} on {result['n']} test scenes "
                      f"({params / 1e6:.2f} M params, {train_s:.0f} s)", flush=True)

    print(f"\n{args.steps} AdamW steps of batch {args.batch} (lr {args.lr:g}, warm-up {args.steps // 20}, cosine), "
          f"seed {args.seed}, {data}; {cpu_name()}, {torch.get_num_threads()} thread\n")
    print("| backbone | head | task | test metric | params | train wall |")
    print("|---|---|---|---|---|---|")
    for label, head, task, result, params, train_s in rows:
        if task == "semantic":
            score = f"mIoU {100 * result['miou']:.1f}"
        else:
            score = f"AP {100 * result['ap']:.1f} / AP50 {100 * result['ap50']:.1f}"
        print(f"| {label} | {head} | {task} | {score} | {params / 1e6:.2f} M | {train_s / 60:.1f} min |")


if __name__ == "__main__":
    main()
