"""Low-bit simulated PTQ on the reference model: every quantizer x bit width, and MPTQ-ViT (SQ-b, mixed precision).

    .venv/bin/python benchmarks/quant_adv_accuracy.py                      # the default table (7 configs)
    .venv/bin/python benchmarks/quant_adv_accuracy.py --more               # + log2, SQ-b, mixed precision, 3 bits
    .venv/bin/python benchmarks/quant_adv_accuracy.py --configs w=4,a=4,quantizer=adalog w=4,a=4,quantizer=minmax

Calibration: `--calib-images` (default 256) seeded images of the Fashion-MNIST *train* split; accuracy: the
*test* split (`--test-images`, default all 10000). Each config is a `vitlab.quant.PTQ` (`ptq:` on the command
line), applied with `vitlab.apply_(model, PTQ(...), calib=...)` to a fresh copy of the reference checkpoint.
`quantizer` picks the post-softmax and post-GELU quantizer (AdaLog's searches score candidates on softmax·V /
fc2's output, `objective=output`, the paper's; `objective=self` on the values' own MSE); the other activation
sites use `act_quantizer` (uniform, default mse), weights are symmetric per output channel (min-max).
`repq=true,quantizer=logsqrt2,post_gelu=false` is RepQ-ViT (`--apply repq`). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time

import torch

DEFAULT_CONFIGS = [                  # what fits the 4-minute budget; MORE_CONFIGS via --configs
    "w=8,a=8,quantizer=minmax",
    "w=6,a=6,quantizer=minmax",
    "w=6,a=6,quantizer=adalog",
    "w=4,a=4,quantizer=minmax",
    "w=4,a=4,quantizer=twin",
    "w=4,a=4,quantizer=adalog",
    "w=4,a=4,quantizer=adalog,objective=self",   # AdaLog's search on the values' own MSE instead of the output's
]
MORE_CONFIGS = [
    "w=4,a=4,quantizer=mse",             # control: uniform MSE-searched at every site
    "w=4,a=4,quantizer=log2",
    "w=4,a=4,quantizer=adalog,smooth=true",
    "w=4,a=4,quantizer=adalog,bits=5.5",
    "w=3,a=3,quantizer=minmax",
    "w=3,a=3,quantizer=twin",
    "w=3,a=3,quantizer=adalog",
    "w=4,a=4,quantizer=logsqrt2,post_gelu=false,repq=true",   # RepQ-ViT (= --apply repq:w=4,a=4)
    "w=3,a=3,quantizer=logsqrt2,post_gelu=false,repq=true",
]


def parse_config(text: str):
    """'w=4,a=4,quantizer=adalog' -> PTQ(w=4, a=4, quantizer='adalog') (field types from the dataclass)."""
    from vitlab.quant import PTQ

    kinds = {f.name: str(f.type) for f in dataclasses.fields(PTQ)}
    kwargs = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"unknown PTQ field {key!r} in {text!r}; fields: {', '.join(kinds)}")
        kind = kinds[key]
        if "bool" in kind:
            kwargs[key] = value.lower() in ("1", "true", "yes")
        elif "float" in kind:
            kwargs[key] = float(value)
        elif "int" in kind:
            kwargs[key] = int(value)
        else:
            kwargs[key] = value
    return PTQ(**kwargs)


@torch.no_grad()
def top1(model, images, labels, batch: int = 500) -> float:
    hits = sum((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
               for i in range(0, len(images), batch))
    return 100.0 * hits / len(images)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/fashion-mnist-reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--more", action="store_true", help="also run MORE_CONFIGS (several more minutes)")
    args = parser.parse_args(argv)
    if args.more:
        args.configs = list(args.configs) + MORE_CONFIGS
    torch.set_num_threads(args.threads)

    import vitlab
    from vitlab.bench.measure import calibration_batches, dataset_for
    from vitlab.profiling import tune_allocator

    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    base = vitlab.create_model(args.checkpoint).eval()
    calib = calibration_batches(base, "fashion-mnist", "train", args.calib_images)
    test = dataset_for(base, "fashion-mnist", "test")
    n = min(args.test_images, len(test))
    images = torch.stack([test[i][0] for i in range(n)])
    labels = torch.tensor([test[i][1] for i in range(n)])

    float_top1 = top1(base, images, labels)
    rows = [("float", "32/32", "-", float_top1, 0.0, 0.0)]
    for text in args.configs:
        cfg = parse_config(text)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        model = vitlab.apply_(model, cfg, calib=calib)
        calib_s = time.perf_counter() - start
        acc = top1(model, images, labels)
        extra = []
        if cfg.smooth:
            extra.append("SQ-b")
        if cfg.bits is not None:
            bits = model.vitlab.bit_allocation
            sizes = {name: module.weight.numel() for name, module in model.named_modules() if name in bits}
            average = sum(sizes[k] * b for k, b in bits.items()) / sum(sizes.values())
            extra.append(f"MP avg {average:.2f} b ({'/'.join(str(b) for b in bits.values())})")
        if cfg.quantizer == "adalog":
            extra.insert(0, f"search objective: {cfg.objective}")
        label = f"{cfg.quantizer}" + (f" + {', '.join(extra)}" if extra else "")
        rows.append((f"ptq:{text}", f"{cfg.w}/{cfg.a}", label, acc, calib_s, time.perf_counter() - start - calib_s))
        print(f"{text}: {acc:.2f} % (float {float_top1:.2f} %), calibration {calib_s:.0f} s", file=sys.stderr, flush=True)

    print(f"\nReference model {args.checkpoint}: test top-1 on {n} test images, calibration on {args.calib_images} "
          f"train images (seed 0), {args.threads} threads, torch {torch.__version__}\n")
    print("| config | W/A bits | post-softmax / post-GELU quantizer | top-1 (%) | vs float (pt) | calib (s) | eval (s) |")
    print("|---|---|---|---|---|---|---|")
    for config, wa, label, acc, calib_s, eval_s in rows:
        print(f"| `{config}` | {wa} | {label} | {acc:.2f} | {acc - float_top1:+.2f} | {calib_s:.1f} | {eval_s:.1f} |")


if __name__ == "__main__":
    main()
