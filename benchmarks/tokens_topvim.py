"""ToP-ViM (token pruning for vision Mamba with hidden-state alignment) on a small Vim trained on Fashion-MNIST:
test top-1 and throughput against the unpruned model, with and without the alignment, at equal optimizer steps.

    OMP_NUM_THREADS=1 python benchmarks/tokens_topvim.py --out runs/topvim          # base + fine-tunes, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/tokens_topvim.py --base-steps 40 --ft-steps 10 --test-limit 500   # a look

1. A Vim (`vl_vim_tiny` shape at width 32, depth 6, d_state 1, 28 px, patch 4: 49 patches + the middle class
   token) trained from scratch with `vitlab.engine.fit` for --base-steps steps (AdamW, batch 64, lr --base-lr,
   cosine over exactly those steps, seed 0). The run is cached in --out as `base-<steps>-steps-lr<lr>` and reused
   by every later call with the same steps and lr (a folder counts as done once its metrics.jsonl reached the
   step count), so rows at other keep rates fine-tune the same base.
2. From that checkpoint, fine-tunes of --ft-steps steps each (lr --lr, cosine, seed 0), each cached the same way:
   the unpruned model (continued training, the step-matched baseline), ToP-ViM for each --prune option string
   (`topvim:<options>`, hidden-state alignment on; default keep 0.7 at the official Vim-S locations 5/24, 10/24,
   15/24 of the depth: after blocks 1, 2 and 4 of 6) and, for each --ablate option string, the same pruning with
   `alignment=false` (plain removal of the pruned tokens, as the official released code does).
   Fine-tuning cost: each fine-tune records its training loop's wall and process CPU seconds (ft_time.json); the
   table's "FT min" is --ft-steps x the CPU seconds per step at 1 thread, an upper bound on the same steps' time on
   2 cores (a second thread can only shorten a step), so it is the number to hold against a "<= 10 min on 2 cores"
   budget without the inflation of a shared machine's wall clock.
3. Top-1 on the first --test-limit test images (0: all 10,000), before fine-tuning (the pruning applied to the base
   model as is) and after; throughput at --batch images in inference mode, all fine-tuned models timed round-robin
   in A-B-...-B-A order (--rounds), median per model, ratio to the unpruned model of the same process.

`--train-only` trains (or finds) the runs and stops, leaving a run that another call is training to it: a few
identical such calls started together once the base exists share the fine-tunes out, and a last call without the
flag (which waits for a run still being trained) measures every row in one process.
`--save-results` stores the rows (keyed by the model column) in BENCHMARKS.md's ToP-ViM section
(benchmarks/results/*-top-vim-on-a-small-vision-mamba-*.json) and renders it.
"""
import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine import TrainConfig, evaluate, fit
from vitlab.profiling import time_callable
from vitlab.profiling.cpu import cpu_name
from vitlab.utils.lock import FolderLocked

from _results import machine_line, markdown_table, save_rows

