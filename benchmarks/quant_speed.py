"""Speed of real int8 deployment (`--apply w8a8`) beside float and beside the other int8 engines, interleaved.

    python benchmarks/quant_speed.py                # deit_small_patch16_224 + the reference model, b32, 2 threads
    python benchmarks/quant_speed.py --engines all         # + ONNX Runtime (float, int8 QDQ), torchao PT2E, compile
    python benchmarks/quant_speed.py --engines all --only "ONNX Runtime,torchao" --models deit_small_patch16_224

Rows (`--engines openvino`, the default): torch float (eager), OpenVINO float (f32), OpenVINO int8 with NNCF's default
calibration (`nncf.quantize(..., model_type=TRANSFORMER)`), vitlab's scales on OpenVINO (`w8a8:engine=openvino`) and
on ONNX Runtime (`w8a8:engine=onnxruntime`), `w8a8` with engine=auto (its own timed trial; the row says which engine
it kept), and bf16 on torch (autocast) and OpenVINO (refused, as an error row, on CPUs without native bf16).
`--engines all` adds torch float + `torch.compile`, ONNX Runtime float, ONNX Runtime int8 (`quantize_static`, QDQ,
per-channel s8 weights / u8 activations, its own min-max calibration), the attn=false variants and torchao's PT2E
x86 int8 (`X86InductorQuantizer` default static config + `torch.compile`). Every engine gets `--threads` explicitly.
The table's header line names the CPU and its ISA flags.

Calibration: a checkpoint folder whose config names its data (the reference model) is calibrated on 64 seeded
train images, and top-1 on the first `--accuracy-images` test images plus top-1 agreement with torch float are
reported; other models (deit_small, random weights) are calibrated on random images (speed does not depend on
the data) and have no accuracy column. An engine that fails to build is reported as a row with its error, the
others still run. Timing: one warm-up call per engine, then `--repeats` rounds, each timing every engine once
(at least one call, at least `--min-time` s), so the ratios share the machine's conditions; the median round is
reported. Prints a markdown table.

Budget: the default set is the one timed quietly in BENCHMARKS.md. `--engines all` adds two `torch.compile` builds
and ORT's calibration pass; on the shared, loaded CPU (1 thread) the reference model took 3 min, and deit_small with
every engine did not finish setting up in 25 min (5 of its engines: about 5 min), so run it per model
(`--models ...`) or with `--only`.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import vitlab
from vitlab.profiling import tune_allocator
from vitlab.quant import W8A8
from vitlab.quant.deploy import OpenVINORunner, to_openvino
from vitlab.runner import model_input_size


def _time(fn, x, min_time: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def _onnx_export(model, x) -> str:
    d = tempfile.mkdtemp(prefix="vitlab-ort-")
    torch.onnx.export(model, (x[:1],), f"{d}/f.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False)
    return d


def _ort_session(path: str, threads: int):
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda a: torch.from_numpy(sess.run(None, {"x": np.ascontiguousarray(a.numpy())})[0])


def _ort_float(model, x, calib, threads):
    return _ort_session(f"{_onnx_export(model, x)}/f.onnx", threads)


def _ort_int8(model, x, calib, threads):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": b.numpy()} for b in calib])

        def get_next(self):
            return next(self.it, None)

    d = _onnx_export(model, x)
    # MatMul / Gemm / Conv only: ORT's default list also "quantizes" LayerNorm / Add, which its CPU kernels then run
    # as dequantize -> f32 op -> quantize (slower, and not what the other engines quantize)
    quantize_static(f"{d}/f.onnx", f"{d}/q.onnx", Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"])
    return _ort_session(f"{d}/q.onnx", threads)


def _compiled_float(model, x, calib, threads):
    compiled = torch.compile(copy.deepcopy(model))
    with torch.no_grad():
        compiled(x)
    return compiled


def _torchao(model, x, calib, threads):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        exported = torch.export.export(copy.deepcopy(model), (x,)).module()
        prepared = prepare_pt2e(exported, quantizer)
        for b in calib:
            prepared(b if b.shape[0] == x.shape[0] else b.expand(x.shape[0], *b.shape[1:]))
        converted = convert_pt2e(prepared)
        compiled = torch.compile(converted)
        compiled(x)
    return compiled


def _ov_float(model, x, calib, threads):
    return OpenVINORunner(to_openvino(model, x), model, (), "openvino", threads)


def _w8a8(**kw):
    def build(model, x, calib, threads):
        return vitlab.deploy(copy.deepcopy(model), W8A8(threads=threads, **kw), calib=calib)

    return build


def _bf16(engine):
    def build(model, x, calib, threads):
        from vitlab.quant import BF16

        return vitlab.deploy(copy.deepcopy(model), BF16(engine=engine, threads=threads))

    return build


ENGINES = [  # (row name, builder(model, x, calib, threads) -> callable, in the default set)
    ("torch float", lambda model, x, calib, threads: model, True),
    ("torch float + compile", _compiled_float, False),
    ("OpenVINO float", _ov_float, True),
    ("OpenVINO int8, NNCF default", _w8a8(calibration="nncf"), True),
    ("OpenVINO int8, vitlab (w8a8:engine=openvino)", _w8a8(engine="openvino"), True),
    ("OpenVINO int8, vitlab (w8a8:engine=openvino,attn=false)", _w8a8(engine="openvino", attn=False), False),
    ("ONNX Runtime float", _ort_float, False),
    ("ONNX Runtime int8 (QDQ, own calibration)", _ort_int8, False),
    ("ONNX Runtime int8, vitlab (w8a8:engine=onnxruntime)", _w8a8(engine="onnxruntime"), True),
    ("ONNX Runtime int8, vitlab (w8a8:engine=onnxruntime,attn=false)", _w8a8(engine="onnxruntime", attn=False), False),
    ("w8a8 (engine=auto: timed trial)", _w8a8(), True),
    ("torch bf16 autocast (bf16:engine=torch)", _bf16("torch"), True),
    ("OpenVINO bf16 (bf16:engine=openvino)", _bf16("openvino"), True),
    ("torchao PT2E x86 int8 + compile", _torchao, False),
]


def _data_spec(name: str) -> str | None:
    """The dataset a checkpoint folder was trained on (its config.json), or None (a timm name: random weights)."""
    config = Path(name) / "config.json"
    if not config.is_file():
        return None
    import json

    return (json.loads(config.read_text()).get("data") or {}).get("spec")


@torch.no_grad()
def _accuracy(fn, reference, images, labels, batch) -> tuple[float, float]:
    hits = agree = 0
    for i in range(0, len(images), batch):
        xb = images[i:i + batch]
        pred = fn(xb).argmax(1)
        hits += (pred == labels[i:i + batch]).sum().item()
        agree += (pred == reference[i:i + batch]).sum().item()
    return 100.0 * hits / len(images), 100.0 * agree / len(images)


def bench_model(name: str, args) -> list[dict]:
    torch.manual_seed(0)
    model = vitlab.create_model(name).eval()
    c, h, w = model_input_size(model)
    x = torch.randn(args.batch, c, h, w)
    data = _data_spec(name) if args.accuracy_images > 0 else None
    if data:
        from vitlab.bench.measure import calibration_batches, dataset_for

        calib = calibration_batches(model, data, "train", 64, batch_size=args.batch)
        test = dataset_for(model, data, "test")
        n = min(args.accuracy_images, len(test)) // args.batch * args.batch   # whole batches: torchao's graph is static
        images = torch.stack([test[i][0] for i in range(n)])
        labels = torch.tensor([test[i][1] for i in range(n)])
        with torch.no_grad():
            float_pred = torch.cat([model(images[i:i + args.batch]).argmax(1) for i in range(0, n, args.batch)])
    else:
        calib = [torch.randn(args.batch, c, h, w) for _ in range(2)]
    rows, runners = {}, {}
    for engine, build, default in ENGINES:
        if not (default or args.engines == "all"):
            continue
        if args.only and engine != "torch float" and not any(k in engine for k in args.only.split(",")):
            continue
        start = time.perf_counter()
        try:
            runners[engine] = build(model, x, calib, args.threads)
            with torch.inference_mode():
                runners[engine](x)                                   # warm-up
        except Exception as e:  # noqa: BLE001 - one engine failing must not hide the others' numbers
            rows[engine] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            print(f"{name}: {engine} failed: {e}", file=sys.stderr, flush=True)
            continue
        rows[engine] = {"setup_s": time.perf_counter() - start, "times": []}
        choice = getattr(runners[engine], "engine_choice", None)
        if choice:
            rows[engine]["choice"] = f"{choice['engine']} ({choice['how']})"
        print(f"{name}: {engine} ready in {rows[engine]['setup_s']:.0f} s", file=sys.stderr, flush=True)
    with torch.inference_mode():
        for _ in range(args.repeats):
            for engine, fn in runners.items():
                rows[engine]["times"].append(_time(fn, x, args.min_time))
        if data and n:
            for engine, fn in runners.items():
                rows[engine]["top1"], rows[engine]["agree"] = _accuracy(fn, float_pred, images, labels, args.batch)
    base = statistics.median(rows["torch float"]["times"])
    out = []
    for engine, row in rows.items():
        r = {"model": name, "engine": engine, **row}
        if "times" in row:
            r["ms"] = statistics.median(row["times"]) * 1000
            r["speedup"] = base / statistics.median(row["times"])
        if "top1" in row:
            r["accuracy_images"] = n
        out.append(r)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "checkpoints/fashion-mnist-reference"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--engines", choices=("openvino", "all"), default="openvino")
    p.add_argument("--only", default="", help="comma-separated parts of engine names to keep (torch float, the "
                   "baseline, always runs), e.g. --engines all --only 'ONNX Runtime,torchao'")
    p.add_argument("--accuracy-images", type=int, default=1000,
                   help="test images for top-1 / agreement on checkpoints that name their data (0: skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare
    rows = []
    for name in args.models:
        rows += bench_model(name, args)
    from importlib.metadata import PackageNotFoundError, version

    from vitlab.profiling import cpu_flags_text, cpu_name

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    print(f"\n{cpu_name()} ({cpu_flags_text()}), batch {args.batch}, {args.threads} threads, median of "
          f"{args.repeats} interleaved rounds, torch {torch.__version__}, OpenVINO {v('openvino')}, NNCF {v('nncf')}, "
          f"onnxruntime {v('onnxruntime')}, torchao {v('torchao')}\n")
    print("| model | engine | ms / batch | speed-up vs torch float | top-1 % | top-1 agreement with torch float % "
          "| setup (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['engine']} | failed: {r['error']} | | | | |")
            continue
        acc = (f"{r['top1']:.2f} | {r['agree']:.2f}") if "top1" in r else "- | -"
        engine = r["engine"] + (f" -> {r['choice']}" if "choice" in r else "")
        print(f"| {r['model']} | {engine} | {r['ms']:.1f} | {r['speedup']:.2f}x | {acc} | {r['setup_s']:.0f} |")
    if any("top1" in r for r in rows):
        n = next(r["accuracy_images"] for r in rows if "accuracy_images" in r)
        print(f"\ntop-1 and agreement: first {n} test images; that model calibrated on 64 seeded train images. "
              "Other models: random calibration images, no accuracy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
