"""Post-training quantization of ViTs: simulated low-bit PTQ and real int8 deployment.

Two steps (the library form)::

    from vitlab.quant import PTQ
    vitlab.quantize_(model, PTQ(w=6, a=6, quantizer="percentile"))   # quantizers at every site, mode "off"
    vitlab.calibrate(model, calib_batches, num_images=256)           # observe, finalize, switch to "quant"

or one (the technique form, as `--apply` does)::

    model = vitlab.apply_(model, PTQ(w=4, a=4, quantizer="adalog"), calib=calib_batches)
    runner = vitlab.apply_(model, W8A8(), calib=calib_batches)       # real int8 (ONNX Runtime or OpenVINO): a runner

`calib` is a list of preprocessed image batches (`vitlab.bench.measure.calibration_batches` takes a seeded subset
of a train / val split; the test split is refused). Configs are registered techniques of kind quantization:
`ptq` (simulated, any bit width; the model stays a PyTorch module), `w8a8` (weights and activations in int8 on a
real engine; returns a runner) and `w8` (weight-only int8 on the engine).

Order inside the `ptq` handler: wrap (quantizers off) -> `smooth` (vitlab.quant.mptq.smooth_, before any
observation) -> calibrate -> `bits` (vitlab.quant.mptq.allocate_bits, on the calibrated model; it changes bit
widths with set_bits and re-finalizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal

import torch
import torch.nn as nn

from ..techniques import Kind, TechniqueError, register_handler, register_technique
from .base import (QUANTIZERS, MSEQuantizer, MinMaxQuantizer, PercentileQuantizer, Quantizer, QuantizerError,
                   UniformQuantizer, get_quantizer_class, make_quantizer, quantizer_names, register_quantizer)
from .coverage import settle_
from .sim import (QuantAttention, QuantAttentionOps, QuantConv2d, QuantLinear, QuantWindowAttention,
                  QuantWindowAttentionV2, is_quantized, quant_layers, quant_linears, quantizers, set_quant_mode,
                  wrap_model)


def save_quantized(model_or_runner, directory, **checkpoint_kwargs):
    """See `vitlab.quant.export.save_quantized`: a calibrated model or deployed runner -> a reloadable folder."""
    from .export import save_quantized as _save

    return _save(model_or_runner, directory, **checkpoint_kwargs)


def load_quantized(directory, **kwargs):
    """See `vitlab.quant.export.load_quantized` (`vitlab.create_model(DIR)` calls it for quantized folders)."""
    from .export import load_quantized as _load

    return _load(directory, **kwargs)

__all__ = [
    "PTQ", "W8A8", "W8", "BF16", "calibrate", "quantize_", "Quantizer", "UniformQuantizer", "MinMaxQuantizer",
    "PercentileQuantizer", "MSEQuantizer", "QUANTIZERS", "register_quantizer", "make_quantizer", "quantizer_names",
    "QuantizerError", "QuantLinear", "QuantConv2d", "QuantAttention", "QuantWindowAttention", "QuantWindowAttentionV2",
    "QuantAttentionOps", "quantizers", "quant_layers", "set_quant_mode", "is_quantized", "CalibrationError",
    "save_quantized", "load_quantized", "quant_mac_fraction_of",
]


def quant_mac_fraction_of(model_or_runner) -> float | None:
    """The `quant_mac_fraction` of a quantized model or deployed runner (MACs run by quantized ops over all MACs,
    stem and head excluded; `vitlab.quant.coverage`); None when it was not quantized by vitlab's sites (float,
    bf16, NNCF's own calibration)."""
    runner = model_or_runner
    for obj in (runner, getattr(runner, "sim_module", None), getattr(runner, "module", None)):
        if getattr(obj, "quant_mac_fraction", None) is not None:
            return float(obj.quant_mac_fraction)
    return None


class CalibrationError(TechniqueError):
    """Calibration that cannot run (no images, a quantizer that saw nothing); the message says what to pass."""


def _check_bits(name: str, value: int) -> None:
    if not isinstance(value, int) or not 2 <= value <= 16:
        raise ValueError(f"{name}={value!r} must be a bit width in 2..16")


