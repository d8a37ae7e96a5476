"""ShiftAddViT on the Fashion-MNIST reference: test top-1 right after the reparameterization and after a short
fine-tune, beside a float fine-tune of the same length, and the simulated (float32) speed of each.

    OMP_NUM_THREADS=1 python benchmarks/shiftadd_finetune.py [--steps 300] [--out /tmp/shiftadd]

Every variant starts from checkpoints/fashion-mnist-reference-v2 and fine-tunes `--steps` AdamW steps of 64 images
with the same seed and schedule (`vitlab.engine.fit` with `--apply` and `--recipe shiftadd`, the product path).
Prints a markdown table. Speed is PyTorch's float32 simulation of shift and add arithmetic (it computes the
same values with multiplications, plus the routing): it says nothing about shift/add hardware and is given so the
simulation's cost is on record.
"""
import argparse
import json
import time
from pathlib import Path

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine import TrainConfig, evaluate, fit
from vitlab.profiling import cpu_flags_text, cpu_name, time_callable
from vitlab.quant.shiftadd import shift_fraction

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "checkpoints" / "fashion-mnist-reference-v2"
VARIANTS = [   # (label, --apply texts, --recipe)
    ("float fine-tune (no technique)", [], None),
    ("shift linears only (`shiftadd:attention=false,linears=shift`)", ["shiftadd:attention=false,linears=shift"], None),
    ("binary attention only (`shiftadd:linears=none`)", ["shiftadd:linears=none"], None),
    ("binary attention + mult/shift MoE (`shiftadd`, recipe weight 0.01)", ["shiftadd"], "shiftadd:weight=0.01"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="/tmp/shiftadd")
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{cpu_name()} ({cpu_flags_text()}), 1 thread")
    test = None
    rows = []
    for i, (label, apply, recipe) in enumerate(VARIANTS):
        torch.manual_seed(0)
        before = vitlab.apply_(vitlab.create_model(str(REFERENCE)), vitlab.parse_apply(apply)).eval()
        if test is None:
            test = dataset_for(before, "fashion-mnist", "test")
        acc0 = evaluate(before, test, limit=args.limit, progress=False)["top1"]
        start = time.process_time()
        run = fit(TrainConfig(out=f"{args.out}/{i}", init=str(REFERENCE), apply=apply, recipe=recipe,
                              epochs=args.steps * 64 / 55000, batch_size=64, lr=2e-4, min_lr=1e-6,
                              warmup_epochs=0.0, label_smoothing=0.1, hflip=0.5, crop_padding=0, seed=0, threads=1,
                              progress=False, eval_val=False), overwrite=True)
        cpu_s = time.process_time() - start
        model = vitlab.create_model(str(run)).eval()
        acc1 = evaluate(model, test, limit=args.limit, progress=False)["top1"]
        x = torch.randn(32, *model.pretrained_cfg["input_size"])
        with torch.inference_mode():
            model(x)
            share = shift_fraction(model)
            speed = 32 / time_callable(lambda: model(x), min_time_s=2.0).median_s
        rows.append((label, acc0, acc1, cpu_s, speed, share))
        print(json.dumps(dict(variant=label, before=acc0, after=acc1, train_cpu_s=round(cpu_s), img_s=round(speed),
                              shift_share=share)), flush=True)
    print(f"\n| variant | test top-1 before fine-tuning | after {args.steps} steps | train CPU s | "
          "simulated img/s (batch 32, 1 thread) | tokens routed to shift experts |")
    print("|---|---|---|---|---|---|")
    for label, acc0, acc1, cpu_s, speed, share in rows:
        share_text = "-" if share != share else f"{100 * share:.0f} %"
        print(f"| {label} | {100 * acc0:.2f} % | {100 * acc1:.2f} % | {cpu_s:.0f} | {speed:.0f} | {share_text} |")


if __name__ == "__main__":
    main()
