"""Do the int8 engines compute what vitlab's calibrated twin computes? One row per seed backbone (tiny random-init
instances of tests/seed_models.py): relative L2 logit error of the simulated twin against float, and of OpenVINO's
and ONNX Runtime's int8 graphs against the twin (same scales: only rounding ties and summation order may differ).
w8a8 refuses an engine above `vitlab.quant.deploy.TWIN_TOLERANCE`.

    OMP_NUM_THREADS=1 python benchmarks/engine_agreement.py [--models NAME ...]

OpenVINO's kernels follow the CPU: `ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI` (or AVX2) in the environment caps the ISA
it uses, to see another machine's kernels on this one.
"""
import argparse
import contextlib
import copy
import io
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from seed_models import SEED_MODELS, input_shape  # noqa: E402

from vitlab.profiling.cpu import cpu_flags_text, cpu_name  # noqa: E402
from vitlab.quant import W8A8, calibrate, prepare_  # noqa: E402
from vitlab.quant.deploy import TWIN_TOLERANCE, _ort_runner, compile_openvino, to_openvino  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def row(name: str) -> str:
    torch.manual_seed(0)
    model = SEED_MODELS[name]().eval()
    shape = input_shape(name, model)
    calib = [torch.randn(8, *shape) for _ in range(2)]
    x = torch.randn(8, *shape)
    float_model = copy.deepcopy(model)
    prepare_(model, W8A8().ptq(), example=calib[0])
    calibrate(model, calib)
    with torch.no_grad():
        twin, ref = model(x), float_model(x)
    cells = [f"{_rel(twin, ref):.4f}"]

    def openvino():
        compiled = compile_openvino(to_openvino(model, x), 1)
        return torch.from_numpy(compiled(x.numpy())[0])

    def onnxruntime():
        with contextlib.redirect_stdout(io.StringIO()):   # torch.onnx prints the whole graph when export fails
            return _ort_runner(model, float_model, (), 1, calib[0])(x)

    for run in (openvino, onnxruntime):
        try:
            err = _rel(run(), twin)
            cells.append(f"**{err:.3f}**" if err > TWIN_TOLERANCE else f"{err:.4f}")
        except Exception as e:  # noqa: BLE001 - an engine that cannot convert the model is a row entry
            cells.append(f"cannot convert ({type(e).__name__})")
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(SEED_MODELS))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "all")
    print(f"{cpu_name()}; flags: {cpu_flags_text()}; OpenVINO ISA cap: {isa}\n")
    print("| model | twin vs float | OpenVINO vs twin | ONNX Runtime vs twin |\n|---|---|---|---|")
    for name in args.models:
        print(row(name), flush=True)


if __name__ == "__main__":
    main()
