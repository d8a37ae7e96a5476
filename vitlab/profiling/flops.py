"""FLOP counting on top of `torch.utils.flop_counter.FlopCounterMode`, with attention and FFTs counted.

Stock `FlopCounterMode` (torch 2.14) counts matmuls and convolutions, plus the CUDA SDPA kernels, but gives zero
for several ops a ViT hits on CPU:

* `aten._scaled_dot_product_flash_attention_for_cpu` (+ `_backward`): what `F.scaled_dot_product_attention` (and so
  every timm `Attention` with `fused_attn`) runs on CPU,
* `aten._scaled_dot_product_fused_attention_overrideable` (+ `_backward`): the SDPA entry point of out-of-tree
  backends, and `aten._scaled_dot_product_attention_math_for_mps`,
* `aten._native_multi_head_attention` and `aten._transformer_encoder_layer_fwd`: the fused fast paths that
  `nn.MultiheadAttention` / `nn.TransformerEncoderLayer` take in eval mode under `no_grad`,
* `aten._fft_r2c`, `aten._fft_c2r`, `aten._fft_c2c`: every `torch.fft` transform (spectral token mixers),
* `aten.grid_sampler_2d` (+ `_backward`): `F.grid_sample`, the sampling of multi-scale deformable attention
  (vitlab.dense.msda).

`count_flops` registers formulas for them through `FlopCounterMode(custom_mapping=...)`, reusing torch's own
`sdpa_flop_count` / `sdpa_backward_flop_count`, so fused and math attention give the same count.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["FlopCount", "count_flops", "sdpa_math_backend", "fft_macs"]

aten = torch.ops.aten

# Ops whose whole count is attention (torch's own registrations and ours); matched on the op name.
_SDPA_NAME_PARTS = ("scaled_dot_product", "flash_attention", "efficient_attention", "flex_attention")
# Batched matmuls that make up attention when it runs unfused (math SDPA backend, hand-written q @ k.T), and the
# value sampling of deformable attention (grid_sample inside MSDeformAttn).
_ATTN_MATMUL_OPS = ("aten.bmm", "aten.baddbmm", "aten.grid_sampler_2d", "aten.grid_sampler_2d_backward")


@dataclass(frozen=True)
class FlopCount:
    """Multiply-accumulates of one call, in total, in attention, and per aten op."""
    macs: int  # multiply-accumulates (what papers usually call "FLOPs")
    flops: int  # = 2 * macs
    attention_macs: int  # SDPA-style ops, plus bmm/baddbmm run inside attention modules (math path)
    by_op: dict[str, int]  # macs per aten op name, e.g. "aten.addmm"

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def sdpa_math_backend() -> contextlib.AbstractContextManager:
    """Force `F.scaled_dot_product_attention` onto its math backend (attention decomposes into bmm + softmax)."""
    return sdpa_kernel(SDPBackend.MATH)


# --- formulas: FlopCounterMode formulas take shapes (not tensors) and return FLOPs (= 2 * MACs) ---------------

def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward SDPA ops whose first three arguments are q (B,H,N,d), k (B,Hkv,M,d), v (B,Hkv,M,dv)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Backward SDPA ops whose first four arguments are grad_out, q, k, v."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def fft_macs(signal_shape, dims, batch: int) -> int:
    """Real MACs of `batch` FFTs over `dims` of `signal_shape`: 2.5 * n * log2(n) each, n = prod(transformed sizes).

    This is the usual 5 n log2 n FLOPs convention (radix-2 Cooley-Tukey on complex data), applied as-is to real
    (r2c / c2r) transforms, where n is the length of the real signal. A d-dimensional transform of n1 x ... x nd
    costs the same as n = n1 * ... * nd in one dimension, since log2(n) = log2(n1) + ... + log2(nd).
    """
    n = math.prod(signal_shape[d % len(signal_shape)] for d in dims)
    if n <= 1:
        return 0
    return round(2.5 * n * math.log2(n) * batch)


def _fft_flop(signal_shape, dims) -> int:
    n = math.prod(signal_shape[d % len(signal_shape)] for d in dims)
    batch = math.prod(signal_shape) // max(n, 1)
    return 2 * fft_macs(signal_shape, dims, batch)


def _fft_r2c_flop(self_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return _fft_flop(self_shape, dim)  # real input holds the full-length signal


def _fft_c2r_flop(self_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return _fft_flop(out_shape, dim)  # real output holds the full-length signal (input is one-sided)


def _fft_c2c_flop(self_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return _fft_flop(self_shape, dim)


# grid_sample's interpolation_mode: 0 bilinear (4 corners), 1 nearest (a copy), 2 bicubic (4 x 4 taps)
_GRID_SAMPLE_TAPS = {0: 4, 1: 0, 2: 16}


def _grid_sampler_flop(input_shape, grid_shape, interpolation_mode, *args, out_shape=None, **kwargs) -> int:
    """One MAC per interpolation tap of every output value: N * C * H_out * W_out * taps."""
    return 2 * math.prod(out_shape) * _GRID_SAMPLE_TAPS.get(interpolation_mode, 4)


def _grid_sampler_backward_flop(grad_out_shape, input_shape, grid_shape, interpolation_mode, padding_mode,
                                align_corners, output_mask, *args, out_shape=None, **kwargs) -> int:
    """The gradient to the input scatters each output gradient to the taps (taps MACs per value); the gradient to
    the grid differentiates the taps along x and y (2 x taps MACs per value)."""
    per_value = _GRID_SAMPLE_TAPS.get(interpolation_mode, 4) * (int(output_mask[0]) + 2 * int(output_mask[1]))
    return 2 * math.prod(grad_out_shape) * per_value


def _mha_macs(batch: int, len_q: int, len_kv: int, embed_dim: int) -> tuple[int, int]:
    """(projection MACs, attention MACs) of multi-head attention with packed in/out projections."""
    proj = batch * len_q * embed_dim * embed_dim * 2 + batch * len_kv * embed_dim * embed_dim * 2  # q, out; k, v
    attn = 2 * batch * len_q * len_kv * embed_dim  # q @ k.T and attn @ v, summed over heads
    return proj, attn


def _fused_mha_mapping(attention_flops: list[int]) -> dict:
    """Formulas for nn.MultiheadAttention / nn.TransformerEncoderLayer fast paths; they add attention to the tally."""

    def native_mha_flop(query_shape, key_shape, value_shape, embed_dim, *args, out_shape=None, **kwargs) -> int:
        batch, len_q, _ = query_shape  # the fast path is batch-first: (B, L, E)
        proj, attn = _mha_macs(batch, len_q, key_shape[1], embed_dim)
        attention_flops[0] += 2 * attn
        return 2 * (proj + attn)

    def encoder_layer_flop(src_shape, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
        batch, seq_len, _ = src_shape
        ffn_weight_1_shape = args[11]  # after qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first,
        ffn_hidden = ffn_weight_1_shape[0]  # eps and the 4 norm params; it is (hidden, embed_dim)
        proj, attn = _mha_macs(batch, seq_len, seq_len, embed_dim)
        attention_flops[0] += 2 * attn
        return 2 * (proj + attn + 2 * batch * seq_len * embed_dim * ffn_hidden)

    return {
        aten._native_multi_head_attention: native_mha_flop,
        aten._transformer_encoder_layer_fwd: encoder_layer_flop,
    }


def _custom_mapping(attention_flops: list[int]) -> dict:
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flop,
        aten._scaled_dot_product_fused_attention_overrideable: _sdpa_flop,
        aten._scaled_dot_product_fused_attention_overrideable_backward: _sdpa_backward_flop,
        aten._scaled_dot_product_attention_math_for_mps: _sdpa_flop,
        aten._fft_r2c: _fft_r2c_flop,
        aten._fft_c2r: _fft_c2r_flop,
        aten._fft_c2c: _fft_c2c_flop,
        aten.grid_sampler_2d: _grid_sampler_flop,
        aten.grid_sampler_2d_backward: _grid_sampler_backward_flop,
    }
    mapping.update(_fused_mha_mapping(attention_flops))
    return mapping


# --- attribution ----------------------------------------------------------------------------------------------

def _is_attention_module(module: nn.Module) -> bool:
    """timm / torch naming: Attention, WindowAttention, ClassAttn, TalkingHeadAttn, MultiheadAttention, ..."""
    name = type(module).__name__.lower()
    return "attention" in name or "attn" in name


def _attention_matmul_flops(model: nn.Module, counts: dict[str, dict]) -> int:
    """FLOPs of bmm/baddbmm run inside the outermost attention modules of `model` (FlopCounterMode's per-module view).

    FlopCounterMode names modules like its ModuleTracker does: the root's class name, then the attribute path.
    """
    root = type(model).__name__
    modules = {(f"{root}.{n}" if n else root): m for n, m in model.named_modules(remove_duplicate=False)}
    attention_names = {n for n, m in modules.items() if _is_attention_module(m)}
    total = 0
    for name in attention_names:
        parts = name.split(".")
        if any(".".join(parts[:i]) in attention_names for i in range(1, len(parts))):
            continue  # nested in another attention module: already counted there
        total += sum(v for op, v in counts.get(name, {}).items() if str(op) in _ATTN_MATMUL_OPS)
    return total


# --- counting -------------------------------------------------------------------------------------------------

def _as_args(inputs) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise TypeError(f"count_flops: inputs must be a Tensor or a tuple of model arguments, got {type(inputs).__name__}")


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _backward_of_outputs(out) -> None:
    leaves = [t for t in _tensors(out) if t.requires_grad]
    if not leaves:
        raise RuntimeError("count_flops(backward=True): no model output requires grad; "
                           "check that the model has trainable parameters (requires_grad=True)")
    sum(t.float().sum() for t in leaves).backward()


@contextlib.contextmanager
def _restore_state(model: nn.Module, args: tuple, backward: bool):
    """Put back buffers (e.g. BatchNorm statistics), grads and the RNG after a counting run."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grad_holders = [t for t in (*model.parameters(), *args) if isinstance(t, torch.Tensor) and t.is_leaf
                    and t.requires_grad]
    grads = [t.grad for t in grad_holders] if backward else []
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *args)
                   if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    if not torch.equal(b, saved):  # skip untouched ones (inference tensors can't be written)
                        b.copy_(saved)
            for t, g in zip(grad_holders, grads):
                t.grad = g


