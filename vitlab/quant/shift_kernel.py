"""A CPU kernel for ShiftAddViT's shift layers: integer shifts and additions, no multiplications.

`ShiftLinear` (vitlab/quant/shiftadd.py) simulates DeepShift-PS in float32: its weights are `sign * 2**shift` and its
inputs 16.16 fixed point, but `F.linear` still multiplies. This module runs the same layer the way shift hardware
(and DeepShift's own CUDA kernels) would: the input as int32 fixed point, each product `x * 2**shift` (shift <= 0) an
arithmetic right shift `x >> -shift`, the sign a conditional negation, and the sum an int64 accumulation. The loops
are compiled by numba (`numba` on PyPI, LLVM: no C compiler needed), vectorized for the CPU it runs on, and run over
the rows in parallel.

    kernel = ShiftKernelLinear.from_shift_linear(layer)   # inference only
    y = kernel(x)                                         # = layer(x) up to the truncation of the right shifts

Truncation: `x >> s` floors `x / 2**s` in fixed point, so each product can be below the exact one by less than one
unit of the 16.16 format (2**-16); an output differs from `ShiftLinear`'s by less than `in_features * 2**-16` (plus
float32 rounding). `shift_matmul` itself is exact integer arithmetic; tests/quant/test_shift_kernel.py checks it
against torch's own integer shift ops and `ShiftKernelLinear` against `ShiftLinear`.

The kernel exists to measure what shifts buy on a CPU (`benchmarks/shiftadd_speed.py`). x86 has vector shifts and
adds but also fused multiply-adds that do 16 float32 products per instruction (and VNNI int8 dot products that do
64), so a shift-add dot product is not expected to beat an optimized GEMM here; the paper's speed-ups are TVM kernels
on GPUs and shift/add hardware.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .shiftadd import ACT_FRACTION_BITS, ACT_INTEGER_BITS, ShiftLinear, round_to_fixed

__all__ = ["ShiftKernelLinear", "shift_matmul", "shift_kernel_", "to_fixed"]

_KERNEL = None


def _kernel():
    """The numba-compiled loop, built on first use (compiling takes a few seconds; numba caches it on disk)."""
    global _KERNEL
    if _KERNEL is None:
        try:
            import numba
        except ImportError as err:
            raise ImportError("the shift kernel needs numba: pip install 'vitlab[deploy]' (or pip install numba)") from err

        @numba.njit(parallel=True, cache=True, nogil=True)
        def shift_matmul_loop(x, shifts, negate, keep, out):
            rows, depth = x.shape
            for r in numba.prange(rows):
                for o in range(shifts.shape[0]):
                    acc = numba.int64(0)
                    for k in range(depth):
                        v = x[r, k] >> shifts[o, k]
                        acc += numba.int64(((v ^ negate[o, k]) - negate[o, k]) & keep[o, k])
                    out[r, o] = acc
        _KERNEL = shift_matmul_loop
    return _KERNEL


def _set_threads() -> None:
    import numba
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def to_fixed(x: torch.Tensor, integer_bits: int = ACT_INTEGER_BITS,
             fraction_bits: int = ACT_FRACTION_BITS) -> torch.Tensor:
    """`x` as int32 fixed point: `floor(x * 2**fraction_bits)`, clipped to the `integer_bits`.`fraction_bits` range
    (the value `round_to_fixed` gives, times 2**fraction_bits)."""
    if integer_bits + fraction_bits > 32:
        raise ValueError(f"{integer_bits}.{fraction_bits} fixed point does not fit int32: use at most 32 bits in all")
    scale = 2.0 ** fraction_bits
    low, high = -(2 ** (integer_bits + fraction_bits - 1)), (2 ** (integer_bits - 1) - 1) * 2 ** fraction_bits
    # x * 2**fraction_bits is exact in float32 (a power of two), and so are floor and the clipped bounds
    return torch.floor(x.float() * scale).clamp_(low, high).to(torch.int32)


def shift_matmul(x: torch.Tensor, shifts: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """`out[r, o] = sum_k sign[o, k] * (x[r, k] >> shifts[o, k])`, summed in int64: shifts and adds only.

    `x`: int32 (rows, in); `shifts`: non-negative right-shift amounts, (out, in), below 32; `sign`: -1 / 0 / +1,
    (out, in). The weight `sign * 2**-shifts` applied to fixed-point `x`.
    """
    if x.dtype != torch.int32 or x.dim() != 2:
        raise ValueError(f"x must be a 2-D int32 tensor (fixed point, see to_fixed), got {x.dtype} {tuple(x.shape)}")
    if shifts.shape != sign.shape or shifts.dim() != 2 or shifts.shape[1] != x.shape[1]:
        raise ValueError(f"shifts {tuple(shifts.shape)} and sign {tuple(sign.shape)} must both be (out, "
                         f"{x.shape[1]}) for x of shape {tuple(x.shape)}")
    if shifts.numel() and (int(shifts.min()) < 0 or int(shifts.max()) > 31):
        raise ValueError(f"shifts must be right-shift amounts in 0..31, got {int(shifts.min())}..{int(shifts.max())}")
    if sign.numel() and not bool(((sign == -1) | (sign == 0) | (sign == 1)).all()):
        raise ValueError("sign must hold only -1, 0 and +1")
    out = torch.empty(x.shape[0], shifts.shape[0], dtype=torch.int64)
    _set_threads()
    _kernel()(x.contiguous().numpy(), shifts.to(torch.int32).contiguous().numpy(),
              (sign < 0).to(torch.int32).neg().contiguous().numpy(),
              (sign != 0).to(torch.int32).neg().contiguous().numpy(), out.numpy())
    return out


class ShiftKernelLinear(nn.Module):
    """A `ShiftLinear` frozen for inference and run by `shift_matmul` (integer shifts and adds)."""

    def __init__(self, shifts: torch.Tensor, sign: torch.Tensor, bias: torch.Tensor | None,
                 integer_bits: int = ACT_INTEGER_BITS, fraction_bits: int = ACT_FRACTION_BITS):
        super().__init__()
        self.out_features, self.in_features = shifts.shape
        self.integer_bits, self.fraction_bits = integer_bits, fraction_bits
        self.register_buffer("shifts", shifts.to(torch.int32).contiguous())
        self.register_buffer("negate", (sign < 0).to(torch.int32).neg().contiguous())   # -1: negate the product
        self.register_buffer("keep", (sign != 0).to(torch.int32).neg().contiguous())    # 0: a zero weight
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_shift_linear(cls, layer: ShiftLinear) -> "ShiftKernelLinear":
        with torch.no_grad():
            low, _ = layer.shift_range
            shift = layer.shift.clamp(low, 0).round()
            sign = layer.sign.round().sign()
            bias = None if layer.bias is None else round_to_fixed(layer.bias)
        return cls((-shift).to(torch.int32), sign, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        fixed = to_fixed(x.reshape(-1, self.in_features), self.integer_bits, self.fraction_bits)
        out = torch.empty(fixed.shape[0], self.out_features, dtype=torch.int64)
        _set_threads()
        _kernel()(fixed.numpy(), self.shifts.numpy(), self.negate.numpy(), self.keep.numpy(), out.numpy())
        y = out.to(torch.float64).mul_(2.0 ** -self.fraction_bits).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fixed={self.integer_bits}.{self.fraction_bits}"


def shift_kernel_(model: nn.Module) -> int:
    """Replace every `ShiftLinear` in `model` (not inside a mixture of experts) by its `ShiftKernelLinear`, in place,
    for inference; returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is ShiftLinear:
                setattr(module, child_name, ShiftKernelLinear.from_shift_linear(child))
                replaced += 1
    return replaced
