"""Real int8 inference on CPU with OpenVINO, with the scales vitlab's calibration computed.

How the scales reach the engine: the calibrated simulated model (`vitlab.quant.sim`, uniform quantizers only)
computes its fake quantization with `torch.fake_quantize_per_tensor_affine` / `..._per_channel_affine`;
OpenVINO's PyTorch frontend converts each of those ops into a `FakeQuantize` node whose input range is
``[(qmin - z) * s, (qmax - z) * s]`` with ``qmax - qmin + 1`` levels, i.e. exactly vitlab's scale and zero-point.
OpenVINO's low-precision transformations then run the Linear layers (and the attention matmuls) as u8 x i8 int8
kernels (VNNI / AMX) with those ranges; `fake_quant_ranges(runner.ov_model)` and `weight_scales(...)` read them
back. Engine choice: see BENCHMARKS.md, "Quantization" (`benchmarks/quant_speed.py --engines all` times OpenVINO
beside ONNX Runtime's QDQ path and torchao's PT2E x86 path on the same model, batch and threads).

Engine settings are explicit: `INFERENCE_PRECISION_HINT=f32` (OpenVINO picks bf16 on CPUs that have it, which
would change the numbers) and `INFERENCE_NUM_THREADS` (OpenVINO ignores torch's thread setting).

`calibration="nncf"` runs NNCF's own default int8 (`nncf.quantize(..., model_type=TRANSFORMER)`) on the same
engine, for comparison.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from ..profiling.cpu import cpu_flags_text, cpu_name, has_bf16
from ..record import update_record
from ..runner import TorchRunner, example_shape, model_input_size
from ..techniques import TechniqueError, TechniqueNotApplicable, applied_techniques, format_technique
from ..utils.io import atomic_path
from .calibration import calibrate, prepare_
from .engine_choice import EngineFailure, choose_engine, installed_engines
from .sim import quant_layers

__all__ = ["OpenVINORunner", "OnnxRuntimeRunner", "to_onnx", "deploy_w8a8", "deploy_w8", "deploy_bf16", "to_openvino", "compile_openvino", "fake_quant_ranges",
           "weight_scales", "ov_config", "int8_weight_form"]


def _ov():
    try:
        import openvino as ov
    except ImportError as e:  # pragma: no cover - openvino is a dependency
        raise TechniqueError("w8a8 / w8 deploy with OpenVINO: pip install openvino") from e
    return ov


def ov_config(threads: int | None, precision: str = "f32") -> dict:
    """The OpenVINO CPU settings vitlab always passes, so that the engine computes the same numbers on every CPU:

    - `INFERENCE_PRECISION_HINT` = `precision` ("f32" by default: OpenVINO would pick bf16 on CPUs with AVX512_BF16
      or AMX; the `bf16` technique asks for "bf16" explicitly);
    - `DYNAMIC_QUANTIZATION_GROUP_SIZE` = 0: on CPUs with VNNI/AMX, OpenVINO otherwise quantizes the f32 activations
      of weight-compressed (int8-weight) matmuls to int8 on the fly, so `w8` (weight-only int8, f32 activations)
      would compute something else there (1.7e-3 off the twin on a tiny ViT, against 1e-7 with it off);
    - `INFERENCE_NUM_THREADS`: OpenVINO ignores torch's thread setting.
    """
    return {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0, "PERFORMANCE_HINT": "LATENCY"}


@contextlib.contextmanager
def int8_weight_form(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every calibrated QuantLinear / QuantConv2d computes its weight as ``int8 codes *
    per-channel scale`` from buffers `weight_int8` / `weight_scale` (vitlab's codes and scales). Traced, that is
    OpenVINO's compressed-weight pattern Constant(i8) -> Convert -> Multiply, which it keeps (a folded
    fake-quantized f32 weight would lose the scales) and runs as the i8 operand of its int8 kernels (FullyConnected,
    Convolution, GroupConvolution)."""
    layers = [m for _, m in quant_layers(model) if m.weight_quant.mode == "quant"]
    try:
        for m in layers:
            wq = m.weight_quant
            if wq.bits > 8 or not getattr(wq, "symmetric", False) or bool((wq.zero_point != 0).any()):
                raise TechniqueError(f"int8 deployment needs symmetric weights of at most 8 bits, got {wq}")
            m.register_buffer("weight_int8", wq.quantize(m.weight.detach()).to(torch.int8), persistent=False)
            m.register_buffer("weight_scale", wq._broadcast(wq.scale.detach(), m.weight).clone(), persistent=False)
        yield model
    finally:
        for m in layers:
            m._buffers.pop("weight_int8", None)
            m._buffers.pop("weight_scale", None)


