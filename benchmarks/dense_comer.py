"""ViT-CoMer vs the plain ViT with the same decode head on fmnist-scenes semantic segmentation, no pretraining.

The claim (ViT-CoMer, Xia et al., CVPR 2024: the CNN pyramid + CNN<->ViT interaction beats a plain ViT with the
same decoder, and needs no extra pre-training; the ledger row "ViT-CoMer beats the plain ViT with the same head in
mIoU at equal steps, no pretraining") checked at small scale. Both arms start from scratch with the same seed:
the same vl_vit_fmnist (width 96, 4 blocks) built for 64 px with a 3-conv stride-8 stem (8 x 8 tokens + class
token, ViT-CoMer's own patch stride scaled from 16 at 512 px), so its pyramid sits at strides 2/4/8/16:

* plain: the ViT's last block through D-core's ViTDet simple feature pyramid at strides 2/4/8/16,
* comer: ViT-CoMer around the same ViT (vitlab/dense/comer.py; official defaults but 32 CNN channels, the
  official 64 scaled by our width 96 / ViT-T's 192),

each followed by the same Semantic-FPN head (vitlab.dense.heads `semantic-fpn`, width 64), trained for the same
AdamW steps on the same seeded batches with per-pixel cross-entropy (vitlab.dense.engine `dense_loss`), evaluated
by mIoU (torchmetrics `MeanIoU` through `evaluate_dense`) on the test scenes. MACs from vitlab's counter (grid
sampling and the deformable attention's weighted sum counted).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/dense_comer.py                 # 3 seeds x 2 models
    python benchmarks/dense_comer.py --steps 4 --seeds 0 --test 32               # smoke run
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm.optim
import timm.scheduler
import torch
import torch.nn as nn

import vitlab
from vitlab.data.scenes import FmnistScenes, collate_scenes
from vitlab.dense import DenseModel, get_head
from vitlab.dense.backbone import Backbone
from vitlab.dense.comer import ViTCoMer
from vitlab.dense.engine import dense_loss, evaluate_dense
from vitlab.profiling import count_flops, cpu_name

MODELS = ("plain", "comer")
STRIDES = (2, 4, 8, 16)


def build(kind: str, seed: int, fpn_dim: int) -> nn.Module:
    """The ViT (same weights for both kinds at one seed) with the simple pyramid or ViT-CoMer, then Semantic FPN."""
    torch.manual_seed(seed)
    vit = vitlab.create_model("vl_vit_fmnist", img_size=64, stem_strides=(2, 2, 2))
    stages = (Backbone(vit, img_size=64, pyramid_strides=STRIDES) if kind == "plain"
              else ViTCoMer(vit, conv_inplane=32))
    assert list(stages.strides) == list(STRIDES)
    head = get_head("semantic-fpn", "semantic").target(stages.channels, stages.strides, 11, dim=fpn_dim,
                                                       conv_dim=fpn_dim)
    return DenseModel(stages, head)


def train_one(kind: str, seed: int, args: argparse.Namespace, train_set, test_set) -> dict:
    """Train one (model, seed) for `args.steps` AdamW steps (fit_dense's recipe); mIoU on the test scenes."""
    model = build(kind, seed, args.fpn_dim)
    macs = count_flops(model.eval(), torch.zeros(1, 1, 64, 64))
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=0.05)
    warmup = args.steps // 20
    scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=args.steps - warmup, lr_min=1e-5,
                                                 warmup_t=warmup, warmup_lr_init=args.lr * 1e-3, warmup_prefix=True,
                                                 t_in_epochs=False)
    per_epoch = len(train_set) // args.batch_size
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        images, targets = collate_scenes([train_set[int(i)] for i in order[k * args.batch_size:
                                                                          (k + 1) * args.batch_size]])
        loss = dense_loss(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step_update(step + 1)
    train_s = time.perf_counter() - start
    metrics = evaluate_dense(model, test_set, "semantic", batch_size=64)
    return {"model": kind, "seed": seed, "miou": 100 * metrics["miou"], "loss": loss.item(),
            "macs": macs.macs, "attention_macs": macs.attention_macs,
            "params": sum(p.numel() for p in model.parameters()), "train_s": train_s,
            "wall_s": time.perf_counter() - start}


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """The markdown table of the runs so far (printed after every seed, so a cut-short run still reports)."""
    seeds = sorted({r["seed"] for r in rows})
    print(f"\nfmnist-scenes semantic, {args.steps} steps x batch {args.batch_size}, from scratch; mIoU (%) on "
          f"{args.test} test scenes. {cpu_name()}, {torch.get_num_threads()} thread, torch {torch.__version__}, "
          f"Python {platform.python_version()}\n")
    print("| model | MMACs (1 image) | attention MMACs | params (M) | " +
          " | ".join(f"mIoU seed {s}" for s in seeds) + " | mean | train s / run |")
    print("|---|---:|---:|---:|" + "---:|" * len(seeds) + "---:|---:|")
    by_model = {kind: [r for r in rows if r["model"] == kind] for kind in MODELS}
    for kind, runs in by_model.items():
        label = "plain ViT + simple pyramid" if kind == "plain" else "ViT-CoMer"
        print(f"| {label} | {runs[0]['macs'] / 1e6:.1f} | {runs[0]['attention_macs'] / 1e6:.1f} | "
              f"{runs[0]['params'] / 1e6:.2f} | " + " | ".join(f"{r['miou']:.2f}" for r in runs) +
              f" | {statistics.mean(r['miou'] for r in runs):.2f} | "
              f"{statistics.mean(r['train_s'] for r in runs):.0f} |")
    wins = sum(c["miou"] > p["miou"] for p, c in zip(by_model["plain"], by_model["comer"]))
    gap = statistics.mean(r["miou"] for r in by_model["comer"]) - statistics.mean(r["miou"] for r in by_model["plain"])
    print(f"\nViT-CoMer beats the plain ViT in {wins} of {len(seeds)} seeds (mean {gap:+.2f} mIoU).", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--fpn-dim", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=1600, help="training scenes")
    parser.add_argument("--test", type=int, default=300, help="test scenes for mIoU")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_set, test_set = FmnistScenes("train", n=args.train), FmnistScenes("test", n=args.test)
    rows = []
    for seed in args.seeds:
        for kind in MODELS:
            row = train_one(kind, seed, args, train_set, test_set)
            rows.append(row)
            print(f"seed {seed} {kind}: mIoU {row['miou']:.2f} loss {row['loss']:.3f} "
                  f"({row['wall_s']:.0f} s)", flush=True)
        print_table(rows, args)


if __name__ == "__main__":
    main()
