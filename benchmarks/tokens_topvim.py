"""ToP-ViM (token pruning for vision Mamba with hidden-state alignment) on a small Vim trained on Fashion-MNIST:
test top-1 and throughput against the unpruned model, with and without the alignment, at equal optimizer steps.

    OMP_NUM_THREADS=1 python benchmarks/tokens_topvim.py                      # base run + 3 fine-tunes, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/tokens_topvim.py --base-steps 40 --ft-steps 10 --test-limit 500   # a look

1. A Vim (`vl_vim_tiny` shape at width 32, depth 6, d_state 1, 28 px, patch 4: 49 patches + the middle class
   token) trained from scratch with `vitlab.engine.fit` for --base-steps steps (AdamW, batch 64, lr --base-lr,
   cosine, seed 0).
2. From that checkpoint, three fine-tunes of --ft-steps steps each (lr --lr, cosine, seed 0): the unpruned model
   (continued training, the step-matched baseline), ToP-ViM (`topvim:keep_rate=K`, the official Vim-S locations
   5/24, 10/24, 15/24 of the depth: after blocks 1, 2 and 4 of 6) and the same pruning without alignment
   (`alignment=false`: plain removal of the pruned tokens, as the official released code does).
3. Top-1 on the first --test-limit test images, before fine-tuning (the pruning applied to the base model as is) and
   after; throughput at batch 64 in inference mode, the three fine-tuned models timed round-robin in A-B-C-C-B-A
   order (--rounds), median per model, ratio to the unpruned model of the same run.

`--save-results` stores the rows (keyed by the model column) in BENCHMARKS.md's ToP-ViM section
(benchmarks/results/*-top-vim-on-a-small-vision-mamba-*.json) and renders it; runs at other keep rates add their rows.

Seen here (2-core Xeon shared by ~8 jobs, 1 thread): the base run took 15.5 min at load ~14 (the fine-tunes ran at
0.25 s/step on the quiet machine, so about 1.5 min quiet); `--reuse-base` then 1.9-2.9 min for the rest.
"""
import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine import TrainConfig, evaluate, fit
from vitlab.profiling import time_callable
from vitlab.profiling.cpu import cpu_name

from _results import machine_line, markdown_table, save_rows

ARCH = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=6, d_state=1)
TOKENS = (ARCH["img_size"] // ARCH["patch_size"]) ** 2 + 1   # 49 patches + the class token
STEPS_PER_EPOCH = 55000 // 64
SECTION = "top-vim-on-a-small-vision-mamba-apply-topvim"


def _train(out: Path, steps: int, lr: float, **kwargs) -> tuple[Path, float]:
    """One `fit` run of `steps` optimizer steps at batch 64 (cosine over exactly those steps); (run folder, seconds)."""
    epochs = steps / STEPS_PER_EPOCH
    cfg = TrainConfig(out=str(out), epochs=epochs, max_steps=steps, batch_size=64, lr=lr, min_lr=1e-6,
                      warmup_epochs=0.05 * epochs, threads=1, eval_val=False, progress=False, seed=0, **kwargs)
    start = time.perf_counter()
    run = fit(cfg, overwrite=True)
    return run, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--ft-steps", type=int, default=60)
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temp dir)")
    parser.add_argument("--reuse-base", action="store_true", help="start from the base run already in --out")
    parser.add_argument("--save-results", action="store_true", help="store the rows in BENCHMARKS.md's section")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out or tempfile.mkdtemp(prefix="tokens_topvim_"))
    wall = time.perf_counter()

    if args.reuse_base and (out / "base" / "model.safetensors").is_file():
        base_run, base_text = out / "base", f"reused {out / 'base'}"
    else:
        base_run, base_s = _train(out / "base", args.base_steps, args.base_lr, model="vl_vim_tiny",
                                  model_kwargs=ARCH)
        base_text = f"{args.base_steps} steps ({base_s / 60:.1f} min)"
    print(f"base: {base_text}", flush=True)
    specs = [None, f"topvim:keep_rate={args.keep_rate}", f"topvim:keep_rate={args.keep_rate},alignment=false"]
    labels = ["unpruned", f"ToP-ViM keep {args.keep_rate}", f"keep {args.keep_rate}, no alignment"]

    base = vitlab.create_model(base_run).eval()
    test = dataset_for(base, "fashion-mnist", "test")
    xb = torch.stack([test[i][0] for i in range(64)])
    rows = []
    for spec, label in zip(specs, labels):
        zero = vitlab.create_model(base_run).eval()
        if spec:
            vitlab.apply_(zero, vitlab.parse_apply([spec]))
        top1_zero = evaluate(zero, test, batch_size=256, progress=False, limit=args.test_limit)["top1"]
        run, ft_s = _train(out / (spec or "none").replace(":", "_").replace("=", "").replace(",", "_"),
                           args.ft_steps, args.lr, init=str(base_run), apply=[spec] if spec else [])
        model = vitlab.create_model(run).eval()
        top1 = evaluate(model, test, batch_size=256, progress=False, limit=args.test_limit)["top1"]
        with torch.inference_mode():
            model(xb[:2])
        counts = model.token_state.counts if spec else [TOKENS] * ARCH["depth"]
        rows.append(dict(label=label, model=model, top1_zero=top1_zero, top1=top1, ft_s=ft_s, counts=counts))
        print(f"{label}: {top1_zero:.4f} -> {top1:.4f} after {args.ft_steps} steps ({ft_s / 60:.1f} min)", flush=True)

    times = {r["label"]: [] for r in rows}
    order = rows + rows[::-1]   # A-B-C-C-B-A
    with torch.inference_mode():
        for _ in range(args.rounds):
            for r in order:
                times[r["label"]].append(time_callable(lambda: r["model"](xb), warmup=1, min_runs=3,
                                                      min_time_s=0.5).median_s)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    base_ips, base_top1 = 64 / median[rows[0]["label"]], rows[0]["top1"]

    n_test = min(len(test), args.test_limit or len(test))
    print(f"\nCPU: {cpu_name() or platform.processor()}, 1 thread, torch {torch.__version__}; base: {base_text}; "
          f"first {n_test} test images; batch 64; total wall {(time.perf_counter() - wall) / 60:.1f} min\n")
    columns = ["model", "tokens after each block", "top-1 before FT", f"after {args.ft_steps} FT steps", "Δ pt",
               "throughput"]
    table, previous = [], None
    for r in rows:
        ips = 64 / median[r["label"]]
        counts = r["counts"]
        tokens = ("same" if counts == previous else f"{counts[0]}×{len(counts)}" if len(set(counts)) == 1
                  else "/".join(map(str, counts)))
        delta = 100 * (r["top1"] - base_top1)
        table.append([r["label"], tokens, f"{100 * r['top1_zero']:.2f}", f"{100 * r['top1']:.2f}",
                      "0" if round(delta, 2) == 0 else f"{delta:+.2f}".replace("-", "\N{MINUS SIGN}"),
                      f"{ips / base_ips:.2f}x"])
        previous = counts
        print(f"{r['label']}: {ips:.0f} img/s")
    print("\n" + markdown_table(columns, table))
    if args.save_results:
        rounds = f"{args.rounds} round{'s' * (args.rounds != 1)}"
        note = f"throughput ratios measured in one process, A-B-C-C-B-A order, {rounds}"
        print("saved to", save_rows(SECTION, columns, table, machine=machine_line(1, note)))


if __name__ == "__main__":
    main()