@register_technique("ptq", Kind.QUANTIZATION)
@dataclass(frozen=True)
class PTQ:
    """Simulated post-training quantization (fake-quant) at any bit width; the model stays a PyTorch module.

    `w`/`a`: weight / activation bits. `quantizer`: a uniform one (minmax, percentile, mse) is used at every
    activation site; a log-domain one (log2, adalog, twin: vitlab.quant.logquant / twin) at the post-softmax
    ("attn_prob") and post-GELU sites, with `act_quantizer` (uniform) elsewhere. Weights: uniform, symmetric, per
    output channel, `weight_quantizer` (minmax or mse). `attn`: quantize both attention matmuls (QK^T and
    softmax·V); `post_gelu`: use `quantizer` for the input of fc2; `per_token`: Linear inputs get one scale per
    token (static, so the token count must not change). `bits`: MPTQ mixed precision under this average bit budget
    (vitlab.quant.mptq); `smooth`: MPTQ's SmoothQuant-with-bias before calibration. `objective`: what AdaLog's
    searches minimize, "output" (the paper's: the error of softmax·V / of fc2's output) or "self" (the quantized
    values' own error); other quantizers ignore it. `qkv_symmetric`: q, k and v on a symmetric grid (w8a8's twin sets
    it: OpenVINO runs the attention matmuls in int8 only with symmetric q / k).
    """

    w: int = 8
    a: int = 8
    quantizer: str = "minmax"
    attn: bool = True
    post_gelu: bool = True
    per_token: bool = False
    bits: float | None = None
    smooth: bool = False
    weight_quantizer: str = "minmax"
    act_quantizer: str = "mse"
    objective: Literal["output", "self"] = "output"
    qkv_symmetric: bool = False

    def __post_init__(self):
        if self.objective not in ("output", "self"):
            raise ValueError(f"objective={self.objective!r} must be 'output' (AdaLog's search scores candidates on "
                             "softmax·V / fc2's output, the paper's) or 'self' (the quantized values' own MSE)")
        _check_bits("w", self.w)
        _check_bits("a", self.a)
        names = quantizer_names()
        for field in ("quantizer", "weight_quantizer", "act_quantizer"):
            if getattr(self, field).lower() not in names:
                raise ValueError(f"{field}={getattr(self, field)!r} is not a quantizer; available: {', '.join(names)}")
        for field in ("weight_quantizer", "act_quantizer"):
            if not get_quantizer_class(getattr(self, field)).all_sites:
                raise ValueError(f"{field}={getattr(self, field)!r} must be uniform (minmax, percentile or mse)")
        if self.bits is not None and not 2.0 <= self.bits <= 16.0:
            raise ValueError(f"bits={self.bits} (average bit budget) must be in 2..16")


@register_technique("w8a8", Kind.QUANTIZATION)
@dataclass(frozen=True)
class W8A8:
    """Real int8 inference of weights and activations on a CPU engine; the result is a runner, not a module.

    `calibration="vitlab"`: vitlab's calibration (uniform `quantizer`, default percentile) decides every scale and
    the engine runs exactly those (FakeQuantize nodes carrying vitlab's ranges; the int8 kernels come from the
    engine's low-precision transformations). `calibration="nncf"`: NNCF's own default int8 calibration
    (`nncf.quantize(..., model_type=TRANSFORMER)`), for comparison. `attn`: also quantize the attention matmuls.
    `threads`: the engine's thread count (default: torch's). Inference precision is set to f32 explicitly
    (OpenVINO would otherwise use bf16 on CPUs that have it).

    `engine="onnxruntime"`: the twin is exported to ONNX, its fake quantizers as QuantizeLinear / DequantizeLinear
    with vitlab's scales, and ONNX Runtime fuses them into int8 matmuls (MatMulIntegerToFloat); both engines compute
    the same int8 model. `engine="auto"` (default): both are built from the same calibrated twin and timed on this
    machine at the caller's batch and threads, and the faster is kept (`vitlab.quant.engine_choice`: cached per CPU,
    model, batch and threads; `--engine-trial off` uses the ISA rule instead: OpenVINO with VNNI/AMX, else ONNX
    Runtime). `calibration="nncf"` runs on OpenVINO. Name `engine=openvino` for an OpenVINO IR
    (`vitlab export --format openvino`).
    """

    engine: Literal["auto", "openvino", "onnxruntime"] = "auto"
    calibration: Literal["vitlab", "nncf"] = "vitlab"
    quantizer: str = "percentile"
    attn: bool = True
    threads: int | None = None

    def __post_init__(self):
        if self.quantizer.lower() not in QUANTIZERS or not QUANTIZERS[self.quantizer.lower()].all_sites:
            raise ValueError(f"quantizer={self.quantizer!r}: int8 engines run uniform quantizers; use one of "
                             f"{', '.join(UniformQuantizer.METHODS)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")

    def ptq(self) -> PTQ:
        """The simulated twin's config: what the engine computes, in PyTorch."""
        # q, k, v symmetric: with asymmetric q / k OpenVINO left 4 of deit_small's 12 attention blocks in f32
        # (measured 1.15x slower than all-int8 attention there); the twin is the same for both engines
        return PTQ(w=8, a=8, quantizer=self.quantizer, attn=self.attn, post_gelu=True, act_quantizer=self.quantizer,
                   qkv_symmetric=True)