def to_openvino(model: nn.Module, example: torch.Tensor):
    """Convert a PyTorch module (float, or calibrated fake-quant with uniform quantizers) to an OpenVINO model with
    a dynamic batch dimension."""
    ov = _ov()
    model.eval()
    with torch.no_grad(), int8_weight_form(model):
        ov_model = ov.convert_model(model, example_input=example[:1])
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
    return ov_model


@functools.cache
def _core():
    """The one OpenVINO Core of the process. Each Core's CPU plugin replaces the calling thread's sigaltstack with
    its own (mmap'ed) stack and, when it is destroyed, restores the one it found and unmaps its own. Cores freed in
    any order but the reverse of their creation leave the thread on an unmapped alternate stack, and the next signal
    with an SA_ONSTACK handler (every Python handler, e.g. the SIGCHLD one torch's DataLoader installs) kills the
    process with SIGSEGV (OpenVINO 2026.4.1). One Core that lives as long as the process installs it once."""
    return _ov().Core()


def compile_openvino(ov_model, threads: int | None, precision: str = "f32"):
    return _core().compile_model(ov_model, "CPU", ov_config(threads, precision))


def fake_quant_ranges(ov_model) -> list[dict]:
    """Every FakeQuantize node of an OpenVINO model: name, levels, input_low / input_high (numpy arrays), and the
    scale ``(high - low) / (levels - 1)`` and zero-point ``-low / scale`` they encode."""
    out = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        low, high = (op.input_value(i).get_node() for i in (1, 2))
        if low.get_type_name() != "Constant" or high.get_type_name() != "Constant":
            continue
        lo, hi = low.get_data().astype(np.float64), high.get_data().astype(np.float64)
        levels = int(op.get_levels())
        scale = (hi - lo) / (levels - 1)
        out.append({"name": op.get_friendly_name(), "levels": levels, "input_low": lo, "input_high": hi,
                    "scale": scale, "zero_point": -lo / scale, "node": op})
    return out


def weight_scales(ov_model) -> dict[str, dict]:
    """Int8 weights of an OpenVINO model in compressed form, Constant(i8) -> Convert -> Multiply(scale):
    {scale constant's name: {"scale": numpy array, "codes": numpy int8 array, "node": the scale Constant}}."""
    out = {}
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "Multiply":
            continue
        a, b = (op.input_value(i).get_node() for i in (0, 1))
        if a.get_type_name() == "Convert" and b.get_type_name() == "Constant":
            src = a.input_value(0).get_node()
            if src.get_type_name() == "Constant" and src.get_element_type().get_type_name() == "i8":
                out[b.get_friendly_name()] = {"scale": b.get_data().copy(), "codes": src.get_data().copy(), "node": b}
    return out


