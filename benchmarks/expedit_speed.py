"""Expedit speed on a Swin-T-shaped model at 224, or speed + accuracy on a trained checkpoint, in one run.

    python benchmarks/expedit_speed.py --batch 8 --threads 2 --rounds 3
    python benchmarks/expedit_speed.py --checkpoint checkpoints/fashion-mnist-swin64 --batch 32 --threads 2 \
        --rounds 7 --settings "expedit:alpha=2,size=5; expedit:alpha=3,size=4"

With --checkpoint, the variants are the trained model and --settings (`--apply` syntax, ";"-separated), applied
without fine-tuning; each is timed on batches of real test images and evaluated on the val and test splits
(the setting to quote is chosen on val).

Random weights (speed only; accuracy needs a trained checkpoint: `vitlab eval CKPT --apply expedit:...`). The
variants are timed round-robin: --rounds rounds over all of them, each a `time_callable` median over
min-time / rounds seconds (one warm-up call in the first round only); the table shows the median of the rounds,
the speed-up over the untouched model and MACs (attention, clustering and reconstruction counted).
Swin-T has depths 2/2/6/2 and 7x7 windows: stage 3 (blocks 4-9, a 14 x 14 grid of 4 windows) is where the
official code clusters Swin; `alpha=5` is the default (10/24 of the depth), `alpha=4` clusters the whole stage.
"""
import argparse
import json

import timm
import torch

import vitlab
from vitlab.profiling import count_flops, cpu_flags_text, cpu_name, time_callable, tune_allocator
from vitlab.bench.measure import dataset_for
from vitlab.engine import evaluate
from vitlab.techniques import format_technique, parse_technique
from vitlab.tokens import Expedit

SETTINGS = [Expedit(), Expedit(alpha=4, size=(5,)), Expedit(alpha=4, size=(4,)), Expedit(alpha=4, size=(3,), k=9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=6.0, help="seconds of timing per variant, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint", help="a trained vitlab checkpoint: time it on test images, evaluate val/test")
    parser.add_argument("--settings", help='";"-separated Expedit settings in --apply syntax (default: the four above)')
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()} ({cpu_flags_text()}); allocator: {tune_allocator()}")
    settings = SETTINGS if not args.settings else [parse_technique(t.strip()) for t in args.settings.split(";")
                                                   if t.strip()]
    torch.manual_seed(0)
    if args.checkpoint:
        def build():
            return vitlab.create_model(args.checkpoint).eval()
        test = dataset_for(build(), "fashion-mnist", "test")
        x = torch.stack([test[i][0] for i in range(args.batch)])
        label = args.checkpoint
    else:
        state = timm.create_model(args.model).state_dict()

        def build():
            model = timm.create_model(args.model).eval()
            model.load_state_dict(state)
            return model
        x = torch.randn(args.batch, 3, 224, 224)
        label = f"{args.model} at 224 (random weights)"
    rows = []
    for cfg in [None, *settings]:
        model = build()
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
        row = dict(variant=name, img_per_s=args.batch / median, macs=macs)
        if args.checkpoint:   # accuracy after the timing, so the evaluation cannot disturb it
            for split in ("val", "test"):
                data = dataset_for(model, "fashion-mnist", split)
                row[f"{split}_top1"] = evaluate(model, data, progress=False)["top1"]
        results.append(row)
        print(f"{name:<45} {row['img_per_s']:8.2f} img/s  {macs / 1e9:6.3f} GMACs"
              + "".join(f"  {k} {100 * row[k]:.2f} %" for k in ("val_top1", "test_top1") if k in row), flush=True)
    base = results[0]
    print(f"\n{label}, batch {args.batch}, {args.threads} threads, {cpu_name()} ({cpu_flags_text()}), "
          f"torch {torch.__version__}")
    acc = bool(args.checkpoint)
    print("| variant | img/s | speed-up | MMACs | MACs ratio |" + (" val top-1 % | test top-1 % |" if acc else ""))
    print("|---|---|---|---|---|" + ("---|---|" if acc else ""))
    for row in results:
        print(f"| {row['variant']} | {row['img_per_s']:.2f} | {row['img_per_s'] / base['img_per_s']:.2f}x | "
              f"{row['macs'] / 1e6:.1f} | {base['macs'] / row['macs']:.2f}x |"
              + (f" {100 * row['val_top1']:.2f} | {100 * row['test_top1']:.2f} |" if acc else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=label, batch=args.batch, threads=args.threads, rows=results), f, indent=1)


if __name__ == "__main__":
    main()
