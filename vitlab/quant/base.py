"""Fake quantizers: the base class every quantizer builds on, the registry, and the uniform quantizer.

A quantizer is a module with three modes:

* ``"off"``: identity (the state right after `quantize_`, before calibration);
* ``"observe"``: record statistics of what passes through, return it unchanged (calibration);
* ``"quant"``: quantize-dequantize with the parameters `finalize()` computed from the observations.

Post-training quantization only: there is no straight-through gradient. The base class keeps, for every
quantizer, the running min / max (per channel when `channel_axis` is set) and a bounded, seeded random subsample
of the observed values (`samples()`, at most `max_samples` values, 2**20 by default), so a subclass's `finalize`
can search its parameters (MSE clipping, percentile, log base) on the data without holding every activation.

The uniform quantizer follows the affine scheme of Jacob et al. (2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference"), which ONNX `QuantizeLinear` and OpenVINO
`FakeQuantize` implement: ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x' = (q - z) * s``, rounding half to even
(as `torch.round` and ONNX do). Checked in tests/quant/test_quant.py: round-trip error <= s/2 inside the range,
zero-point clamping, per-channel scales.

New quantizers register by name and plug into the sites of `vitlab.quant.sim` through `make_quantizer`::

    @register_quantizer("log2")
    class Log2Quantizer(Quantizer):
        def finalize(self): ...          # from self.samples() / self.min_val / self.max_val
        def fake_quant(self, x): ...
"""
from __future__ import annotations

from ..errors import UserError
import abc
import importlib
import inspect
import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "Quantizer", "UniformQuantizer", "MinMaxQuantizer", "PercentileQuantizer", "MSEQuantizer", "QUANTIZERS", "register_quantizer", "quantizer_names", "get_quantizer_class", "make_quantizer",
    "QuantizerError", "SITES", "ACTIVATION_SITES", "MODES",
]

MODES = ("off", "observe", "quant")
# Quantization sites of a ViT (vitlab.quant.sim wires them): Linear weights (per output channel) and inputs, the
# two attention matmuls' inputs (q, k for QK^T; attn_prob, v for softmax*V) and the input of fc2 (post-GELU).
SITES = ("weight", "input", "q", "k", "attn_prob", "v", "post_gelu")
ACTIVATION_SITES = SITES[1:]
# Sites where a non-uniform (log-domain / twin) quantizer is used; elsewhere activations stay uniform.
SPECIAL_SITES = ("attn_prob", "post_gelu")


class QuantizerError(UserError):
    """A quantizer that cannot be built or used as asked; the message says what to do instead."""