def save_ir(ov_model, directory: str | Path, name: str = "model") -> Path:
    """Save an OpenVINO model as `directory/name.xml` + `.bin` without fp16 compression; the files appear only
    when both are complete (written in a temporary folder beside them, then renamed, .bin first)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    try:
        _ov().save_model(ov_model, str(tmp / f"{name}.xml"), compress_to_fp16=False)
        (tmp / f"{name}.bin").replace(directory / f"{name}.bin")
        (tmp / f"{name}.xml").replace(directory / f"{name}.xml")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory / f"{name}.xml"


@dataclass(eq=False)
class OpenVINORunner:
    """A model compiled by OpenVINO, as a runner: images (B, C, H, W) -> logits (B, num_classes) as torch tensors.

    `float_module`: the float PyTorch model (for parameter and FLOP counts); `sim_module`: the simulated twin
    (vitlab's fake-quant model with the same scales), None for float or NNCF-calibrated graphs; `ov_model`: the
    OpenVINO graph (save it with `save`).
    """

    ov_model: Any
    float_module: nn.Module
    techniques: tuple
    engine: str
    threads: int | None = None
    sim_module: nn.Module | None = None
    precision: str = "f32"     # OpenVINO's INFERENCE_PRECISION_HINT: f32 (int8 / w8 / float) or bf16 (the bf16 technique)
    input_size: tuple[int, int, int] = field(init=False)
    num_classes: int = field(init=False)
    engine_choice: dict | None = field(default=None, init=False)   # engine=auto: how this engine was chosen

    def __post_init__(self):
        self.input_size = model_input_size(self.float_module)
        self.num_classes = int(getattr(self.float_module, "num_classes", 0))
        self.compiled = compile_openvino(self.ov_model, self.threads, self.precision)
        self._request = self.compiled.create_infer_request()

    @property
    def module(self) -> nn.Module:
        """The float module (what `measure` counts FLOPs on and reads preprocessing from)."""
        return self.float_module

    @property
    def quant_mac_fraction(self) -> float | None:
        """Share of the MACs (stem and head excluded) the engine runs quantized: the simulated twin's
        (`vitlab.quant.coverage`); None without a twin (float, bf16, NNCF's own calibration)."""
        return getattr(self.sim_module, "quant_mac_fraction", None)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().contiguous().numpy()
        out = self._request.infer({0: x})
        return torch.from_numpy(np.array(out[self.compiled.output(0)]))

    def save(self, directory: str | Path, name: str = "model") -> Path:
        """Write the OpenVINO IR (`name.xml` / `name.bin`, weights as they are: f32, int8 codes) into `directory`."""
        return save_ir(self.ov_model, directory, name)

    def close(self) -> None:
        """Release the engine: the infer request before the compiled model it belongs to."""
        self._request = None
        self.compiled = None


@dataclass(eq=False)
class OnnxRuntimeRunner:
    """A model run by ONNX Runtime (CPU), as a runner, from an ONNX graph (bytes). For `w8a8:engine=
    onnxruntime` that file is vitlab's simulated twin exported as QuantizeLinear / DequantizeLinear pairs carrying
    vitlab's scales, which ONNX Runtime's graph optimizer fuses into int8 matmuls (MatMulIntegerToFloat)."""

    onnx_model: bytes  # the serialized ONNX graph
    float_module: nn.Module
    techniques: tuple
    engine: str
    threads: int | None = None
    sim_module: nn.Module | None = None
    input_size: tuple[int, int, int] = field(init=False)
    num_classes: int = field(init=False)
    engine_choice: dict | None = field(default=None, init=False)   # engine=auto: how this engine was chosen

    def __post_init__(self):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - in the deploy and test extras
            raise TechniqueError("w8a8:engine=onnxruntime needs ONNX Runtime: pip install onnxruntime==1.32.0 "
                                 "(or vitlab[deploy])") from e
        self.input_size = model_input_size(self.float_module)
        self.num_classes = int(getattr(self.float_module, "num_classes", 0))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        # no busy-waiting between calls: spinning pool threads of idle sessions took the cores from whatever ran
        # next in the same process (engine trials, the Pareto lab's round-robin: ORT int8 read 0.69x torch float
        # there against 1.57x with four runners alive)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # errors only: a token-reduced graph's shrinking token axis is exported as a dynamic dim, and ORT's shape
        # check would warn on every call that the {-1} annotation "does not match" the real (B, N, C)
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(self.onnx_model, opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    @property
    def module(self) -> nn.Module:
        return self.float_module

    @property
    def quant_mac_fraction(self) -> float | None:
        """Share of the MACs (stem and head excluded) the engine runs quantized: the simulated twin's
        (`vitlab.quant.coverage`); None without a twin (float, bf16, NNCF's own calibration)."""
        return getattr(self.sim_module, "quant_mac_fraction", None)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().float().numpy())
        return torch.from_numpy(self._session.run(None, {self._input: x})[0])

    def save(self, directory: str | Path, name: str = "model") -> Path:
        """Write the ONNX graph this runner runs into `directory` as `name.onnx`."""
        path = Path(directory) / f"{name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(self.onnx_model)
        return path

    def close(self) -> None:
        self._session = None


def to_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export `model` (float or simulated-quantized: its fake-quant ops become QuantizeLinear / DequantizeLinear with
    vitlab's scales and zero points) to ONNX with a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")  # tracer / legacy-exporter notices
        torch.onnx.export(model.eval(), (example[:1],), str(tmp), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    return path


def _example(model: nn.Module, calib: list[torch.Tensor] | None) -> torch.Tensor:
    if calib:
        return calib[0][:1]
    return torch.zeros(1, *example_shape(model))


def _ort_runner(sim: nn.Module, float_module: nn.Module, techniques: tuple, threads: int | None,
                example: torch.Tensor) -> "OnnxRuntimeRunner":
    """The calibrated twin exported as QDQ ONNX and run by ONNX Runtime."""
    with tempfile.TemporaryDirectory(prefix="vitlab-ort-") as tmp:
        graph = to_onnx(sim, example, Path(tmp) / "model.onnx").read_bytes()
    return OnnxRuntimeRunner(graph, float_module, techniques, "onnxruntime-int8", threads, sim)


def deploy_w8a8(model: nn.Module, cfg, calib: list[torch.Tensor]):
    """The w8a8 handler: calibrate (vitlab or NNCF), convert, compile; returns an OnnxRuntimeRunner or an
    OpenVINORunner. `engine=auto` builds both from the same calibrated twin and keeps the one that is faster here
    (`vitlab.quant.engine_choice`; the runner's `engine_choice` says how it was chosen)."""
    stack = applied_techniques(model)
    techniques = stack + (cfg,)
    float_module = copy.deepcopy(model).eval()
    example = _example(model, calib)
    if cfg.calibration == "nncf":
        if cfg.engine == "onnxruntime":
            raise TechniqueError("w8a8:engine=onnxruntime runs vitlab's calibration; calibration=nncf is OpenVINO's "
                                 "(use engine=openvino or engine=auto)")
        try:
            import nncf
        except ImportError:
            raise TechniqueError("w8a8:calibration=nncf needs NNCF: pip install nncf==3.4.0 (or vitlab[deploy])") \
                from None
        # NNCF counts its subset in dataset items, here batches of images
        ov_model = nncf.quantize(to_openvino(float_module, example), nncf.Dataset([b.numpy() for b in calib]),
                                 model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
        runner = OpenVINORunner(ov_model, float_module, techniques, "openvino-int8", cfg.threads, None)
        _check_conversion(runner, float_module, calib[0][:16], "w8a8")
        return runner
    model = copy.deepcopy(float_module)   # the calibrated twin: the caller's model stays as it was
    prepare_(model, cfg.ptq(), example=example)
    calibrate(model, calib)
    check = calib[0][:16]
    builders = {
        "onnxruntime": _checked(lambda: _ort_runner(model, float_module, techniques, cfg.threads, example), model,
                                check, "w8a8", twin=True),
        "openvino": _checked(lambda: OpenVINORunner(to_openvino(model, example), float_module, techniques,
                                                    "openvino-int8", cfg.threads, model), model, check, "w8a8",
                             twin=True),
    }
    return _run_builders(builders, cfg, model, tuple(example.shape[1:]), len(calib[0]),
                         " + ".join(format_technique(t) for t in techniques), ("onnxruntime", "openvino"))


def _checked(build, reference: nn.Module, images: torch.Tensor, name: str, twin: bool = False):
    """`build` made into an engine builder: the runner is built and checked against `reference` on `images`
    (`twin`: `reference` is the calibrated twin the engine must reproduce, see `_check_conversion`); an engine that
    cannot convert or run the model raises EngineFailure with its reason (a vitlab user error, e.g. a conversion
    that computes something else, passes through)."""
    def builder():
        try:
            runner = build()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - an engine's own error, whatever its type, means it cannot run this
            text = (str(e).strip().splitlines() or [""])[0][:200]
            raise EngineFailure(f"{type(e).__name__}: {text}") from e
        try:
            _check_conversion(runner, reference, images, name, twin=twin)
        except TechniqueError as e:
            raise EngineFailure(str(e)) from None
        except Exception as e:  # noqa: BLE001 - the converted graph fails when it runs
            runner.close()
            text = (str(e).strip().splitlines() or [""])[0][:200]
            raise EngineFailure(f"{type(e).__name__}: {text}") from e
        return runner

    return builder


def _run_builders(builders: dict, cfg, model: nn.Module, input_shape: tuple, default_batch: int, stack: str,
                  engines: tuple, kind: str = "int8"):
    """Build the named engine, or for engine=auto the fastest installed one (`choose_engine`); an engine that
    cannot run the model ends in TechniqueNotApplicable naming the engine and its reason."""
    try:
        if cfg.engine != "auto":
            return builders[cfg.engine]()
        installed = installed_engines(engines)
        runner, choice = choose_engine({e: builders[e] for e in installed}, model, input_shape,
                                       threads=int(cfg.threads or torch.get_num_threads()),
                                       default_batch=default_batch, kind=kind, extra=stack)
    except EngineFailure as e:
        engine = "" if cfg.engine == "auto" else f"{cfg.engine} "
        raise TechniqueNotApplicable(format_technique(cfg), model, f"the {engine}engine cannot run it ({e})") from None
    runner.engine_choice = choice.to_dict()
    return runner


# How far an int8 engine may be from the calibrated twin it runs (relative L2 error of the logits). Both compute
# the same integer products with the same scales; only rounding ties and summation order differ: at most 0.018
# over the 40 seed backbones on OpenVINO and ONNX Runtime (Xeon with AMX). Engine kernels that compute something
# else sit far above it: OpenVINO 2026.4's AMX int8 kernel for 32-channel 8x8/stride-8 convolutions (SOFT's
# landmark pooling, 0.19) and its int8 graphs of PoolFormer (all-zero logits), EfficientViT-M, ViTamin, Next-ViT
# and FMViT (0.25-0.49, on VNNI too) while ONNX Runtime matches the twin on all of them.
TWIN_TOLERANCE = 0.05


def _check_conversion(runner: OpenVINORunner, reference: nn.Module, images: torch.Tensor, name: str,
                      twin: bool = False) -> None:
    """Refuse a converted graph that does not compute what the PyTorch model does on a few calibration images.

    `twin=True` (`reference` is the calibrated fake-quant twin the engine runs): non-finite outputs or a relative
    logit error above `TWIN_TOLERANCE`. Otherwise (`reference` is the float model: NNCF's own calibration, bf16):
    non-finite outputs, or top-1 disagreeing on more than one image in 8 while the logits are also far apart
    (relative L2 error above 0.25; a model with near-tied logits, e.g. random weights, may flip top-1 under int8
    noise alone, which is not a broken conversion)."""
    with torch.no_grad():
        expected = reference(images)
    got = runner(images)
    agree = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    rel = ((got - expected).norm() / expected.norm().clamp(min=1e-12)).item()
    finite = bool(torch.isfinite(got).all())
    bad = rel > TWIN_TOLERANCE if twin else (agree < 0.875 and rel > 0.25)
    if not finite or bad:
        runner.close()
        stack = " + ".join(type(t).__name__ for t in runner.techniques)
        if twin:
            raise TechniqueError(
                f"{name}: {runner.engine} computes something else than the calibrated model it was given ({stack}; "
                f"finite: {finite}, relative logit error {rel:.2f} against the simulated twin, above "
                f"{TWIN_TOLERANCE}, top-1 agreement {agree:.0%} on {len(images)} calibration images; CPU flags: "
                f"{cpu_flags_text()}): an engine kernel for this model and CPU is wrong; use the other engine "
                "(engine=auto picks one that agrees) or ptq (simulated)")
        raise TechniqueError(
            f"{name}: the engine's conversion of this model ({stack}) does not reproduce the PyTorch model "
            f"(finite: {finite}, top-1 agreement {agree:.0%}, relative logit error "
            f"{rel:.2f} on {len(images)} calibration images): apply w8a8 without the other techniques of this "
            "stack, or use ptq (simulated)")


def deploy_w8(model: nn.Module, cfg) -> OpenVINORunner:
    """The w8 handler: int8 weights with vitlab's per-channel symmetric min-max scales (computed from the weights,
    no images needed), f32 activations; OpenVINO runs the compressed-weight form."""
    try:
        model_input_size(model)
    except ValueError as e:   # no calibration images to take the size from: the model must know it
        raise TechniqueNotApplicable(format_technique(cfg), model, f"{e}; w8 exports at the model's configured input "
                                     "size: it supports models that know it (timm's pretrained_cfg input_size or "
                                     "patch_embed.img_size)") from None
    stack = applied_techniques(model)
    float_module = copy.deepcopy(model).eval()
    model = copy.deepcopy(float_module)   # the weight-quantized twin: the caller's model stays as it was
    prepare_(model, cfg.ptq())
    for _, m in quant_layers(model):
        m.weight_quant.observe(m.weight)
        m.weight_quant.finalize()
        m.weight_quant.set_mode("quant")
    ov_model = to_openvino(model, _example(model, None))
    runner = OpenVINORunner(ov_model, float_module, stack + (cfg,), "openvino-w8", cfg.threads, model)
    _check_conversion(runner, model, torch.randn(8, *example_shape(model), generator=torch.Generator().manual_seed(0)),
                      "w8", twin=True)
    return runner


def deploy_bf16(model: nn.Module, cfg):
    """The bf16 handler: refuse a CPU without native bf16; else a torch autocast runner or an OpenVINO bf16 runner
    (`engine=auto`: the faster here, `vitlab.quant.engine_choice`)."""
    if not isinstance(model, nn.Module):
        raise TechniqueError(f"bf16 deploys a PyTorch model; got {type(model).__name__} (apply bf16 instead of, not "
                             "after, another deployment)")
    if not has_bf16():
        raise TechniqueError(
            f"bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX); this one ({cpu_name()}: "
            f"{cpu_flags_text() or 'no AVX2'}) would emulate it, slower than f32: use w8a8 (real int8) or no "
            "quantization here")
    stack = applied_techniques(model)
    techniques = stack + (cfg,)
    model.eval()
    float_module = copy.deepcopy(model)

    def torch_runner():
        module = copy.deepcopy(float_module)
        update_record(module, techniques=techniques)
        return TorchRunner(module, dtype="bf16", engine="torch-bf16")

    check = torch.randn(8, *example_shape(float_module), generator=torch.Generator().manual_seed(0))
    builders = {
        "torch": _checked(torch_runner, float_module, check, "bf16"),
        "openvino": _checked(lambda: OpenVINORunner(to_openvino(float_module, check), float_module, techniques,
                                                    "openvino-bf16", cfg.threads, None, precision="bf16"),
                             float_module, check, "bf16"),
    }
    return _run_builders(builders, cfg, float_module, example_shape(float_module), 32,
                         " + ".join(format_technique(t) for t in techniques), ("torch", "openvino"), kind="bf16")
