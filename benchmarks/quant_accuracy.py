"""Accuracy of post-training quantization on the reference model: every registered quantizer x bit width, the
real int8 deployment (vitlab's scales and NNCF's default calibration on OpenVINO) and its agreement with the
simulated twin.

    python benchmarks/quant_accuracy.py                    # checkpoints/fashion-mnist-reference, Fashion-MNIST test
    python benchmarks/quant_accuracy.py --bits 8 4 --quantizers minmax adalog --limit 2000

Calibration: 256 images from the train split (seeded, as `vitlab quantize --calib-images 256`); accuracy on the
10,000 test images. Rows `ptq:w=B,a=B,quantizer=Q` are simulated (fake-quant PyTorch); for a log-domain quantizer
the other activation sites use `act_quantizer` (mse). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import vitlab
from vitlab.bench.measure import calibration_batches, dataset_for
from vitlab.profiling import tune_allocator
from vitlab.quant import PTQ, W8A8, quantizer_names


def _top1(fn, loader) -> float:
    hits = n = 0
    with torch.inference_mode():
        for x, y in loader:
            hits += (fn(x).argmax(1) == y).sum().item()
            n += len(y)
    return 100.0 * hits / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/fashion-mnist-reference")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4])
    p.add_argument("--quantizers", nargs="+", default=None, help="default: every registered quantizer")
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="first N test images only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-deploy", action="store_true", help="skip the OpenVINO rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare
    model = vitlab.create_model(args.model).eval()
    calib = calibration_batches(model, args.data, "train", args.calib_images)
    test = dataset_for(model, args.data, "test")
    if args.limit:
        test = torch.utils.data.Subset(test, range(min(args.limit, len(test))))
    loader = torch.utils.data.DataLoader(test, batch_size=500)
    rows = []
    base = _top1(model, loader)
    rows.append(("float", "torch", base, ""))
    for bits in args.bits:
        for name in args.quantizers or quantizer_names():
            cfg = PTQ(w=bits, a=bits, quantizer=name)
            t = time.time()
            try:
                q = vitlab.apply_(copy.deepcopy(model), cfg, calib=calib)
            except Exception as e:  # noqa: BLE001  (a quantizer that cannot run is a row, not a crash)
                rows.append((vitlab.format_technique(cfg), "simulated", float("nan"), f"error: {e}"))
                continue
            seconds = time.time() - t
            rows.append((vitlab.format_technique(cfg), "simulated", _top1(q, loader), f"calibration {seconds:.0f} s"))
            print(rows[-1], file=sys.stderr, flush=True)
    if not args.no_deploy:
        for cfg in (W8A8(threads=args.threads), W8A8(calibration="nncf", threads=args.threads)):
            runner = vitlab.deploy(copy.deepcopy(model), cfg, calib=calib)
            note = "NNCF default int8 (model_type=TRANSFORMER)" if cfg.calibration == "nncf" else ""
            if runner.sim_module is not None:
                agree = n = 0
                sim_hits = 0
                with torch.inference_mode():
                    for x, y in loader:
                        a, s = runner(x).argmax(1), runner.sim_module(x).argmax(1)
                        agree += (a == s).sum().item()
                        sim_hits += (s == y).sum().item()
                        n += len(y)
                rows.append((vitlab.format_technique(cfg) + " twin", "simulated", 100.0 * sim_hits / n, ""))
                note = f"top-1 agreement with its simulated twin {100.0 * agree / n:.2f} %"
            rows.append((vitlab.format_technique(cfg), runner.engine, _top1(runner, loader), note))
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"\n{args.model}, {len(test)} test images of {args.data}, calibration {args.calib_images} train images\n")
    print("| config | runs on | top-1 % | drop (pt) | note |")
    print("|---|---|---:|---:|---|")
    for cfg, engine, top1, note in rows:
        print(f"| {cfg} | {engine} | {top1:.2f} | {base - top1:+.2f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
