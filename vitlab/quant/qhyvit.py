"""Q-HyViT: post-training quantization of hybrid (conv + attention) ViTs with bridge-block reconstruction.

Lee et al., "Q-HyViT: Post-Training Quantization of Hybrid Vision Transformers with Bridge Block Reconstruction for
IoT Systems" (arXiv 2303.12557; code announced at gitlab.com/ones-ai/q-hyvit, which holds no code that could be
read). Neither the code nor the paper's full text was available to this implementation: it follows the method as
the paper's abstract and vitlab's seed catalog state it, and says below where it had to choose.

The paper names four problems of hybrid ViTs under PTQ (highly dynamic activation ranges, zero-point overflow in
the bridge blocks, mixed normalizations, very small models) and answers them with *hybrid reconstruction error
minimization*: per layer, the quantization scheme and granularity are whatever reconstructs best on the
calibration batch, and the *bridge blocks* (where the model turns from convolutions to attention) are reconstructed
as a whole. Here (`QHyViT`, `--apply qhyvit:bits=6`):

1. Sites: the same as `ptq` (every Linear / Conv2d outside stem and head, every attention matmul: `vitlab.quant.sim`,
   so `quant_mac_fraction` is ptq's). Weights: symmetric, per output channel, the MSE-best clipping per channel
   (convolutions through `QuantConv2d`, whatever their groups). All activation quantizers start as plain min-max.
2. Scheme choice (`choose_scheme`): for every activation quantizer, candidates are uniform asymmetric, uniform
   symmetric and log2, per tensor or per channel (channel axis 1 of an NCHW conv input, the feature axis of a Linear
   input; attention-matmul operands are per tensor, their shapes change with windows), each with a grid of
   clipping ratios. A Linear / Conv2d input is scored by the MSE of that layer's output (quantized input x quantized
   weight against the float layer), the paper's layer reconstruction error; an attention-matmul operand by the MSE
   of its own values (its partner operand is not at hand). The best candidate is installed.
3. Bridge blocks (`bridge_blocks`, from `vitlab.contract`, no class names): an attention block whose input is an
   NCHW feature map (the block turns the map into tokens itself: Next-ViT's NTB, EfficientViT-M, UniFormer) or
   whose previous block mixes without attention (EfficientFormer's first Meta3D after the Meta4D blocks, TinyViT's
   first window-attention block after MBConv). A model without one (plain ViT, Swin, PVT: no conv-to-transformer
   change; ConvNeXt, PoolFormer: no attention) is refused: `ptq` serves it.
4. Bridge-block reconstruction (`reconstruct_block_`): the block's input is taken from the quantized model (so the
   block compensates the error of everything before it), its target is the float model's block output; every
   activation quantizer in the block is re-chosen among its `topk` best candidates from step 2 by coordinate
   descent on the block-output MSE (`rounds` passes). If the result is worse than the block with plain min-max
   quantizers, min-max is kept, so reconstruction never raises the block's output error.
5. Zero-point overflow: an asymmetric range that excludes 0 (a one-sided bridge activation: post-BN / post-ReLU
   maps) would put the zero point outside the integer grid. vitlab's uniform quantizer widens the range to contain 0
   (zero point clamped into the grid, 0 exact); the symmetric candidate is the other way out, and the scores of
   step 2 / 4 choose between them. `zero_point_overflow` counts the channels where it would have happened
   (`model.qhyvit_report`).

Choices not from the paper: MSE instead of a Hessian-weighted objective (PTQ4ViT's), a shared clipping-ratio grid per
candidate, and the min-max fallback of step 4. The result is a simulated (fake-quant) PyTorch module like `ptq`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import PTQ, calibrate, prepare_
from ..contract import ATTENTION_KINDS, describe
from ..record import update_record
from ..techniques import Kind, TechniqueNotApplicable, format_technique, register_handler, register_technique
from .base import MinMaxQuantizer, Quantizer
from .handlers import _named, _require_calib
from .logquant import Log2Quantizer, log2_quantize
from .sim import QuantConv2d, QuantLinear, quant_layers, quantizers

__all__ = ["QHyViT", "Candidate", "candidates_for", "choose_scheme", "bridge_blocks", "zero_point_overflow",
           "reconstruct_block_", "SCHEMES", "RATIOS"]

SCHEMES = ("uniform", "uniform_sym", "log2")
RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)      # clipping ratios of the uniform candidates' min / max
LOG2_RATIOS = (1.0, 2 ** -0.25, 2 ** -0.5, 2 ** -0.75)  # log2 scales: the max times these (one octave)


@register_technique("qhyvit", Kind.QUANTIZATION, needs_calibration=True)
@dataclass(frozen=True)
class QHyViT:
    """Q-HyViT (Lee et al.): per-layer scheme (uniform asymmetric / symmetric / log2) and granularity (per tensor /
    per channel) chosen by reconstruction error, and the bridge blocks (conv -> attention) reconstructed as a whole.

    `bits`: weight and activation bits (sets `w_bits` and `a_bits`). `search_images`: calibration images the
    searches run on (the first ones). `reconstruct`: bridge-block reconstruction (off: scheme choice only).
    `topk`: candidates per quantizer the block reconstruction chooses among; `rounds`: its coordinate-descent passes.
    """

    bits: int | None = None
    w_bits: int = 8
    a_bits: int = 8
    search_images: int = 32
    reconstruct: bool = True
    topk: int = 6
    rounds: int = 2

    def __post_init__(self):
        for name in ("bits", "w_bits", "a_bits"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 2 <= value <= 16):
                raise ValueError(f"{name}={value!r} must be a bit width in 2..16")
        if self.search_images < 1 or self.topk < 1 or self.rounds < 1:
            raise ValueError(f"search_images={self.search_images}, topk={self.topk} and rounds={self.rounds} "
                             "must all be >= 1")

    @property
    def w(self) -> int:
        return self.w_bits if self.bits is None else self.bits

    @property
    def a(self) -> int:
        return self.a_bits if self.bits is None else self.bits


# ----------------------------------------------------------------------------------------------- candidates

@dataclass(frozen=True)
class Candidate:
    """One way to quantize an activation: `scheme` (SCHEMES), `axis` (None: per tensor; else the channel axis) and
    the clipping `ratio` (uniform: of the observed min / max; log2: of the max, as the top level)."""

    scheme: str
    axis: int | None
    ratio: float


def candidates_for(axis: int | None) -> list[Candidate]:
    """Every candidate of step 2: uniform (asymmetric, symmetric) x RATIOS x (per tensor, and per channel along
    `axis` when given), and log2 per tensor x LOG2_RATIOS."""
    axes = (None,) if axis is None else (None, axis)
    out = [Candidate(s, a, r) for s in ("uniform", "uniform_sym") for a in axes for r in RATIOS]
    return out + [Candidate("log2", None, r) for r in LOG2_RATIOS]


def _range(x: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    """(min, max) of x per tensor (scalars) or per channel along `axis` ((C,))."""
    if axis is None:
        return x.min(), x.max()
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)                           # (C, n)
    return flat.amin(dim=1), flat.amax(dim=1)


def build_quantizer(c: Candidate, x: Tensor, bits: int, site: str | None = None) -> Quantizer:
    """The calibrated quantizer (mode "quant") that candidate `c` makes of activations `x`: a MinMaxQuantizer with the
    clipped range (unsigned grid; symmetric: zero point at its centre) or a Log2Quantizer (input shifted by -min
    when x has negative values, as vitlab's log2 does away from post-softmax)."""
    lo, hi = _range(x.float(), c.axis)
    if c.scheme == "log2":
        q = Log2Quantizer(bits, signed=False, site=site)
        shift = max(0.0, -float(lo))
        q.shift = torch.tensor(shift)
        q.scale = torch.tensor(max(float(hi) + shift, 1e-8) * c.ratio)
    else:
        q = MinMaxQuantizer(bits, signed=False, channel_axis=c.axis, symmetric=c.scheme == "uniform_sym", site=site)
        q.scale, q.zero_point = q.params_for_range(lo * c.ratio, hi * c.ratio)
    q.min_val, q.max_val = lo.clone(), hi.clone()
    q.num_observed, q.calibrated, q.mode = x.numel(), True, "quant"
    q.qhyvit_candidate = c
    return q


def fake_quant(c: Candidate, x: Tensor, bits: int) -> Tensor:
    """x quantized-dequantized by candidate `c` (calibrated on x itself)."""
    if c.scheme == "log2":
        lo, hi = _range(x, None)
        shift = max(0.0, -float(lo))
        return log2_quantize(x + shift, max(float(hi) + shift, 1e-8) * c.ratio, bits) - shift
    return build_quantizer(c, x, bits).fake_quant(x)


def choose_scheme(x: Tensor, bits: int, *, axis: int | None = None,
                  consumer: Callable[[Tensor], Tensor] | None = None) -> list[tuple[float, Candidate]]:
    """Step 2: every candidate (`candidates_for(axis)`) scored on `x`, best first, as (error, candidate).

    The error is the MSE of `consumer(quantized x)` against `consumer(x)` (the paper's reconstruction error of the
    layer that reads x) or, without a consumer, of the quantized values themselves.
    """
    x = x.detach().float()
    consumer = consumer or (lambda t: t)
    with torch.no_grad():
        ref = consumer(x)
        scored = [(float((consumer(fake_quant(c, x, bits)) - ref).pow(2).mean()), c) for c in candidates_for(axis)]
    return sorted(scored, key=lambda item: item[0])


def zero_point_overflow(lo: Tensor, hi: Tensor, bits: int) -> int:
    """Channels (or 1 / 0 per tensor) whose asymmetric zero point -round(lo / s), s = (hi - lo) / (2**bits - 1),
    falls outside [0, 2**bits - 1] without vitlab's widening of the range to 0: the range excludes 0."""
    scale = torch.clamp((hi - lo) / (2 ** bits - 1), min=1e-8)
    zp = -torch.round(lo / scale)
    return int(((zp < 0) | (zp > 2 ** bits - 1)).sum())


# ----------------------------------------------------------------------------------------------- bridge blocks

def bridge_blocks(model: nn.Module, technique: str = "qhyvit") -> list:
    """The contract blocks (`vitlab.contract.BlockSpec`) where the model turns from convolutions to attention: an
    attention block whose input is an NCHW map, or whose previous block has no attention mixer. Refuses (with what
    it supports) a model without any."""
    spec = describe(model, technique)
    found, previous_attention = [], None
    for block in spec.blocks:
        attention = any(m.kind in ATTENTION_KINDS for m in block.mixers)
        if attention and (block.layout == "nchw" or previous_attention is False):
            found.append(block)
        previous_attention = attention
    if not found:
        raise TechniqueNotApplicable(
            technique, model,
            "it has no bridge block (no attention block fed by a conv / pooling block or working on an NCHW map): "
            "qhyvit supports hybrid conv + attention models (EfficientFormer, Next-ViT, TinyViT, EfficientViT-M, "
            "UniFormer, FMViT, ...); for plain or windowed ViTs use ptq (e.g. ptq:quantizer=adalog)")
    return found


# ----------------------------------------------------------------------------------------------- search

def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _install(model: nn.Module, name: str, quantizer: Quantizer) -> None:
    parent, attr = _parent(model, name)
    setattr(parent, attr, quantizer)


def _activation_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    weights = {id(m.weight_quant) for _, m in quant_layers(model)}
    return {n: q for n, q in quantizers(model) if id(q) not in weights}


def _layer_consumer(layer: nn.Module) -> Callable[[Tensor], Tensor]:
    """x -> the layer's output with its quantized weight (the reference call uses the same weight: the error is the
    input's)."""
    weight = layer.quant_weight().detach()
    if isinstance(layer, QuantConv2d):
        return lambda t: layer._conv_forward(t, weight, layer.bias)
    return lambda t: F.linear(t, weight, layer.bias)


@torch.no_grad()
def _capture(model: nn.Module, images: Tensor, names: list[str], blocks: list[str], mode: str) -> tuple[dict, dict]:
    """Run `images` with every quantizer in `mode` ("off": the float model); returns ({quantizer name: its input},
    {block name: (args, kwargs, output)})."""
    inputs: dict[str, list[Tensor]] = {n: [] for n in names}
    block_io: dict[str, tuple] = {}
    hooks = []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: inputs[n].append(args[0].detach())))
    def keep_block(name: str):
        def hook(module, args, kwargs, out) -> None:   # returns None: the block's output is left as it is
            block_io.setdefault(name, (args, kwargs, out))
        return hook

    for b in blocks:
        hooks.append(model.get_submodule(b).register_forward_hook(keep_block(b), with_kwargs=True))
    saved = {n: q.mode for n, q in quantizers(model)}
    for _, q in quantizers(model):
        q.mode = mode
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
        for n, q in quantizers(model):
            q.mode = saved[n]
    return {n: v[0] if len(v) == 1 else v for n, v in inputs.items() if v}, block_io


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def reconstruct_block_(model: nn.Module, block: str, names: list[str], options: dict[str, list[Candidate]],
                       samples: dict[str, Tensor], args: tuple, kwargs: dict, target: Tensor, bits: int,
                       rounds: int = 2) -> tuple[float, float]:
    """Step 4 on one block: coordinate descent over the block's activation quantizers `names`, each among
    `options[name]` (built on `samples[name]`, its float calibration input), minimizing the MSE of the block's
    output on its quantized-model input (`args`, `kwargs`) against the float `target`. Keeps the plain min-max
    quantizers when they do better. Returns (min-max error, final error)."""
    module = model.get_submodule(block)

    def error() -> float:
        return float((_first(module(*args, **kwargs)) - target).pow(2).mean())

    current = {n: model.get_submodule(n) for n in names}
    for n in names:
        _install(model, n, build_quantizer(Candidate("uniform", None, 1.0), samples[n], bits, _site(current[n])))
    baseline_error = error()
    baseline = {n: model.get_submodule(n) for n in names}
    for n in names:
        _install(model, n, current[n])
    best = error()
    for _ in range(rounds):
        improved = False
        for n in names:
            keep = model.get_submodule(n)
            for c in options[n]:
                if c == getattr(keep, "qhyvit_candidate", None):
                    continue
                trial = build_quantizer(c, samples[n], bits, _site(keep))
                _install(model, n, trial)
                err = error()
                if err < best:
                    best, keep, improved = err, trial, True
            _install(model, n, keep)
        if not improved:
            break
    if baseline_error <= best:
        for n in names:
            _install(model, n, baseline[n])
        best = baseline_error
    return baseline_error, best


