"""What shifts buy on a CPU: ShiftAddViT's shift layers through a real shift-and-add kernel
(vitlab/quant/shift_kernel.py), against the float32 GEMM and the float simulation, per layer and for the whole model.

    python benchmarks/shiftadd_speed.py [--threads 2] [--limit 2000] [--rounds 5]

Layers: the four block linears of checkpoints/fashion-mnist-reference-v2 (width 64, MLP 128) at batch 32 x 50 tokens,
and deit-small's (width 384, MLP 1536) at batch 8 x 197 tokens, each with weights converted to 5-bit DeepShift-PS
(`ShiftLinear.from_linear`). Three ways to compute one layer: `nn.Linear` (float32 GEMM, oneDNN / MKL), the float
simulation (`ShiftLinear`: fixed-point rounding, then a float GEMM with the power-of-two weights) and the kernel
(`ShiftKernelLinear`: int32 fixed point, right shifts, conditional negation, int64 sums, compiled by numba). Model:
the reference with every block linear a shift layer (`shiftadd:attention=false,linears=shift`, no fine-tuning),
simulated and through the kernel (`shift_kernel_`), beside the float model: test top-1 on the first --limit test
images and images/s at batch 32. Each cell is the median of --rounds rounds that alternate the contenders in one
process (vitlab.profiling.time_callable per contender per round), so machine noise hits all alike.
"""
import argparse
import statistics
from pathlib import Path

import torch
import torch.nn as nn

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine.evaluate import evaluate
from vitlab.profiling import cpu_flags_text, cpu_name, time_callable
from vitlab.quant.shift_kernel import ShiftKernelLinear, shift_kernel_
from vitlab.quant.shiftadd import ShiftAdd, ShiftLinear

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "checkpoints" / "fashion-mnist-reference-v2"
LAYERS = [   # (model, layer, in, out, rows)
    ("reference-v2", "qkv", 64, 192, 32 * 50), ("reference-v2", "proj", 64, 64, 32 * 50),
    ("reference-v2", "fc1", 64, 128, 32 * 50), ("reference-v2", "fc2", 128, 64, 32 * 50),
    ("deit-small", "qkv", 384, 1152, 8 * 197), ("deit-small", "proj", 384, 384, 8 * 197),
    ("deit-small", "fc1", 384, 1536, 8 * 197), ("deit-small", "fc2", 1536, 384, 8 * 197),
]


def rounds(contenders: dict, n: int) -> dict:
    """{name: median seconds}: `n` rounds, each timing every contender once (1 s each), in turn."""
    times = {name: [] for name in contenders}
    for _ in range(n):
        for name, fn in contenders.items():
            times[name].append(time_callable(fn, warmup=2, min_time_s=1.0, max_time_s=3.0).median_s)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=2000, help="test images for the accuracy column")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{cpu_name()} ({cpu_flags_text()}), {args.threads} threads")

    print("\n| model | layer (in -> out, rows) | float32 GEMM ms | float simulation ms | shift kernel ms | "
          "kernel vs GEMM |\n|---|---|---:|---:|---:|---:|")
    for model, name, n_in, n_out, n_rows in LAYERS:
        linear = nn.Linear(n_in, n_out)
        shift = ShiftLinear.from_linear(linear)
        kernel = ShiftKernelLinear.from_shift_linear(shift)
        x = torch.randn(n_rows, n_in)
        with torch.inference_mode():
            kernel(x)   # compile (numba caches it)
            t = rounds({"gemm": lambda: linear(x), "sim": lambda: shift(x), "kernel": lambda: kernel(x)}, args.rounds)
        print(f"| {model} | {name} ({n_in} -> {n_out}, {n_rows}) | {1e3 * t['gemm']:.3f} | {1e3 * t['sim']:.3f} | "
              f"{1e3 * t['kernel']:.3f} | {t['gemm'] / t['kernel']:.2f}x |", flush=True)

    float_model = vitlab.create_model(str(REFERENCE)).eval()
    sim_model = vitlab.apply_(vitlab.create_model(str(REFERENCE)), [ShiftAdd(attention=False, linears="shift")]).eval()
    kernel_model = vitlab.apply_(vitlab.create_model(str(REFERENCE)), [ShiftAdd(attention=False, linears="shift")]).eval()
    replaced = shift_kernel_(kernel_model)
    test = dataset_for(float_model, "fashion-mnist", "test")
    models = {"float32": float_model, "shift layers, float simulation": sim_model,
              f"shift layers, shift kernel ({replaced} layers)": kernel_model}
    top1 = {name: evaluate(m, test, limit=args.limit, progress=False)["top1"] for name, m in models.items()}
    x = torch.stack([test[i][0] for i in range(32)])
    with torch.inference_mode():
        t = rounds({name: (lambda m=m: m(x)) for name, m in models.items()}, args.rounds)
    base = t["float32"]
    print(f"\n| model (checkpoints/fashion-mnist-reference-v2) | test top-1 (first {args.limit}) | img/s (batch 32) | "
          "speed vs float32 |\n|---|---:|---:|---:|")
    for name in models:
        print(f"| {name} | {100 * top1[name]:.2f} % | {32 / t[name]:.0f} | {base / t[name]:.2f}x |")


if __name__ == "__main__":
    main()
