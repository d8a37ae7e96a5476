"""Expedit speed on a Swin-T-shaped model at 224: the untouched model and Expedit settings timed in one run.

    python benchmarks/expedit_speed.py --batch 8 --threads 2 --rounds 3

Random weights (speed only; accuracy needs a trained checkpoint: `vitlab eval CKPT --apply expedit:...`). The
variants are timed round-robin: --rounds rounds over all of them, each a `time_callable` median over
min-time / rounds seconds (one warm-up call in the first round only); the table shows the median of the rounds,
the speed-up over the untouched model and MACs (attention, clustering and reconstruction counted).
Swin-T has depths 2/2/6/2 and 7x7 windows: stage 3 (blocks 4-9, a 14 x 14 grid of 4 windows) is where the
official code clusters Swin; `alpha=5` is the default (10/24 of the depth), `alpha=4` clusters the whole stage.
"""
import argparse

import timm
import torch

import vitlab
from vitlab.profiling import count_flops, cpu_flags_text, cpu_name, time_callable, tune_allocator
from vitlab.techniques import format_technique
from vitlab.tokens import Expedit

SETTINGS = [Expedit(), Expedit(alpha=4, size=(5,)), Expedit(alpha=4, size=(4,)), Expedit(alpha=4, size=(3,), k=9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=6.0, help="seconds of timing per variant, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"allocator: {tune_allocator()}")
    torch.manual_seed(0)
    state = timm.create_model(args.model).state_dict()
    x = torch.randn(args.batch, 3, 224, 224)
    rows = []
    for cfg in [None, *SETTINGS]:
        model = timm.create_model(args.model).eval()
        model.load_state_dict(state)
        if cfg is not None:
            vitlab.apply_(model, cfg)
        rows.append(("none" if cfg is None else format_technique(cfg), model))

    times = {name: [] for name, _ in rows}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, model in rows:
                times[name].append(time_callable(lambda: model(x), min_time_s=args.min_time / args.rounds,
                                                  warmup=0 if times[name] else 1, min_runs=1).median_s)
    results = []
    for name, model in rows:
        median = sorted(times[name])[len(times[name]) // 2]
        macs = count_flops(model, x).macs / len(x)
        results.append((name, args.batch / median, macs))
        print(f"{name:<45} {args.batch / median:8.2f} img/s  {macs / 1e9:6.3f} GMACs", flush=True)
    base_ips, base_macs = results[0][1], results[0][2]
    print(f"\n{args.model} at 224, batch {args.batch}, {args.threads} threads, {cpu_name()} ({cpu_flags_text()}), "
          f"torch {torch.__version__}")
    print("| variant | img/s | speed-up | GMACs | MACs ratio |\n|---|---|---|---|---|")
    for name, ips, macs in results:
        print(f"| {name} | {ips:.2f} | {ips / base_ips:.2f}x | {macs / 1e9:.3f} | {base_macs / macs:.2f}x |")


if __name__ == "__main__":
    main()
