"""Speed of real int8 deployment (`--apply w8a8`) beside float, measured interleaved in one run.

    python benchmarks/quant_speed.py                       # deit_small_patch16_224 + the reference model, b32, 2 threads
    python benchmarks/quant_speed.py --models deit_small_patch16_224 --engines all   # + ONNX Runtime, torchao

Rows: torch float (eager), OpenVINO float (f32), OpenVINO int8 with vitlab's calibration (w8a8), OpenVINO int8 with
NNCF's default calibration (`nncf.quantize(..., model_type=TRANSFORMER)`); with `--engines all` also ONNX Runtime
int8 (QDQ, its own static calibration) and torchao PT2E x86 int8 (X86InductorQuantizer + torch.compile). Speed
calibration uses random images (speed does not depend on the data). Each timing is the median of `--repeats`
rounds, each round timing every engine once, so the ratios share the machine's conditions. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

import vitlab
from vitlab.quant import W8A8
from vitlab.quant.deploy import OpenVINORunner, to_openvino
from vitlab.runner import model_input_size


def _time(fn, x, min_time: float) -> float:
    fn(x)
    n, start = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and n >= 2:
            return elapsed / n


def _ort(model, x, calib, threads):
    import tempfile

    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": b.numpy()} for b in calib])

        def get_next(self):
            return next(self.it, None)

    d = tempfile.mkdtemp(prefix="vitlab-ort-")
    torch.onnx.export(model, (x[:1],), f"{d}/f.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False)
    quantize_static(f"{d}/f.onnx", f"{d}/q.onnx", Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(f"{d}/q.onnx", opts, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"x": np.ascontiguousarray(a.numpy())})[0]


def _torchao(model, x, calib):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (X86InductorQuantizer,
                                                                             get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        exported = torch.export.export(copy.deepcopy(model), (x,)).module()
        prepared = prepare_pt2e(exported, quantizer)
        for b in calib:
            prepared(b.expand(x.shape[0], *b.shape[1:]) if b.shape[0] != x.shape[0] else b)
        converted = convert_pt2e(prepared)
        compiled = torch.compile(converted)
        compiled(x)
    return lambda a: compiled(a)


def bench_model(name: str, batch: int, threads: int, repeats: int, min_time: float, engines: str) -> list[dict]:
    torch.manual_seed(0)
    model = vitlab.create_model(name).eval()
    c, h, w = model_input_size(model)
    x = torch.randn(batch, c, h, w)
    calib = [torch.randn(batch, c, h, w) for _ in range(2)]
    runners = {"torch float": model}
    runners["OpenVINO float"] = OpenVINORunner(to_openvino(model, x), model, (), "openvino", threads)
    runners["OpenVINO int8, NNCF default"] = vitlab.apply_(copy.deepcopy(model), W8A8(calibration="nncf",
                                                                                        threads=threads), calib=calib)
    runners["OpenVINO int8, vitlab (w8a8)"] = vitlab.apply_(copy.deepcopy(model), W8A8(threads=threads), calib=calib)
    runners["OpenVINO int8, vitlab (w8a8:attn=false)"] = vitlab.apply_(
        copy.deepcopy(model), W8A8(threads=threads, attn=False), calib=calib)
    if engines == "all":
        runners["ONNX Runtime int8 (QDQ, own calibration)"] = _ort(model, x, calib, threads)
        runners["torchao PT2E x86 int8 + compile"] = _torchao(model, x, calib)
    times = {k: [] for k in runners}
    with torch.inference_mode():
        for _ in range(repeats):
            for k, fn in runners.items():
                times[k].append(_time(fn, x, min_time))
    base = statistics.median(times["torch float"])
    return [{"model": name, "engine": k, "ms": statistics.median(v) * 1000, "speedup": base / statistics.median(v)}
            for k, v in times.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "checkpoints/fashion-mnist-reference"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--engines", choices=("openvino", "all"), default="openvino")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batch, args.threads, args.repeats, args.min_time, args.engines)
    print(f"\nbatch {args.batch}, {args.threads} threads, median of {args.repeats} interleaved rounds, "
          f"torch {torch.__version__}, OpenVINO {__import__('openvino').__version__}\n")
    print("| model | engine | ms / batch | speed-up vs torch float |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['engine']} | {r['ms']:.1f} | {r['speedup']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
