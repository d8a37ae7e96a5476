"""kMaX-DeepLab's k-means cross-attention vs softmax cross-attention (the paper's baseline) on fmnist-scenes panoptic.

The claim (kMaX-DeepLab, Yu et al., ECCV 2022, ablations on COCO: k-means cross-attention beats the original
softmax cross-attention in PQ with the decoder otherwise unchanged) checked at small scale: the `kmax` and `softmax-xattn` heads of
vitlab/dense/kmax.py (the same decoder but for the cross-attention step) on the same backbone, trained for the same
optimizer steps on the same batches with the shared `MaskCriterion` (Mask2Former's class CE + sigmoid BCE + dice,
final and per-layer auxiliary outputs), evaluated with the shared PQ / SQ / RQ (torchmetrics `PanopticQuality`) on
the test scenes. Seeds 0, 1, 2 (head initialisation and batch order; the backbone starts from the same checkpoint).

The backbone is vl_vit_fmnist from `checkpoints/fashion-mnist-reference-v2` (Fashion-MNIST classification weights,
resized to 64 px) through D-core's ViTDet simple feature pyramid (strides 4/8/16/32; kMaX uses 16/8/4). Sized for a
shared 2-core CPU: the pretrained ViT stays frozen (`--backbone-lr-mult 0`; the official recipe trains it at 0.1x),
the pyramid and the head train with AdamW (lr 1e-3, warm-up + cosine) for 300 steps of 8 scenes drawn from 4,800;
PQ on the first 300 test scenes. `--opt muon` trains the hidden matrices with timm's Muon (the centres and the
class / mask-embedding outputs on its AdamW fallback): with AdamW at 300 steps both heads predicted the background
only; with `--steps 1200 --opt muon --lr 1e-2` both segment things, and with `--losses kmax` added k-means
cross-attention beats softmax in 3 of 3 seeds (BENCHMARKS.md, kMaX section).

`--losses kmax` trains with kMaX-DeepLab's own criterion (vitlab/dense/kmax_loss.py: PQ-style matching, mask-ID
cross-entropy, dice, pixel instance discrimination, auxiliary semantic loss; the head's `loss="kmax"`) instead of
the shared Mask2Former `MaskCriterion` (`m2f`); `--losses m2f kmax --heads kmax` compares the two at equal steps on
the same batches.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/dense_kmax.py            # 3 seeds x 2 heads, AdamW, 300 steps
    OMP_NUM_THREADS=1 python benchmarks/dense_kmax.py --steps 1200 --opt muon --lr 1e-2   # ~5-10 CPU-min per run
    OMP_NUM_THREADS=1 python benchmarks/dense_kmax.py --steps 1200 --opt muon --lr 1e-2 --losses kmax   # the claim
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/dense_kmax.py --heads kmax --losses kmax m2f   # the losses
    python benchmarks/dense_kmax.py --steps 20 --seeds 0 --test 32         # smoke run

`--save-results` (with the default `--losses m2f`) stores one row per head, its seeds joined by " / ", in
BENCHMARKS.md's kMaX section (benchmarks/results/*-kmax-k-means-vs-softmax-cross-attention.json; a head at other
than 300 steps is its own row) and renders it.
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

from vitlab.data import build_dense_dataset
from vitlab.data.scenes import collate_scenes
from vitlab.dense import DenseModel, get_head
from vitlab.dense.backbone import Backbone
from vitlab.dense.engine import dense_loss, evaluate_dense
from vitlab.engine.train import muon_fallback_by_role

from _results import machine_line, markdown_table, save_rows

HEADS = ("kmax", "softmax-xattn")
SECTION = "kmax-k-means-vs-softmax-cross-attention"


def train_one(head_name: str, loss_name: str, seed: int, args: argparse.Namespace, train_set, test_set) -> dict:
    """Train one (head, loss, seed) for `args.steps` AdamW steps; PQ / SQ / RQ on the test scenes."""
    torch.manual_seed(seed)
    backbone = Backbone(args.backbone, in_chans=1, img_size=64)
    head = get_head(head_name, "panoptic").target(backbone.channels, backbone.strides, num_classes=11,
                                                   dim=args.dim, num_queries=args.queries, loss=loss_name)
    model = DenseModel(backbone, head)
    pretrained = {id(p) for p in backbone.model.parameters()}  # the ViT; its new feature pyramid learns at lr
    if args.backbone_lr_mult == 0:  # frozen ViT: no backward through it
        backbone.model.requires_grad_(False)
    if args.opt == "muon":   # hidden matrices on Muon; centres, class and mask-embedding outputs on AdamW
        if args.backbone_lr_mult not in (0, 1):
            raise SystemExit(f"--opt muon trains the backbone at the head's lr or not at all: got "
                             f"--backbone-lr-mult {args.backbone_lr_mult}; use 0 or 1")
        outputs = tuple(n for n, _ in model.named_modules() if n.endswith(("class_head.0", "mask_head.0")))
        optimizer = timm.optim.create_optimizer_v2(model, opt="muon", lr=args.lr, weight_decay=0.05,
                                                   fallback_list=muon_fallback_by_role(model, outputs))
    else:
        groups = [{"params": [p for p in model.parameters() if id(p) not in pretrained], "lr": args.lr}]
        if args.backbone_lr_mult > 0:
            groups.append({"params": list(backbone.model.parameters()), "lr": args.lr * args.backbone_lr_mult})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.05)
    warmup = min(args.warmup, args.steps - 1)
    scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=args.steps - warmup, lr_min=1e-6,
                                                 warmup_t=warmup, warmup_lr_init=1e-6, warmup_prefix=True,
                                                 t_in_epochs=False)
    criterion = head.criterion("panoptic")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    start, model_params = time.perf_counter(), sum(p.numel() for p in head.parameters())
    model.train()
    for step in range(args.steps):
        idx = order[(step * args.batch) % len(order):][:args.batch]
        images, targets = collate_scenes([train_set[int(i)] for i in idx])
        loss = dense_loss(model(images), targets, criterion)  # the engine's: sum of the weighted terms
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step_update(step + 1)
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"  {head_name} ({loss_name} loss) seed {seed} step {step + 1}: loss {loss.item():.3f}", flush=True)
    train_s = time.perf_counter() - start
    metrics = evaluate_dense(model, test_set, "panoptic", batch_size=32, limit=args.test)
    return {"head": head_name, "loss_name": loss_name, "seed": seed, "pq": 100 * metrics["pq"],
            "sq": 100 * metrics["sq"], "rq": 100 * metrics["rq"], "loss": loss.item(), "head_params": model_params,
            "train_s": train_s, "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--opt", choices=("adamw", "muon"), default="adamw",
                        help="muon: timm's Muon on the hidden matrices, the centres and output layers on AdamW")
    parser.add_argument("--backbone-lr-mult", type=float, default=0.0, help="0: the pretrained ViT stays frozen")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--train", type=int, default=4800, help="training scenes (fmnist-scenes:n=N)")
    parser.add_argument("--test", type=int, default=300, help="test scenes evaluated")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbone", default="checkpoints/fashion-mnist-reference-v2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=0)
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--losses", nargs="+", choices=("m2f", "kmax"), default=["m2f"],
                        help="m2f: Mask2Former's criterion; kmax: kMaX-DeepLab's own")
    parser.add_argument("--save-results", action="store_true",
                        help="store the per-head rows in BENCHMARKS.md's kMaX section (with --losses m2f)")
    args = parser.parse_args()
    if args.save_results and args.losses != ["m2f"]:
        parser.error(f"--save-results stores the head comparison, which uses --losses m2f; got --losses "
                     f"{' '.join(args.losses)}: drop --save-results and paste the printed rows")
    torch.set_num_threads(args.threads)
    train_set = build_dense_dataset(f"fmnist-scenes:n={args.train}", "train")
    test_set = build_dense_dataset("fmnist-scenes", "test")  # canvas k of a split is the same for every n
    arms = [(head, loss) for head in args.heads for loss in args.losses]
    rows = []
    for seed in args.seeds:
        for head, loss in arms:
            rows.append(train_one(head, loss, seed, args, train_set, test_set))
            r = rows[-1]
            print(f"# {head} ({loss} loss) seed {seed}: PQ {r['pq']:.2f} SQ {r['sq']:.2f} RQ {r['rq']:.2f} "
                  f"(final loss {r['loss']:.3f}, {r['wall_s']:.0f} s)", flush=True)
    print(f"\nkMaX heads and losses, fmnist-scenes panoptic, {args.steps} steps x batch {args.batch}, "
          f"{args.train} training scenes, {args.test} test scenes; backbone {args.backbone}; "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s)\n")
    print("| head | loss | seed | PQ | SQ | RQ | head params | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head']} | {r['loss_name']} | {r['seed']} | {r['pq']:.2f} | {r['sq']:.2f} | {r['rq']:.2f} | "
              f"{r['head_params'] / 1e6:.2f}M | {r['train_s']:.0f} |")
    for head, loss in arms:
        pq = [r["pq"] for r in rows if (r["head"], r["loss_name"]) == (head, loss)]
        print(f"| {head} | {loss} | mean | {statistics.mean(pq):.2f} | | | | |")
    pq_of = {(r["head"], r["loss_name"], r["seed"]): round(r["pq"], 2) for r in rows}  # as printed
    for (head_a, loss_a), (head_b, loss_b) in zip(arms[:1] * (len(arms) - 1), arms[1:]):
        pairs = [(pq_of[head_a, loss_a, s], pq_of[head_b, loss_b, s]) for s in args.seeds]
        wins, ties = sum(a > b for a, b in pairs), sum(a == b for a, b in pairs)
        verdict = ("reproduced" if wins >= 2 else "not reproduced") if len(args.seeds) == 3 else "n/a"
        claim = " (the kMaX claim)" if (head_a, head_b, loss_a) == ("kmax", "softmax-xattn", loss_b) else ""
        print(f"\n{head_a} ({loss_a} loss) beats {head_b} ({loss_b} loss) in PQ in {wins} of {len(args.seeds)} "
              f"seeds ({ties} tied){claim}: {verdict}")
    if args.save_results:
        columns = ["head", "seed", "PQ", "SQ", "RQ", "head params"]
        table = []
        for head in args.heads:
            runs = [r for r in rows if r["head"] == head]
            table.append([head if args.steps == 300 else f"{head}, {args.steps} steps",
                          " / ".join(str(r["seed"]) for r in runs),
                          *(" / ".join(f"{r[m]:.2f}" for r in runs) for m in ("pq", "sq", "rq")),
                          f"{runs[0]['head_params'] / 1e6:.2f} M"])
        print("\n" + markdown_table(columns, table))
        print("saved to", save_rows(SECTION, columns, table, machine=machine_line(args.threads)))


if __name__ == "__main__":
    main()