class Quantizer(nn.Module, metaclass=abc.ABCMeta):
    """Fake quantizer. mode: "off" -> identity; "observe" -> record statistics, return x unchanged;
    "quant" -> quantize-dequantize (no straight-through gradient: post-training quantization only).

    `bits`: bit width (2-16). `signed`: whether the integer grid is signed (``[-2^(b-1), 2^(b-1)-1]``) or not
    (``[0, 2^b-1]``). `channel_axis`: None for one set of parameters per tensor, else the axis that gets its own
    (output channel of a weight, token of an activation). `options`: quantizer-specific settings, kept in
    `self.options` (`make_quantizer` passes `site=` too). Subclasses implement `finalize` and `fake_quant`, and
    register their parameters as buffers so `state_dict` saves them (buffer shapes are adopted on load).
    """

    all_sites: ClassVar[bool] = False  # True: usable at every activation site (uniform); False: attn_prob/post_gelu only
    max_samples_default: ClassVar[int] = 1 << 20

    def __init__(self, bits: int, *, signed: bool = True, channel_axis: int | None = None, **options: Any):
        super().__init__()
        _check_bits(bits)
        self.bits = int(bits)
        self.signed = bool(signed)
        self.channel_axis = channel_axis
        self.options = dict(options)
        self.max_samples = int(self.options.pop("max_samples", self.max_samples_default))
        self.seed = int(self.options.pop("seed", 0))
        self.mode = "off"
        self.calibrated = False
        self.num_observed = 0                 # values seen (per channel, when per-channel)
        self._samples: Tensor | None = None   # (n,) or (C, n)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    # ------------------------------------------------------------------ integer grid
    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def set_bits(self, bits: int) -> None:
        """Change the bit width; the caller then calls `finalize()` again (observations are kept)."""
        _check_bits(bits)
        self.bits = int(bits)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise QuantizerError(f"quantizer mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "quant" and not self.calibrated:
            raise QuantizerError(
                f"{type(self).__name__} has no parameters yet: observe calibration data and call finalize() "
                "(vitlab.calibrate) before switching to mode 'quant'")
        self.mode = mode

    # ------------------------------------------------------------------ observation
    def _channels_first(self, x: Tensor) -> Tensor:
        """(C, n) view of x with the channel axis first (per-channel), or (n,) (per-tensor)."""
        x = x.detach().float()
        if self.channel_axis is None:
            return x.reshape(-1)
        return x.movedim(self.channel_axis, 0).reshape(x.shape[self.channel_axis], -1)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Accumulate statistics of x: running min/max and a bounded uniform random subsample of the values."""
        flat = self._channels_first(x)
        if flat.numel() == 0:
            return
        if self.channel_axis is None:
            lo, hi = flat.min(), flat.max()
        else:
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        if self.num_observed == 0 or self.min_val.shape != lo.shape:
            self.min_val = lo.clone()
            self.max_val = hi.clone()
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        self._add_samples(flat)
        self.num_observed += flat.shape[-1]

    def _add_samples(self, flat: Tensor) -> None:
        """Reservoir-style subsample: each batch gets a share of the `max_samples` slots in proportion to how many
        values it brings, so early and late batches are equally represented. Cost per call: O(batch)."""
        rows = 1 if flat.dim() == 1 else flat.shape[0]
        cap = max(1, self.max_samples // rows)   # values kept per channel
        new_n, old_n = flat.shape[-1], self.num_observed
        pool = self._samples
        if pool is None or pool.shape[-1] + new_n <= cap:
            chosen = _take(flat, min(cap, new_n), self._generator)
            self._samples = chosen if pool is None else torch.cat([pool, chosen], dim=-1)
            return
        k_new = min(new_n, max(1, round(cap * new_n / (old_n + new_n))))
        chosen = _take(flat, k_new, self._generator)
        room = cap - pool.shape[-1]
        if room > 0:
            pool = torch.cat([pool, chosen[..., :room]], dim=-1)
            chosen = chosen[..., room:]
        if chosen.shape[-1]:
            pool[..., torch.randint(0, cap, (chosen.shape[-1],), generator=self._generator)] = chosen
        self._samples = pool

    def samples(self) -> Tensor:
        """The subsample of observed values: (n,) per-tensor, (C, n) per-channel (channel axis first)."""
        if self._samples is None:
            raise QuantizerError(f"{type(self).__name__} has observed nothing: run calibration images through it first")
        return self._samples

    def reset_observations(self) -> None:
        self._samples = None
        self.num_observed = 0
        self.min_val = torch.tensor(float("inf"))
        self.max_val = torch.tensor(float("-inf"))

    def _require_observed(self) -> None:
        if self.num_observed == 0:
            raise QuantizerError(
                f"{type(self).__name__} observed nothing: calibration must run images through the model in "
                "mode 'observe' before finalize()")

    # ------------------------------------------------------------------ parameters and forward
    @abc.abstractmethod
    def finalize(self) -> None:
        """Compute the parameters from the observations and mark the quantizer calibrated (subclasses)."""

    @abc.abstractmethod
    def fake_quant(self, x: Tensor) -> Tensor:
        """Quantize-dequantize x with the finalized parameters (subclasses)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observe(x)
            return x
        return self.fake_quant(x)

    def _broadcast(self, t: Tensor, x: Tensor) -> Tensor:
        """Shape a per-channel parameter (C,) to broadcast against x along `channel_axis`."""
        if self.channel_axis is None or t.dim() == 0:
            return t
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return t.reshape(shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Per-channel parameters have a shape only calibration knows: adopt the saved shapes before copying.
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if key in state_dict and buf is not None and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], dtype=buf.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if any(k.startswith(prefix) for k in state_dict):
            self.calibrated = True

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.channel_axis is None else f"channel_axis={self.channel_axis}"
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"bits={self.bits}, {'signed' if self.signed else 'unsigned'}, {axis}, mode={self.mode}{opts}"


def _check_bits(bits: Any) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise QuantizerError(f"bits={bits!r} is not a whole number of bits in 2..16")


def _take(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k random entries of x along the last axis, drawn with replacement (all of them, in order, when k >= its
    length); O(k), where a permutation would cost O(len)."""
    n = x.shape[-1]
    if k >= n:
        return x.clone()
    return x[..., torch.randint(0, n, (k,), generator=generator)]


# ---------------------------------------------------------------------------------------------- registry

QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: make a Quantizer subclass available as `ptq:quantizer=NAME`."""
    name = name.lower()

    def decorator(cls: type[Quantizer]) -> type[Quantizer]:
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise TypeError(f"quantizer {name!r}: {cls!r} is not a Quantizer subclass")
        if name in QUANTIZERS and QUANTIZERS[name] is not cls:
            raise QuantizerError(f"quantizer name {name!r} is already registered by {QUANTIZERS[name].__name__}")
        QUANTIZERS[name] = cls
        cls.registered_name = name
        return cls

    return decorator


def quantizer_names() -> list[str]:
    _load_builtin_quantizers()
    return sorted(QUANTIZERS)


def _load_builtin_quantizers() -> None:
    for module in ("vitlab.quant.logquant", "vitlab.quant.twin"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def get_quantizer_class(name: str) -> type[Quantizer]:
    _load_builtin_quantizers()
    cls = QUANTIZERS.get(str(name).lower())
    if cls is None:
        raise QuantizerError(f"unknown quantizer {name!r}; available: {', '.join(sorted(QUANTIZERS))}")
    return cls


# ---------------------------------------------------------------------------------------------- uniform

class UniformQuantizer(Quantizer):
    """Uniform affine quantizer (Jacob et al., 2018) with three ways to pick the clipping range from calibration:

    * ``method="minmax"``: the observed min / max (extended to include 0, so 0 is exact);
    * ``method="percentile"``: the `percentile` / (100 - `percentile`) quantiles of the subsample (default 99.99);
    * ``method="mse"``: the min / max shrunk by the factor in a grid of `grid` values over [`min_ratio`, 1] that
      minimizes the mean squared (Lp, `p`=2.0) quantization error on the subsample, per channel when per-channel
      (the search of PTQ4ViT / RepQ-ViT's uniform quantizers).

    ``symmetric=True`` fixes the zero-point at 0 (the midpoint of a signed grid), as int8 engines want for weights.
    The zero-point is clamped to [qmin, qmax]. Buffers: `scale`, `zero_point` (float, integral values).
    """

    all_sites = True
    METHODS = ("minmax", "percentile", "mse")

    default_method: ClassVar[str] = "minmax"

    def __init__(self, bits: int, *, signed: bool = True, channel_axis: int | None = None, method: str | None = None,
                 symmetric: bool = False, percentile: float = 99.99, grid: int = 100, min_ratio: float = 0.01,
                 p: float = 2.0, **options: Any):
        super().__init__(bits, signed=signed, channel_axis=channel_axis, **options)
        method = self.default_method if method is None else method
        if method not in self.METHODS:
            raise QuantizerError(f"uniform quantizer method {method!r} is not one of {', '.join(self.METHODS)}")
        if not 50.0 < percentile <= 100.0:
            raise QuantizerError(f"percentile={percentile} must be in (50, 100]")
        if not (grid >= 1 and 0.0 < min_ratio <= 1.0):
            raise QuantizerError(f"mse search needs grid >= 1 and 0 < min_ratio <= 1, got grid={grid}, min_ratio={min_ratio}")
        self.method, self.symmetric = method, bool(symmetric)
        self.percentile, self.grid, self.min_ratio, self.p = float(percentile), int(grid), float(min_ratio), float(p)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))

    @torch.no_grad()
    def finalize(self) -> None:
        self._require_observed()
        if self.method == "minmax":
            lo, hi = self.min_val.float(), self.max_val.float()
        elif self.method == "percentile":
            lo, hi = _quantile_range(self.samples(), self.percentile)
        else:
            lo, hi = self._mse_range()
        self.scale, self.zero_point = self.params_for_range(lo, hi)
        self.calibrated = True

    def params_for_range(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, zero_point) that map [lo, hi] (widened to include 0) onto the grid [qmin, qmax]."""
        lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
        hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
        if self.symmetric:
            bound = torch.maximum(-lo, hi)
            half = (self.qmax - self.qmin) / 2.0  # 127.5 for int8 / 255 levels; zero-point at the grid's centre
            zp_value = 0.0 if self.signed else float(math.ceil(half))
            scale = torch.clamp(bound / math.floor(half), min=1e-8)
            return scale, torch.full_like(scale, zp_value)
        scale = torch.clamp((hi - lo) / (self.qmax - self.qmin), min=1e-8)
        zero_point = torch.clamp(self.qmin - torch.round(lo / scale), self.qmin, self.qmax)
        return scale, zero_point

    def quantize(self, x: Tensor, scale: Tensor | None = None, zero_point: Tensor | None = None) -> Tensor:
        """Integer codes (as float) of x."""
        scale = self._broadcast(self.scale if scale is None else scale, x)
        zero_point = self._broadcast(self.zero_point if zero_point is None else zero_point, x)
        return torch.clamp(torch.round(x / scale) + zero_point, self.qmin, self.qmax)

    def fake_quant(self, x: Tensor, scale: Tensor | None = None, zero_point: Tensor | None = None) -> Tensor:
        """Quantize-dequantize with torch's fake-quantize ops: the same arithmetic as `(quantize(x) - z) * s` (up to
        x * (1/s) for x / s), and the ops that OpenVINO and ONNX exporters turn into FakeQuantize / Q-DQ nodes."""
        scale = (self.scale if scale is None else scale).float()
        zero_point = (self.zero_point if zero_point is None else zero_point).round().to(torch.int32)
        if self.channel_axis is None or scale.dim() == 0:
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zero_point.reshape(1), self.qmin,
                                                         self.qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, self.channel_axis % x.dim(), self.qmin,
                                                      self.qmax)

    def _mse_range(self) -> tuple[Tensor, Tensor]:
        """Grid search of the clipping ratio (per channel), vectorized over the grid in chunks, on at most
        `search_samples` (65536) values of the subsample per channel."""
        data = self.samples()                                  # (n,) or (C, n)
        data2 = data if data.dim() == 2 else data[None]       # (C, n)
        limit = int(self.options.get("search_samples", 1 << 16))
        if data2.shape[1] > limit:
            data2 = _take(data2, limit, torch.Generator().manual_seed(self.seed))
        lo0 = torch.clamp(data2.amin(dim=1), max=0.0)          # (C,)
        hi0 = torch.clamp(data2.amax(dim=1), min=0.0)
        ratios = torch.linspace(self.min_ratio, 1.0, self.grid)
        errs = []
        for chunk in ratios.split(8):
            lo, hi = chunk[:, None] * lo0, chunk[:, None] * hi0  # (g, C)
            scale, zp = self.params_for_range(lo, hi)
            s, z = scale[..., None], zp[..., None]              # (g, C, 1)
            q = torch.clamp(torch.round(data2 / s) + z, self.qmin, self.qmax)
            errs.append(((q - z) * s - data2).abs().pow(self.p).mean(dim=2))   # (g, C)
        best = torch.cat(errs).argmin(dim=0)                   # (C,) index of the best ratio per channel
        lo, hi = ratios[best] * lo0, ratios[best] * hi0
        if data.dim() == 1:
            return lo[0], hi[0]
        return lo, hi

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method}{', symmetric' if self.symmetric else ''}"


@register_quantizer("minmax")
class MinMaxQuantizer(UniformQuantizer):
    """Uniform quantizer, range = observed min / max."""
    default_method = "minmax"


@register_quantizer("percentile")
class PercentileQuantizer(UniformQuantizer):
    """Uniform quantizer, range = the 99.99th / 0.01th percentiles of the calibration subsample."""
    default_method = "percentile"


@register_quantizer("mse")
class MSEQuantizer(UniformQuantizer):
    """Uniform quantizer, range = min / max shrunk to minimize the squared quantization error (grid search)."""
    default_method = "mse"


def _quantile_range(data: Tensor, percentile: float) -> tuple[Tensor, Tensor]:
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0])
    if data.dim() == 1:
        lo, hi = torch.quantile(data, q)
        return lo, hi
    lo, hi = torch.quantile(data, q, dim=1)
    return lo, hi


# ---------------------------------------------------------------------------------------------- sites

def make_quantizer(site: str, cfg: Any) -> Quantizer:
    """The quantizer for one site under a PTQ config (`vitlab.quant.PTQ`, or anything with its fields).

    * "weight": uniform, symmetric, signed, per output channel (axis 0), `cfg.w` bits, `cfg.weight_quantizer`
      (minmax or mse; a non-uniform name is refused);
    * "attn_prob" / "post_gelu": `cfg.quantizer` (any registered name), `cfg.a` bits;
    * other activation sites ("input", "q", "k", "v"): `cfg.quantizer` when it is uniform, else
      `cfg.act_quantizer` (a uniform one). "input" is per token (axis 1 of (B, N, C)) when `cfg.per_token`.
    Every quantizer gets the option `site=` (and `objective=cfg.objective` when its constructor takes one: AdaLog).
    Activations use an unsigned asymmetric grid (uint8 for 8 bits); with `cfg.qkv_symmetric`, q, k and v use a
    symmetric one (zero point at the centre), which OpenVINO needs to run the attention matmuls in int8.
    """
    if site not in SITES:
        raise QuantizerError(f"unknown quantization site {site!r}; sites are {', '.join(SITES)}")
    if site == "weight":
        name = getattr(cfg, "weight_quantizer", "minmax")
        cls = get_quantizer_class(name)
        if not issubclass(cls, UniformQuantizer):
            raise QuantizerError(f"weight_quantizer={name!r}: weights are quantized uniformly per output channel; "
                                 f"use one of {', '.join(UniformQuantizer.METHODS)}")
        return cls(cfg.w, signed=True, channel_axis=0, symmetric=True, site=site)
    name = str(cfg.quantizer).lower()
    cls = get_quantizer_class(name)
    if not cls.all_sites and site not in SPECIAL_SITES:
        name = str(getattr(cfg, "act_quantizer", "mse")).lower()
        cls = get_quantizer_class(name)
        if not cls.all_sites:
            raise QuantizerError(f"act_quantizer={name!r} cannot quantize site {site!r}; use a uniform one "
                                 f"({', '.join(UniformQuantizer.METHODS)})")
    channel_axis = 1 if (site == "input" and getattr(cfg, "per_token", False)) else None
    extra = {}
    if "objective" in inspect.signature(cls.__init__).parameters and getattr(cfg, "objective", None) is not None:
        extra["objective"] = cfg.objective            # AdaLog's search objective (PTQ.objective)
    if site in ("q", "k", "v") and getattr(cfg, "qkv_symmetric", False) and issubclass(cls, UniformQuantizer):
        extra["symmetric"] = True                      # zero point at the grid's centre (128 on uint8)
    return cls(cfg.a, signed=False, channel_axis=channel_axis, site=site, **extra)
