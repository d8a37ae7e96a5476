"""The quantization techniques' configs: `ptq` (simulated fake-quant at any bit width), `w8a8` and `w8` (int8 on a
real CPU engine) and `bf16`; frozen dataclasses registered with `vitlab.techniques`, their handlers in
`vitlab.quant.handlers`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..techniques import Kind, register_technique
from .base import QUANTIZERS, UniformQuantizer, get_quantizer_class, quantizer_names

__all__ = ["PTQ", "RepQ", "W8A8", "W8", "BF16"]


def _check_bits(name: str, value: int) -> None:
    if not isinstance(value, int) or not 2 <= value <= 16:
        raise ValueError(f"{name}={value!r} must be a bit width in 2..16")


@register_technique("ptq", Kind.QUANTIZATION, needs_calibration=True)
@dataclass(frozen=True)
class PTQ:
    """Simulated post-training quantization (fake-quant) at any bit width; the model stays a PyTorch module.

    `w`/`a`: weight / activation bits. `quantizer`: a uniform one (minmax, percentile, mse) is used at every
    activation site; a log-domain one (log2, adalog, twin: vitlab.quant.logquant / twin) at the post-softmax
    ("attn_prob") and post-GELU sites, with `act_quantizer` (uniform) elsewhere. Weights: uniform, symmetric, per
    output channel, `weight_quantizer` (minmax or mse). `attn`: quantize both attention matmuls (QK^T and
    softmax·V); `post_gelu`: use `quantizer` for the input of fc2; `per_token`: Linear inputs get one scale per
    token (static, so the token count must not change). `bits`: MPTQ mixed precision under this average bit budget
    (vitlab.quant.mptq); `smooth`: MPTQ's SmoothQuant-with-bias before calibration; `repq`: RepQ-ViT's
    post-LayerNorm scale reparameterization before calibration (vitlab.quant.repq; the paper's full recipe is
    `repq=true,quantizer=logsqrt2,post_gelu=false`). `objective`: what AdaLog's
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
    repq: bool = False
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
        if self.repq and self.smooth:
            raise ValueError("repq=true and smooth=true both rescale the LayerNorm -> Linear pairs; choose one "
                             "(repq: RepQ-ViT, smooth: MPTQ's SQ-b)")
        if self.bits is not None and not 2.0 <= self.bits <= 16.0:
            raise ValueError(f"bits={self.bits} (average bit budget) must be in 2..16")


@register_technique("repq", Kind.QUANTIZATION, needs_calibration=True)
@dataclass(frozen=True)
class RepQ:
    """RepQ-ViT (Li et al., ICCV 2023), simulated: post-LayerNorm activations calibrated per channel and
    reparameterized into the LayerNorm and the next Linear so one per-tensor scale serves them
    (vitlab.quant.repq), log-sqrt(2) post-softmax quantization, uniform elsewhere (post-GELU included); weights
    per output channel. The same as `ptq:w=W,a=A,repq=true,quantizer=logsqrt2,post_gelu=false`."""

    w: int = 4
    a: int = 4
    attn: bool = True

    def __post_init__(self):
        self.ptq()                      # validates the bit widths

    def ptq(self) -> PTQ:
        """The PTQ config this runs."""
        return PTQ(w=self.w, a=self.a, quantizer="logsqrt2", post_gelu=False, attn=self.attn, repq=True)


@register_technique("w8a8", Kind.QUANTIZATION, needs_calibration=True, deploys=True)
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

@register_technique("w8", Kind.QUANTIZATION, deploys=True)
@dataclass(frozen=True)
class W8:
    """Weight-only int8 on a CPU engine (per-output-channel symmetric weights, activations in f32); a runner."""

    engine: Literal["openvino"] = "openvino"
    threads: int | None = None
    needs_calibration: ClassVar[bool] = False   # scales come from the weights alone

    def ptq(self) -> PTQ:
        """The simulated twin's config (only its weight quantizers are switched on)."""
        return PTQ(w=8, a=8, quantizer="minmax", attn=False, post_gelu=False, act_quantizer="minmax")


@register_technique("bf16", Kind.QUANTIZATION, reapply_on_load=True, deploys=True)
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