def _site(q: Quantizer) -> str | None:
    return q.options.get("site")


def _channel_axis(name: str, layers: dict[str, nn.Module], x: Tensor) -> int | None:
    """The channel axis a layer-input quantizer may use: 1 for a conv's NCHW input, the last for a Linear's."""
    layer = layers.get(name.rpartition(".")[0])
    if isinstance(layer, QuantConv2d):
        return 1
    if isinstance(layer, QuantLinear) and x.dim() >= 2:
        return x.dim() - 1
    return None


@torch.no_grad()
def qhyvit_(model: nn.Module, cfg: QHyViT, calib: list[Tensor]) -> nn.Module:
    """Apply Q-HyViT to a float model in place (steps 1-5 of the module docstring); returns the model, with
    `quant_mac_fraction` and `qhyvit_report` (bridge blocks and their output MSE with min-max / after
    reconstruction, the scheme counts, the zero-point overflows avoided)."""
    name = format_technique(cfg)
    bridges = [b.name for b in bridge_blocks(model, name)]
    base = PTQ(w=cfg.w, a=cfg.a, quantizer="minmax", weight_quantizer="mse", act_quantizer="minmax")
    prepare_(model, base, example=calib[0][:1])
    calibrate(model, calib)
    images = torch.cat(calib)[:cfg.search_images]
    acts = _activation_quantizers(model)
    layers = {n: m for n, m in quant_layers(model)}
    inputs, float_io = _capture(model, images, list(acts), bridges, "off")
    options: dict[str, list[Candidate]] = {}
    schemes: dict[str, int] = {}
    overflow = 0
    for n, q in acts.items():
        x = inputs[n]
        shared = isinstance(x, list)   # called more than once per forward: per tensor, on all its inputs
        if shared:
            x = inputs[n] = torch.cat([t.flatten() for t in x])
        layer = layers.get(n.rpartition(".")[0]) if n.endswith("input_quant") and not shared else None
        axis = _channel_axis(n, layers, x) if layer is not None else None
        consumer = _layer_consumer(layer) if layer is not None else None
        scored = choose_scheme(x, cfg.a, axis=axis, consumer=consumer)
        options[n] = [c for _, c in scored[:cfg.topk]]
        best = scored[0][1]
        _install(model, n, build_quantizer(best, x, cfg.a, _site(q)))
        key = f"{best.scheme}/{'channel' if best.axis is not None else 'tensor'}"
        schemes[key] = schemes.get(key, 0) + 1
        overflow += zero_point_overflow(*_range(x, axis), cfg.a)
    recon = {}
    if cfg.reconstruct:
        for b in bridges:
            names = [n for n in acts if n.startswith(b + ".")]
            if not names or b not in float_io:
                continue
            _, quant_io = _capture(model, images, [], [b], "quant")
            args, kwargs, _ = quant_io[b]
            recon[b] = reconstruct_block_(model, b, names, options, inputs, args, kwargs,
                                          _first(float_io[b][2]), cfg.a, cfg.rounds)
    update_record(model, quant_config=base)
    model.qhyvit_report = {"bridge_blocks": bridges, "block_mse": recon, "schemes": schemes,
                           "zero_point_overflow": overflow}
    return model


@register_handler(QHyViT)
def _apply_qhyvit(model: nn.Module, cfg: QHyViT, calib=None) -> nn.Module:
    _require_calib(cfg, calib)
    with _named(cfg):
        return qhyvit_(model, cfg, list(calib))
