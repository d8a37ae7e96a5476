"""Sparsifiner and LookupViT fine-tuned on the 196-token model beside EViT at LookupViT's MACs: test top-1, MACs and
throughput against the unreduced model, one thread.

    python benchmarks/tokens_train_sparse.py                     # ~8 min of fine-tuning per method, 1 thread
    python benchmarks/tokens_train_sparse.py --minutes 2 --only lookupvit:tokens=49

Each method is fine-tuned from checkpoints/fashion-mnist-196 with `vitlab.engine.fit` (`vitlab train --init CKPT
--apply METHOD [--recipe sparsifiner:...]`): AdamW, batch 64, --lr, cosine over the steps that fit in --minutes
(the step time is probed first), no gradient clipping, seed 0. Sparsifiner trains with its connectivity
distillation (official weight 0.01) and dense attention for the first 10 % of its steps (the official 5 of 50
epochs). EViT's keep rate is the one whose MACs come closest to LookupViT's. Throughput: batch 64, inference mode,
the models timed round-robin (--rounds), median per model; the ratio is to the unreduced model of the same run.
Sparsifiner's attention runs masked (dense matmuls): it cannot be faster on CPU; its MACs column counts the sparse
computation (attention x density + predictor), the executed MACs are printed beside it.
"""
import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine import TrainConfig, evaluate, fit
from vitlab.profiling import count_flops, time_callable
from vitlab.profiling.cpu import cpu_name
from vitlab.tokens.sparsifiner import sparsifiner_flops

CKPT = "checkpoints/fashion-mnist-196"
METHODS = ["lookupvit:tokens=49", "sparsifiner:keep_rate=0.25", "evit"]   # evit: keep rate matched to LookupViT


def _applied(spec: str | None):
    model = vitlab.create_model(CKPT).eval()
    return vitlab.apply_(model, vitlab.parse_apply([spec])) if spec else model


def _macs(model, x: torch.Tensor, spec: str | None) -> tuple[float, float]:
    """(MACs per image as the method computes them, executed MACs per image)."""
    executed = count_flops(model, x).macs / len(x)
    if spec and spec.startswith("sparsifiner"):
        return sparsifiner_flops(model, x).macs / len(x), executed
    return executed, executed


def _step_time(spec: str, recipe: str | None, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds per training step at batch 64 (median of 3 after one warm-up), to size the run."""
    model = _applied(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for i in range(4):
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    extra = 1.15 if recipe else 1.0     # the distillation term's own cost
    return extra * sorted(times[1:])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="fine-tuning budget per method")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", default=None, help="folder for the fine-tuned checkpoints (default: a temp dir)")
    parser.add_argument("--steps", type=int, nargs="*", default=None,
                        help="training steps per method, in order (instead of sizing runs to --minutes)")
    parser.add_argument("--reuse", action="store_true", help="keep a method's finished run found in --out")
    parser.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out or tempfile.mkdtemp(prefix="tokens_train_sparse_"))
    base = _applied(None)
    test = dataset_for(base, "fashion-mnist", "test")
    xb = torch.stack([test[i][0] for i in range(64)])
    yb = torch.tensor([test[i][1] for i in range(64)])

    specs = list(args.only or METHODS)
    if "evit" in specs:   # EViT keep rate whose MACs are closest to LookupViT's (tokens=49)
        target = _macs(_applied("lookupvit:tokens=49"), xb[:1], None)[0]
        rates = [round(0.05 * i, 2) for i in range(2, 20)]
        best = min(rates, key=lambda r: abs(_macs(_applied(f"evit:keep_rate={r}"), xb[:1], None)[0] - target))
        specs[specs.index("evit")] = f"evit:keep_rate={best}"

    steps_per_epoch = 55000 // 64
    rows = [{"spec": "none (unreduced)", "model": base, "top1": None, "steps": 0, "train_s": 0.0}]
    for i, spec in enumerate(specs):
        recipe = None
        if args.steps:
            steps = args.steps[i]
        else:
            steps = max(10, int(args.minutes * 60 / _step_time(spec, spec.startswith("sparsifiner"), xb, yb)))
        epochs = steps / steps_per_epoch
        if spec.startswith("sparsifiner"):
            recipe = f"sparsifiner:distill=0.01,dense_epochs={0.1 * epochs:.6f}"
        run = out / spec.replace(":", "_").replace("=", "").replace(",", "_")
        cfg = TrainConfig(out=str(run), init=CKPT, apply=[spec], recipe=recipe, epochs=epochs, max_steps=steps,
                          batch_size=64, lr=args.lr, min_lr=1e-6, warmup_epochs=0.05 * epochs, threads=1,
                          clip_grad=None, eval_val=False, progress=False, seed=0)
        metrics = run / "metrics.jsonl"
        if args.reuse and (run / "model.safetensors").is_file() and metrics.is_file():
            last = json.loads(metrics.read_text().splitlines()[-1])
            steps, train_s = last["step"], last["elapsed_s"]
        else:
            start = time.perf_counter()
            fit(cfg, overwrite=True)
            train_s = time.perf_counter() - start
        model = vitlab.create_model(run).eval()
        rows.append({"spec": spec, "model": model, "steps": steps, "train_s": train_s, "recipe": recipe})
        print(f"{spec}: {steps} steps ({steps * 64} images) in {train_s / 60:.1f} min", flush=True)

    start = time.perf_counter()
    for row in rows:
        row["top1"] = evaluate(row["model"], test, batch_size=256, progress=False, limit=args.test_limit)["top1"]
        row["macs"], row["executed"] = _macs(row["model"], xb[:1], None if row["spec"].startswith("none") else
                                             row["spec"])
    eval_s = time.perf_counter() - start
    times = {r["spec"]: [] for r in rows}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for r in rows:
                times[r["spec"]].append(time_callable(lambda: r["model"](xb), warmup=1, min_runs=3,
                                                      min_time_s=1.0).median_s)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    base_ips, base_top1, base_macs = 64 / median[rows[0]["spec"]], rows[0]["top1"], rows[0]["macs"]

    n_test = min(len(test), args.test_limit or len(test))
    print(f"\nCPU: {cpu_name()}, 1 thread, torch {torch.__version__}; first {n_test} test images; batch 64; "
          f"evaluation took {eval_s / 60:.1f} min\n")
    print("| method | fine-tune | test top-1 | Δ pt | MMACs/img | MACs ratio | img/s | throughput ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ips = 64 / median[r["spec"]]
        tune = "—" if not r["steps"] else f"{r['steps']} steps, {r['train_s'] / 60:.1f} min"
        macs = f"{r['macs'] / 1e6:.1f}" + (f" (executed {r['executed'] / 1e6:.1f})"
                                          if not math.isclose(r["macs"], r["executed"]) else "")
        print(f"| {r['spec']} | {tune} | {100 * r['top1']:.2f} | {100 * (r['top1'] - base_top1):+.2f} | {macs} | "
              f"{base_macs / r['macs']:.2f}x | {ips:.0f} | {ips / base_ips:.2f}x |")
    for r in rows[1:]:
        if r.get("recipe"):
            print(f"\n{r['spec']} trained with --recipe {r['recipe']}")


if __name__ == "__main__":
    main()