@register_technique("w8", Kind.QUANTIZATION)
@dataclass(frozen=True)
class W8:
    """Weight-only int8 on a CPU engine (per-output-channel symmetric weights, activations in f32); a runner."""

    engine: Literal["openvino"] = "openvino"
    threads: int | None = None
    needs_calibration: ClassVar[bool] = False   # scales come from the weights alone

    def ptq(self) -> PTQ:
        """The simulated twin's config (only its weight quantizers are switched on)."""
        return PTQ(w=8, a=8, quantizer="minmax", attn=False, post_gelu=False, act_quantizer="minmax")


@register_technique("bf16", Kind.QUANTIZATION, reapply_on_load=True)
@dataclass(frozen=True)
class BF16:
    """bf16 inference on a CPU with native bf16 (AVX512_BF16 or AMX); weights and activations in bfloat16.

    `engine="torch"`: PyTorch with bf16 autocast (oneDNN's bf16 matmuls; softmax, LayerNorm and the output in
    f32); `engine="openvino"`: OpenVINO with `INFERENCE_PRECISION_HINT=bf16`; `engine="auto"` (default): both are
    built and timed here at the caller's batch and threads, the faster kept (`vitlab.quant.engine_choice`; trial off:
    OpenVINO). Refused on CPUs without native bf16, where bf16 is emulated and slower than f32. Needs no
    calibration; a checkpoint saved with it keeps the float weights and re-deploys bf16 when it loads.
    """

    engine: Literal["auto", "torch", "openvino"] = "auto"
    threads: int | None = None
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")


# ----------------------------------------------------------------------------------------------- verbs

def quantize_(model: nn.Module, cfg: PTQ | None = None, *, example: torch.Tensor | None = None) -> nn.Module:
    """Put fake quantizers at every site `cfg` (default `PTQ()`) asks for, in place, in mode "off" (the model
    still computes exactly what it did); then `calibrate` it. Returns the model, with `model.quant_mac_fraction`
    (the share of its MACs, stem and head excluded, that quantized ops run: `vitlab.quant.coverage`), counted on
    `example` (one image batch; default: zeros of the model's input size)."""
    cfg = PTQ() if cfg is None else cfg
    if not isinstance(cfg, PTQ):
        raise TechniqueError(f"quantize_ takes a PTQ config, got {type(cfg).__name__}; deploy with "
                             "vitlab.apply_(model, W8A8(), calib=...)")
    wrap_model(model, cfg)
    settle_(model, example)
    model.vitlab_quant_config = cfg
    return model


def _batches(loader_or_batches: Any) -> Iterable[torch.Tensor]:
    for item in loader_or_batches:
        if isinstance(item, (list, tuple)):  # (images, labels) from a DataLoader
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise CalibrationError(f"calibration batches must be image tensors (B, C, H, W), got {type(item).__name__}")
        yield item


@torch.no_grad()
def calibrate(model: nn.Module, loader_or_batches: Any, num_images: int | None = None) -> nn.Module:
    """Calibrate a `quantize_`d model: observe activations on up to `num_images` images (all, by default),
    compute every quantizer's parameters (weights from the weights themselves) and switch them to "quant".

    Refuses a model without quantizers, an empty image source, and a quantizer that observed nothing.
    """
    if not is_quantized(model):
        raise CalibrationError("calibrate: the model has no quantizers; call vitlab.quantize_(model, PTQ(...)) first")
    if loader_or_batches is None:
        raise CalibrationError("calibration needs images: pass --data SPEC (calibration images come from its "
                               "--calib-split, default train) or calib=[image batches]")
    weight_quants = {id(m.weight_quant) for _, m in quant_layers(model)}
    was_training = model.training
    model.eval()
    for _, q in quantizers(model):
        q.reset_observations()
    set_quant_mode(model, "observe", weights=False)
    for _, m in quant_layers(model):
        m.weight_quant.mode = "off"
    seen = 0
    try:
        for batch in _batches(loader_or_batches):
            if num_images is not None:
                batch = batch[: max(0, num_images - seen)]
            if len(batch) == 0:
                break
            model(batch)
            seen += len(batch)
    finally:
        for _, q in quantizers(model):
            q.mode = "off"
        model.train(was_training)
    if seen == 0:
        raise CalibrationError("calibration saw no images: the calibration data is empty (pass --calib-images >= 1)")
    for name, m in quant_layers(model):
        m.weight_quant.observe(m.weight)
    named = list(quantizers(model))
    for name, q in named:
        if q.num_observed == 0:
            where = "weight" if id(q) in weight_quants else "activation"
            raise CalibrationError(f"quantizer {name} ({where}) observed nothing during calibration on {seen} images: "
                                   "that part of the model never ran")
    # quantizers whose search reads another quantizer (AdaLog's output objective reads V's / the weight's) go last
    for name, q in sorted(named, key=lambda item: bool(getattr(item[1], "finalize_last", False))):
        q.finalize()
    set_quant_mode(model, "quant")
    model.vitlab_calibration = {"images": seen}
    return model


