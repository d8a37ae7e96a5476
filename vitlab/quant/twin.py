"""Twin-uniform quantization (Yuan et al., "PTQ4ViT: Post-Training Quantization for Vision Transformers with Twin
Uniform Quantization", ECCV 2022) for post-softmax and post-GELU values.

One bit of the code says which of two uniform ranges a value uses; the other bits-1 bits code it in that range.
The two steps differ by a power of two, 2**m, so that both can be aligned by a shift. Semantics read from the
official code (github.com/hahnyuan/PTQ4ViT, `quant_layers/matmul.py` SoSPTQSL..., `quant_layers/linear.py`
PostGeluPTQSL...) and AdaLog's re-implementation (`PostGeluTwinUniformBatchingQuantLinear`):

* post-softmax: the large range covers [0, 1] with step 1 / (2**(bits-1) - 1) (so 1.0 is a level); the small range
  has step 2**-m times that and covers [0, its top level]. m is searched over 0 ... 19 (the official split points
  2**-i).
* post-GELU: the negative range has the fixed step 0.16997 / 2**(bits-1) and codes -2**(bits-1) ... 0, reaching
  GELU's minimum; the positive range has step 2**m times that, codes 0 ... 2**(bits-1) - 1; m is searched over
  -5 ... 24 (AdaLog's candidates).

The search minimizes the squared error of the quantized values (the official code: the next layer's output error,
optionally Hessian-weighted; a vitlab Quantizer sees only its own input).

Checked (tests/quant/test_quant_adv.py): the two ranges have the steps above; values in the small range keep the fine
step; the search prefers the fine range on softmax data over plain uniform at 4 bits.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Quantizer, QuantizerError, register_quantizer

from .logquant import GELU_SHIFT, quantization_mse, search_data

__all__ = [
    "twin_softmax_quantize", "twin_gelu_quantize", "search_twin_softmax", "search_twin_gelu",
    "SOFTMAX_M_RANGE", "GELU_M_RANGE", "TwinUniformQuantizer",
]

SOFTMAX_M_RANGE = (0, 19)
GELU_M_RANGE = (-5, 24)


def _levels(bits: int) -> int:
    """Codes per range: 2**(bits-1); one bit picks the range."""
    if bits < 2:
        raise ValueError(f"twin-uniform needs bits >= 2 (one bit picks the range), got bits={bits}")
    return 2 ** (bits - 1)


def twin_softmax_quantize(x: Tensor, bits: int, m: int | Tensor) -> Tensor:
    """Fake-quantize values in [0, 1]: step 1/(L-1) in the large range, step 2**-m of that in the small one."""
    top = _levels(bits) - 1
    m = torch.as_tensor(m, device=x.device, dtype=x.dtype)
    step_large = 1.0 / top
    step_small = step_large * torch.exp2(-m)
    small = (x / step_small).round().clamp(0, top) * step_small
    large = (x / step_large).round().clamp(0, top) * step_large
    in_small = x < (top + 0.5) * step_small                   # the small range's codes reach its value
    return torch.where(in_small, small, large)


def twin_gelu_quantize(x: Tensor, bits: int, m: int | Tensor, negative_step: float | None = None) -> Tensor:
    """Fake-quantize post-GELU values: fixed fine step for x < 0 (down to -0.17), step 2**m times it for x >= 0."""
    levels = _levels(bits)
    step_neg = GELU_SHIFT / levels if negative_step is None else negative_step
    m = torch.as_tensor(m, device=x.device, dtype=x.dtype)
    step_pos = step_neg * torch.exp2(m)
    positive = (x / step_pos).round().clamp(0, levels - 1) * step_pos
    negative = (x / step_neg).round().clamp(-levels, 0) * step_neg
    return positive + negative                                  # one of the two is 0 for every x


def search_twin_softmax(samples: Tensor, bits: int, m_range: tuple[int, int] = SOFTMAX_M_RANGE) -> int:
    """m (small step = 2**-m x large step) with the least squared error on `samples`."""
    x = samples.flatten().float()
    m = torch.arange(m_range[0], m_range[1] + 1, dtype=x.dtype, device=x.device)[:, None]   # (M, 1)
    errors = quantization_mse(x, twin_softmax_quantize(x[None], bits, m))
    return int(m[errors.argmin(), 0])


def search_twin_gelu(samples: Tensor, bits: int, m_range: tuple[int, int] = GELU_M_RANGE) -> int:
    """m (positive step = 2**m x negative step) with the least squared error on `samples`."""
    x = samples.flatten().float()
    m = torch.arange(m_range[0], m_range[1] + 1, dtype=x.dtype, device=x.device)[:, None]   # (M, 1)
    errors = quantization_mse(x, twin_gelu_quantize(x[None], bits, m))
    return int(m[errors.argmin(), 0])


# ---------------------------------------------------------------------------------------------- quantizer


@register_quantizer("twin")
class TwinUniformQuantizer(Quantizer):
    """PTQ4ViT's twin-uniform quantizer for the attn_prob (post-softmax) and post_gelu sites; `m` is searched.

    At other sites (or with no site) values >= 0 are treated as post-softmax-like and values with negatives as
    post-GELU-like.
    """

    def __init__(self, bits: int, **kwargs):
        super().__init__(bits, **kwargs)
        if self.channel_axis is not None:
            raise QuantizerError(f"TwinUniformQuantizer is per tensor; got channel_axis={self.channel_axis}")
        self.register_buffer("m", torch.tensor(0.0))
        self.register_buffer("gelu_form", torch.tensor(False))

    @torch.no_grad()
    def finalize(self) -> None:
        self._require_observed()
        site = self.options.get("site")
        gelu = site == "post_gelu" or (site != "attn_prob" and float(self.min_val.min()) < 0)
        data = search_data(self)
        m = search_twin_gelu(data, self.bits) if gelu else search_twin_softmax(data, self.bits)
        self.m, self.gelu_form = torch.tensor(float(m)), torch.tensor(gelu)
        self.calibrated = True

    def fake_quant(self, x: Tensor) -> Tensor:
        if bool(self.gelu_form):
            return twin_gelu_quantize(x, self.bits, self.m)
        return twin_softmax_quantize(x, self.bits, self.m)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={int(self.m)}, form={'gelu' if bool(self.gelu_form) else 'softmax'}"