ARCH = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=6, d_state=1)
TOKENS = (ARCH["img_size"] // ARCH["patch_size"]) ** 2 + 1   # 49 patches + the class token
STEPS_PER_EPOCH = 55000 // 64
SECTION = "top-vim-on-a-small-vision-mamba-apply-topvim"
TIME_FILE = "ft_time.json"


def run_done(run: Path, steps: int) -> bool:
    """Whether `run` holds a finished `fit` run of `steps` steps (its metrics.jsonl's last line reached them)."""
    metrics = run / "metrics.jsonl"
    if not (run / "model.safetensors").is_file() or not metrics.is_file():
        return False
    lines = metrics.read_text().splitlines()
    try:
        return bool(lines) and json.loads(lines[-1]).get("step") == steps
    except json.JSONDecodeError:
        return False


def _train(out: Path, steps: int, lr: float, retrain: bool = False, wait: bool = True,
           **kwargs) -> Optional[tuple[Path, dict]]:
    """One `fit` run of `steps` optimizer steps at batch 64 (cosine over exactly those steps), or the finished run
    already in `out`; (run folder, {"wall_s", "cpu_s", "cached"}) with the training's own times when known. A run
    that another process is training is waited for, or with `wait=False` left to it (None)."""
    if run_done(out, steps) and not retrain:
        times = json.loads((out / TIME_FILE).read_text()) if (out / TIME_FILE).is_file() else {}
        return out, {**times, "cached": True}
    epochs = steps / STEPS_PER_EPOCH
    cfg = TrainConfig(out=str(out), epochs=epochs, max_steps=steps, batch_size=64, lr=lr, min_lr=1e-6,
                      warmup_epochs=0.05 * epochs, threads=1, eval_val=False, progress=False, seed=0, **kwargs)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        run = fit(cfg, overwrite=True)
    except FolderLocked:   # a parallel --train-only call is training this very run
        if not wait:
            return None
        while not run_done(out, steps):
            time.sleep(10)
        return _train(out, steps, lr, **kwargs)
    times = {"steps": steps, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    (run / TIME_FILE).write_text(json.dumps(times))
    return run, {**times, "cached": False}


def _folder(spec: str) -> str:
    return spec.replace("topvim:", "topvim-").replace("=", "").replace(",", "_").replace("/", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--ft-steps", type=int, default=300)
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--prune", action="append", default=None,
                        help="topvim options of one aligned row, e.g. keep_rate=0.7 or keep_rate=0.5,locations=0.34 "
                             "(repeatable; default: keep_rate=0.7)")
    parser.add_argument("--ablate", action="append", default=None,
                        help="topvim options of a row with alignment=false (repeatable; default: the first --prune; "
                             "'' for none)")
    parser.add_argument("--test-limit", type=int, default=2000, help="first N test images (0: all 10,000)")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for the runs, and their cache (default: a temp dir)")
    parser.add_argument("--retrain", action="store_true", help="train again even where --out holds a finished run")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the runs, then stop")
    parser.add_argument("--save-results", action="store_true", help="store the rows in BENCHMARKS.md's section")
    args = parser.parse_args()
    prune = args.prune or ["keep_rate=0.7"]
    ablate = [a for a in args.ablate if a] if args.ablate is not None else prune[:1]   # --ablate '': none
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out or tempfile.mkdtemp(prefix="tokens_topvim_"))
    wall = time.perf_counter()

    base_run, base_t = _train(out / f"base-{args.base_steps}-steps-lr{args.base_lr:g}", args.base_steps,
                              args.base_lr, args.retrain, model="vl_vim_tiny", model_kwargs=ARCH)
    base_text = (f"{args.base_steps} steps" + (f", reused from {base_run}" if base_t["cached"] else "")
                 + (f" ({base_t['wall_s'] / 60:.1f} min wall)" if "wall_s" in base_t else ""))
    print(f"base: {base_text}", flush=True)
    specs = ([(None, "unpruned")] + [(f"topvim:{p}", f"ToP-ViM {p}") for p in prune]
             + [(f"topvim:{p},alignment=false", f"{p}, no alignment") for p in ablate])
    ft_root = out / f"{base_run.name}--ft-{args.ft_steps}-steps-lr{args.lr:g}"
    trained = []
    for spec, label in specs:
        done = _train(ft_root / _folder(spec or "none"), args.ft_steps, args.lr, args.retrain,
                      wait=not args.train_only, init=str(base_run), apply=[spec] if spec else [])
        if done is None:
            print(f"{label}: another call is training it", flush=True)
            continue
        run, t = done
        trained.append((spec, label, run, t))
        cpu = f"{t['cpu_s'] / args.ft_steps:.3f} CPU s/step" if "cpu_s" in t else "times not recorded"
        print(f"{label}: {args.ft_steps} FT steps, {'cached' if t['cached'] else 'trained'}, {cpu}", flush=True)
    if args.train_only:
        return

    test = dataset_for(vitlab.create_model(base_run), "fashion-mnist", "test")
    xb = torch.stack([test[i][0] for i in range(args.batch)])
    rows = []
    for spec, label, run, t in trained:
        zero = vitlab.create_model(base_run).eval()
        if spec:
            vitlab.apply_(zero, vitlab.parse_apply([spec]))
        top1_zero = evaluate(zero, test, batch_size=256, progress=False, limit=args.test_limit or None)["top1"]
        model = vitlab.create_model(run).eval()
        top1 = evaluate(model, test, batch_size=256, progress=False, limit=args.test_limit or None)["top1"]
        with torch.inference_mode():
            model(xb[:2])
        counts = model.token_state.counts if spec else [TOKENS] * ARCH["depth"]
        ft_min = t["cpu_s"] / 60 if "cpu_s" in t else float("nan")
        rows.append(dict(label=label, model=model, top1_zero=top1_zero, top1=top1, ft_min=ft_min, counts=counts))
        print(f"{label}: {top1_zero:.4f} -> {top1:.4f} after {args.ft_steps} steps", flush=True)

    times = {r["label"]: [] for r in rows}
    order = rows + rows[::-1]   # A-B-...-B-A
    with torch.inference_mode():
        for _ in range(args.rounds):
            for r in order:
                times[r["label"]].append(time_callable(lambda: r["model"](xb), warmup=1, min_runs=3,
                                                      min_time_s=0.5).median_s)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    base_ips, base_top1 = args.batch / median[rows[0]["label"]], rows[0]["top1"]

    n_test = min(len(test), args.test_limit or len(test))
    print(f"\nCPU: {cpu_name() or platform.processor()}, 1 thread, torch {torch.__version__}; base: {base_text}; "
          f"first {n_test} test images; batch {args.batch}; total wall {(time.perf_counter() - wall) / 60:.1f} min\n")
    columns = ["model", "tokens after each block", "top-1 before FT", f"after {args.ft_steps} FT steps",
               "Δ pt vs FT'd unpruned", "throughput", "FT min (1 core)"]
    table = []
    for r in rows:
        ips = args.batch / median[r["label"]]
        counts = r["counts"]
        tokens = f"{counts[0]}×{len(counts)}" if len(set(counts)) == 1 else "/".join(map(str, counts))
        delta = 100 * (r["top1"] - base_top1)
        table.append([r["label"], tokens, f"{100 * r['top1_zero']:.2f}", f"{100 * r['top1']:.2f}",
                      "0" if round(delta, 2) == 0 else f"{delta:+.2f}".replace("-", "\N{MINUS SIGN}"),
                      f"{ips / base_ips:.2f}x", f"{r['ft_min']:.1f}"])
        print(f"{r['label']}: {ips:.0f} img/s")
    print("\n" + markdown_table(columns, table))
    if args.save_results:
        rounds = f"{args.rounds} round{'s' * (args.rounds != 1)}"
        note = f"throughput ratios measured in one process, A-B-...-B-A order, {rounds}"
        print("saved to", save_rows(SECTION, columns, table, machine=machine_line(1, note)))


if __name__ == "__main__":
    main()
