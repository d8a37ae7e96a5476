"""Trainable token reducers II on the 196-token model: Self-slimmed ViT (slim + FRD) and IA-RED² (REINFORCE), each
fine-tuned from checkpoints/fashion-mnist-196 for a fixed wall-clock budget, beside EViT at the same keep rate.

    OMP_NUM_THREADS=1 python benchmarks/tokens_train2.py                 # 3 x --minutes of training + evaluation
    OMP_NUM_THREADS=1 python benchmarks/tokens_train2.py --minutes 2 --eval-limit 2000   # a quick look

Each method: AdamW (lr --lr, cosine over the time budget, weight decay 0.05, grad clip 1), batch --batch of the
training split (no augmentation), seed --seed. EViT trains with plain CE (label smoothing 0.1); slim with the FRD
recipe (vitlab.tokens.slim.FRD: CE + 2 MSE(reverse TSM) + 2 KL against the frozen un-slimmed model; reverse-TSM
MLP ratio --frd-ratio 1, not the official 4, which on this 4-block model costs more than the model itself);
IA-RED² first trains its interpreters with REINFORCE, backbone frozen (--policy-share of the budget, lr
--policy-lr), then fine-tunes the backbone with the interpreters frozen (lr --lr / 3). Throughput: batch 64 of
real test images, --threads threads, round-robin median (vitlab.profiling.time_callable) against the untouched
model timed in the same run; top-1 on the test split.
"""
import argparse
import math
import platform
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine.evaluate import evaluate
from vitlab.engine.recipes import Recipe, Step
from vitlab.profiling import count_flops, time_callable
from vitlab.tokens.iared import IAREDTraining
from vitlab.tokens.slim import FRD


def finetune(model: nn.Module, recipe: Recipe, train_set, seconds: float, lr: float, batch: int, seed: int,
             new_lr: float | None = None) -> int:
    """Train `model` with `recipe`'s loss for `seconds` of wall clock; returns the steps taken. `new_lr`: the lr of
    the modules the technique and recipe add (TSMs, reverse TSMs), when given."""
    recipe.setup(model, train_set, SimpleNamespace(label_smoothing=0.1), None)
    new = [p for n, p in model.named_parameters() if p.requires_grad and "token_slimming" in n] + recipe.parameters()
    old = [p for n, p in model.named_parameters() if p.requires_grad and "token_slimming" not in n]
    params = old + new
    opt = torch.optim.AdamW([{"params": old, "scale": 1.0},
                             {"params": new, "scale": (new_lr or lr) / lr}], lr=lr, weight_decay=0.05)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    model.train()
    start, steps = time.perf_counter(), 0
    while True:
        for images, targets in loader:
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                model.eval()
                return steps
            for group in opt.param_groups:
                group["lr"] = group["scale"] * lr * 0.5 * (1 + math.cos(math.pi * elapsed / seconds))

            def default_loss() -> torch.Tensor:
                return F.cross_entropy(model(images), targets, label_smoothing=0.1)

            step = Step(model, model, images, targets, None, [], 0, steps, steps, default_loss)
            loss = recipe.loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            steps += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/fashion-mnist-196")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per method")
    parser.add_argument("--keep-rate", type=float, default=0.5)
    parser.add_argument("--locations", default="0.25/0.5/0.75", help="EViT's and slim's stage locations")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--policy-lr", type=float, default=2e-3, help="IA-RED²: the interpreters' lr (REINFORCE)")
    parser.add_argument("--new-lr", type=float, default=None, help="lr of the TSMs and reverse TSMs (default --lr)")
    parser.add_argument("--frd-ratio", type=float, default=1.0, help="FRD reverse-TSM MLP ratio (official 4)")
    parser.add_argument("--policy-share", type=float, default=0.5, help="IA-RED²: share of the budget for REINFORCE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=["evit", "slim", "iared"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    base = vitlab.create_model(args.checkpoint).eval()
    train_set = dataset_for(base, "fashion-mnist", "train")
    test_set = dataset_for(base, "fashion-mnist", "test")
    x = torch.stack([test_set[i][0] for i in range(64)])
    budget = args.minutes * 60
    specs = {"evit": f"evit:keep_rate={args.keep_rate},locations={args.locations}",
             "slim": f"slim:keep_rate={args.keep_rate},locations={args.locations}",
             "iared": "iared"}
    rows = [("none (fine-tuned 196 model)", base, None, 0)]
    for name in args.only:
        torch.manual_seed(args.seed)
        model = vitlab.apply_(vitlab.create_model(args.checkpoint), vitlab.parse_apply([specs[name]]))
        t0 = time.perf_counter()
        if name == "iared":
            steps = finetune(model, IAREDTraining(phase="policy"), train_set, budget * args.policy_share,
                             args.policy_lr, args.batch, args.seed)
            steps += finetune(model, IAREDTraining(phase="backbone"), train_set, budget * (1 - args.policy_share),
                              args.lr / 3, args.batch, args.seed + 1)
        else:
            recipe = FRD(ratio=args.frd_ratio) if name == "slim" else Recipe()
            steps = finetune(model, recipe, train_set, budget, args.lr, args.batch, args.seed, args.new_lr)
        print(f"{specs[name]}: {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
        rows.append((specs[name], model.eval(), steps, time.perf_counter() - t0))

    results = []
    with torch.inference_mode():
        for spec, model, steps, seconds in rows:
            top1 = evaluate(model, test_set, batch_size=256, progress=False, limit=args.eval_limit)["top1"]
            macs = count_flops(model, x).macs / len(x)
            counts = list(getattr(getattr(model, "token_state", None), "counts", []))
            results.append([spec, model, steps, seconds, top1, macs, counts, []])
        for _ in range(4):   # round-robin: each variant timed in every round
            for r in results:
                r[7].append(time_callable(lambda: r[1](x), min_time_s=1.5, warmup=2, min_runs=3).median_s)
    print(f"\n{args.checkpoint}: {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"torch {torch.__version__}, train {args.minutes:g} min/method, batch {args.batch}, lr {args.lr:g}, "
          f"seed {args.seed}; throughput at batch 64; total wall {(time.perf_counter() - wall) / 60:.1f} min")
    print("| method | steps | train s | test top-1 | Δ pt | img/s | speed-up | MMACs/img | tokens after each block |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_ips = base_top1 = None
    for spec, _, steps, seconds, top1, macs, counts, times in results:
        ips = 64 / sorted(times)[len(times) // 2]
        base_ips, base_top1 = base_ips or ips, base_top1 if base_top1 is not None else top1
        print(f"| {spec} | {steps or '-'} | {seconds:.0f} | {100 * top1:.2f} | {100 * (top1 - base_top1):+.2f} | "
              f"{ips:.0f} | {ips / base_ips:.2f}x | {macs / 1e6:.1f} | {counts or ''} |")


if __name__ == "__main__":
    main()