@contextlib.contextmanager
def frozen_params(model):
    """Parameters stop requiring grad inside (forward-only counting): torch's module tracker, which FlopCounterMode
    uses, trips over no-grad views of them passed between modules ("Expected gradient function to be set": timm's
    attention-pool latent)."""
    frozen = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def per_module_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, dict[str, int]]:
    """(total MACs, {module name: MACs of its calls, children included; "" for the model}) of `model(example)`
    under no_grad, attention and SDPA counted; a module that ran no counted op is absent."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping([0]))
    with torch.no_grad(), frozen_params(model), counter:
        model(example)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out = {}
    for key, ops in counts.items():
        name = "" if key == root else key[len(root) + 1:] if key.startswith(root + ".") else None
        if name is not None:
            out[name] = sum(ops.values()) // 2
    return sum(counts.get("Global", {}).values()) // 2, out


def count_flops(model: nn.Module, inputs: torch.Tensor | tuple, *, backward: bool = False) -> FlopCount:
    """Count MACs of `model(*inputs)` (plus the backward of sum(outputs) if `backward`), attention and FFTs included.

    The model runs once, in its current train/eval mode and on its current device, under `torch.no_grad()` unless
    `backward`. Buffers, parameter grads and the RNG state are restored afterwards.

    Conventions: one MAC per multiply-add of a matmul/conv (FLOPs = 2 * MACs; bias adds, norms, activations and
    softmax are not counted, as in papers and fvcore). SDPA with q (B,H,N,d), k (B,H,M,d), v (B,H,M,dv) is
    B*H*N*M*(d + dv) MACs whatever the backend, masks and causality ignored. An FFT over n = prod(transformed sizes)
    points is 2.5 * n * log2(n) MACs per transformed vector (5 n log2 n FLOPs), for r2c, c2r and c2c alike, n being
    the real signal length for r2c/c2r. Bilinear `grid_sample` is 4 MACs per output value (bicubic 16, nearest 0).
    `attention_macs` is the SDPA-style ops, plus the attention part of the fused nn.MultiheadAttention /
    nn.TransformerEncoderLayer ops, plus bmm/baddbmm/grid_sample executed inside modules whose class name contains
    "Attention" or "Attn" (how attention shows up on the math backend, in hand-written code, and in deformable
    attention).
    """
    args = _as_args(inputs)
    fused_attention_flops = [0]  # tally the fused-MHA formulas add their attention part to
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping(fused_attention_flops))
    grad_mode = torch.enable_grad() if backward else torch.no_grad()
    with _restore_state(model, args, backward), grad_mode, (contextlib.nullcontext() if backward else
                                                           frozen_params(model)), counter:
        out = model(*args)
        if backward:
            _backward_of_outputs(out)

    counts = counter.get_flop_counts()
    by_op = {str(op): flops // 2 for op, flops in counts.get("Global", {}).items()}
    attention_macs = (sum(v for op, v in by_op.items() if any(p in op for p in _SDPA_NAME_PARTS))
                      + (fused_attention_flops[0] + _attention_matmul_flops(model, counts)) // 2)
    macs = sum(by_op.values())
    return FlopCount(macs=macs, flops=2 * macs, attention_macs=attention_macs, by_op=by_op)