# ----------------------------------------------------------------------------------------------- handlers

def _require_calib(cfg: Any, calib: Any) -> None:
    if calib is None:
        from ..techniques import format_technique

        raise CalibrationError(f"{format_technique(cfg)} calibrates on images: pass --data SPEC (calibration images, "
                               "from --calib-split train or val) or apply_(..., calib=[image batches])")


def _mptq():
    try:
        from . import mptq
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.mptq":
            raise
        raise TechniqueError("ptq: bits= (mixed precision) and smooth= need vitlab.quant.mptq, which this vitlab "
                             "does not have") from None
    return mptq


def _named(cfg):
    """Re-raise a refusal from the shared quantization machinery under this technique's own name."""
    import contextlib

    from ..techniques import TechniqueNotApplicable, format_technique

    @contextlib.contextmanager
    def ctx():
        try:
            yield
        except TechniqueNotApplicable as e:
            name = format_technique(cfg)
            if str(e).startswith(name):
                raise
            raise TechniqueNotApplicable(name, e.model_class, e.why) from None

    return ctx()


def _refuse_dynamic(model: Any, cfg) -> None:
    """A model whose graph changes per input (`dynamic_graph`: why) is refused by name: calibration and tracing see
    one graph."""
    why = getattr(model, "dynamic_graph", None)
    if why:
        from ..techniques import TechniqueNotApplicable, format_technique

        raise TechniqueNotApplicable(format_technique(cfg), model, f"{why}; quantization supports models with one "
                                     "static graph")


def _dense(model: Any) -> bool:
    """Whether `model` is a dense-prediction model (its forward returns a dict: vitlab.dense)."""
    return isinstance(model, nn.Module) and getattr(model, "vitlab_dense", None) is not None


@register_handler(PTQ)
def _apply_ptq(model: nn.Module, cfg: PTQ, calib=None) -> nn.Module:
    _refuse_dynamic(model, cfg)
    _require_calib(cfg, calib)
    calib = list(calib)
    with _named(cfg):
        quantize_(model, cfg, example=calib[0][:1])
    if cfg.smooth:
        _mptq().smooth_(model, calib, cfg)
    calibrate(model, calib)
    if cfg.bits is not None:
        _mptq().allocate_bits(model, calib, cfg)
    return model


@register_handler(W8A8)
def _apply_w8a8(model: nn.Module, cfg: W8A8, calib=None):
    _require_calib(cfg, calib)
    from .deploy import deploy_w8a8

    _refuse_dynamic(model, cfg)
    with _named(cfg):
        if _dense(model):   # dict outputs: exported flat, the dict rebuilt (vitlab.dense.apply)
            from ..dense.apply import deploy_dense

            return deploy_dense(model, lambda flat: deploy_w8a8(flat, cfg, list(calib)), list(calib)[0])
        return deploy_w8a8(model, cfg, list(calib))


@register_handler(W8)
def _apply_w8(model: nn.Module, cfg: W8, calib=None):
    from .deploy import deploy_w8

    _refuse_dynamic(model, cfg)
    with _named(cfg):
        if _dense(model):   # dict outputs: exported flat, the dict rebuilt (vitlab.dense.apply)
            from ..dense.apply import deploy_dense
            from ..runner import example_shape

            return deploy_dense(model, lambda flat: deploy_w8(flat, cfg), torch.zeros(1, *example_shape(model)))
        return deploy_w8(model, cfg)


@register_handler(BF16)
def _apply_bf16(model: nn.Module, cfg: BF16):
    from .deploy import deploy_bf16

    _refuse_dynamic(model, cfg)
    if _dense(model):   # dict outputs: exported flat, the dict rebuilt (vitlab.dense.apply)
        from ..dense.apply import deploy_dense
        from ..runner import example_shape

        return deploy_dense(model, lambda flat: deploy_bf16(flat, cfg), torch.zeros(1, *example_shape(model)))
    return deploy_bf16(model, cfg)


from . import qhyvit as _qhyvit  # noqa: E402,F401  (registers the `qhyvit` technique: Q-HyViT for hybrid ViTs)
from . import shiftadd as _shiftadd  # noqa: E402,F401  (registers `shiftadd`: ShiftAddViT's shift / add reparameterization)
