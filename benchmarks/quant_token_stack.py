"""Token reduction stacked with attention quantization, through the attention seam (vitlab.attention): accuracy of
each reducer alone, quantization alone, the stack with the attention matmuls left float (`ptq:attn=false`: what the
stack computed before the seam, when the reducer's attention class silently kept its matmuls float) and the stack
with both effects.

    python benchmarks/quant_token_stack.py                 # reference-v2, first 2000 Fashion-MNIST test images

Calibration: 256 train images (seeded, as `vitlab quantize --calib-images 256`). `MACs quantized`: the share
of the model's MACs (stem and head excluded) that quantized ops run (`vitlab.quant.coverage`); tokens: executed after
each block in the last batch of 500 (ATS keeps a per-image count, padded to the batch's largest). Prints a markdown
table with the CPU, the thread count and the wall time.
"""
from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

import vitlab
from vitlab.bench.measure import calibration_batches, dataset_for

REDUCERS = ("tome:r=4", "evit:keep_rate=0.5", "ats:keep_rate=0.5", "mctf:r=4")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _top1(model, loader) -> float:
    hits = n = 0
    with torch.inference_mode():
        for x, y in loader:
            hits += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    return 100.0 * hits / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/fashion-mnist-reference-v2")
    p.add_argument("--quant", default="ptq:w=8,a=4", help="the quantization stacked on each reducer")
    p.add_argument("--limit", type=int, default=2000, help="first N test images")
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.time()
    model = vitlab.create_model(args.model).eval()
    calib = calibration_batches(model, "fashion-mnist", "train", args.calib_images)
    test = torch.utils.data.Subset(dataset_for(model, "fashion-mnist", "test"), range(args.limit))
    loader = torch.utils.data.DataLoader(test, batch_size=500)
    float_attn = args.quant + ",attn=false" if ":" in args.quant else args.quant + ":attn=false"
    stacks = [[], [args.quant]]
    for reducer in REDUCERS:
        stacks += [[reducer], [reducer, float_attn], [reducer, args.quant]]
    print("| stack | top-1 % | tokens after each block | MACs quantized |\n|---|---|---|---|")
    for stack in stacks:
        m = vitlab.apply_(copy.deepcopy(model), vitlab.parse_apply(stack), calib=calib)
        acc = _top1(m, loader)
        counts = getattr(getattr(m, "token_state", None), "counts", None)
        frac = getattr(m, "quant_mac_fraction", None)
        print(f"| {' + '.join(stack) or 'float'} | {acc:.2f} | {counts or '-'} | "
              f"{'-' if frac is None else f'{100 * frac:.1f} %'} |", flush=True)
    print(f"\n{args.model}, first {args.limit} test images; {_cpu()}, {args.threads} thread(s), torch "
          f"{torch.__version__}; wall {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
