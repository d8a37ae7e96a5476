"""SVT: Scattering Vision Transformer (Patro, Namboodiri, Agneeswaran; NeurIPS 2023, arXiv:2311.01310).

A four-stage hierarchical ViT. In the first stage (`num_spectral_stages`, official alpha = 1) the token mixer is a
spectral scattering layer: a one-level dual-tree complex wavelet transform (DTCWT, near_sym_b filters) splits the
token map into a full-resolution low-pass band and six complex high-pass orientations at half resolution; the
low-pass band is multiplied elementwise by a learnable filter (C, H, W), the high-pass coefficients go through a
two-layer complex MLP over channel blocks (the "Einstein multiplication": block-diagonal complex weights, ReLU on
the real and imaginary parts), and the inverse DTCWT maps both back to tokens. Later stages use global multi-head
attention. Every block is pre-norm with a PVTv2 FFN (fc1 -> depthwise 3x3 conv -> GELU -> fc2). The stem is a
7x7/2 + two 3x3 conv-BN-ReLU stack and a 3x3/2 conv (1/4 resolution); stages are joined by 3x3/2 convs with
LayerNorm. After the last stage a class token (the mean of the tokens) goes through one class-attention block; the
head classifies it and adds half the per-class maximum of a token-labelling head over the patch tokens
(`token_label`, as the official evaluation does).

Official code: github.com/badripatro/svt, `svt.py` (`svt_s`, `svt_b`, `svt_l`), commit
fcbc9b325f5d54f0a2e0fef8f35533240faa03c9. The DTCWT there is `pytorch_wavelets.DTCWTForward(J=1, biort='near_sym_b',
qshift='qshift_b')` and `DTCWTInverse`; at J=1 only the biorthogonal level-1 filters are used (the q-shift filters
start at level 2), and `dtcwt_forward` / `dtcwt_inverse` below reimplement that level as two matrix products each
(one per separable filter pass, the symmetric extension folded into banded matrices: several times faster on a CPU
than the equivalent 19-tap convolutions, at 2.9x their multiply-adds on SVT-S's 56 x 56 grid).

| variant | params (1000 classes) | MACs at 224: here / official counter / README | top-1 (IN-1k, README) |
|---|---|---|---|
| SVT-H-S (`vl_svt_small`, `svt_s`) | 22,052,592 (README 22.0M) | 5.42G / 4.13G / 3.9G | 84.2% |
| SVT-H-B (`vl_svt_base`, `svt_b`) | 32,878,544 (README 32.8M) | 7.97G / 6.53G / 6.3G | 85.2% |
| SVT-H-L (`vl_svt_large`, `svt_l`) | 54,594,000 (README 54.0M) | 16.18G / 13.39G / 12.7G | 85.7% |

Counts include the token-labelling `aux_head` (as the official constructors, `token_label=True`). MACs "here" are
`vitlab.profiling.count_flops`: convs, linears, attention (Q K^T, A V: 0.78G of SVT-H-S), the gating einsums (0.12G)
and the DTCWT's matrix products (0.40G). The official repo's counter (`util/flops_counter.py`, ptflops: module convs, linears,
norms and activations, run here on the official constructors) leaves out the last three; without them the two agree
within 0.3%. The README's figures are lower still.

Differences from the official file, none of which changes the function:

* Any stage-1 width and grid: the official `SVT_channel_mixing` hard-codes its low-pass filter to 56 x 56 (dims 64
  and 96) or 28 x 28 (dims 128 and 192) and has no weights for other widths. Here the filter is sized from
  `img_size` (grid = img_size / 4) and the width is free (`num_blocks` = 4 channel blocks, as official).
  `checkpoint_filter_fn` resizes a checkpoint's low-pass filter (bicubic) when it was trained at another size.
* Unused official arguments are not kept: `sr_ratios` (the attention has no spatial reduction) and `softshrink`
  (0). The paper's token-mixing variant (`SVT_channel_token_mixing`, commented out in the official `Block`) is not
  what the released models run, so it is not built.
* q and kv are one `qkv` Linear in timm's `Attention` (fused SDPA; the converter concatenates them); the class
  block is timm's VOLO `ClassBlock` (same graph, biases on), the FFN timm's PVTv2 `MlpWithDepthwiseConv`; each
  stage's norm belongs to the stage, the last one (applied after the class block) is `norm`.
* The DTCWT filter banks are non-persistent buffers (official: persistent buffers of `xfm` / `ifm`, which the
  converter drops). When gradients flow, each transform is one autograd node (`_LinearMap`, as pytorch_wavelets'
  own Functions; torch-pruning's dependency graph runs for minutes through the unwrapped ops). The scattering runs
  in float32 (as official) and returns the input's dtype; `drop_path_rate` defaults to 0 (official training: 0.1).

Checked against (tests/models/test_zoo_svt.py): pytorch_wavelets 1.3.0's DTCWTForward / DTCWTInverse outputs (a committed
fixture, including a grid smaller than the filters, where the symmetric extension reflects more than once); perfect
reconstruction of the inverse; the official `svt.py` run locally on a tiny configuration (32 x 48 input, scattering
stage + three attention stages, class block, token-labelling head), committed in the official key layout and loaded
through `checkpoint_filter_fn` (logits within 1e-4); exact parameter counts of the three official constructors.
"""
import math
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, DropPath, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.pvt_v2 import MlpWithDepthwiseConv
from timm.models.volo import ClassBlock
from torch.utils.checkpoint import checkpoint

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import StagedTokenModel, tokens_to_map

__all__ = ["SVT", "SpectralScattering", "SVTBlock", "near_sym_b_filters", "dtcwt_forward", "dtcwt_inverse",
           "complex_block_mlp", "checkpoint_filter_fn", "vl_svt_small", "vl_svt_base", "vl_svt_large",
           "vl_test_svt"]


# --- the math: pure tensor functions ----------------------------------------------------------------------

# Kingsbury's near_sym_b level-1 analysis filters (13 and 19 taps), exact: integers over a power-of-two-times-35
# denominator. The synthesis filters follow by alternating signs: g0[n] = (-1)^(n+1) h1[n], g1[n] = (-1)^n h0[n].
_H0_NUM, _H0_DEN = (-9, 0, 114, -240, -247, 1520, 2844, 1520, -247, -240, 114, 0, -9), 5120
_H1_NUM, _H1_DEN = (-81, 0, 1539, -2160, -8208, 27360, 63816, -59280, -343786, 641600, -343786, -59280, 63816,
                    27360, -8208, -2160, 1539, 0, -81), 1146880


def near_sym_b_filters(dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """(h0, h1, g0, g1): the DTCWT level-1 analysis (low, high) and synthesis (low, high) filters, 1-D."""
    h0 = torch.tensor(_H0_NUM, dtype=torch.float64) / _H0_DEN
    h1 = torch.tensor(_H1_NUM, dtype=torch.float64) / _H1_DEN
    g0 = h1 * -(-1.0) ** torch.arange(h1.numel())
    g1 = h0 * (-1.0) ** torch.arange(h0.numel())
    return tuple(f.to(dtype) for f in (h0, h1, g0, g1))


def _filter_pair(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Two odd-length 1-D filters as one (2, K) bank, the shorter zero-padded about its centre, reversed so that
    conv2d's cross-correlation is a convolution."""
    K = max(first.numel(), second.numel())
    return torch.stack([F.pad(f, ((K - f.numel()) // 2,) * 2) for f in (first, second)]).flip(-1)


def _symmetric_index(length: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a half-sample symmetric extension by `pad` on each side (edge samples repeated; reflecting again
    when `pad` exceeds `length`), as pytorch_wavelets' 'symmetric' mode."""
    i = torch.remainder(torch.arange(-pad, length + pad, device=device), 2 * length)
    return torch.where(i >= length, 2 * length - 1 - i, i)


def _filter_matrices(bank: torch.Tensor, length: int) -> torch.Tensor:
    """The 'same'-size cross-correlation of a length-`length` signal with each row of `bank` (F, K; reversed filters,
    as `_filter_pair` gives them, so a convolution with the filters), with half-sample symmetric extension
    (pytorch_wavelets' 'symmetric' mode), as matrices M (F, length, length): out = x @ M[f].

    Taps that the extension reflects onto one sample add up, so a grid shorter than the filters is exact too."""
    n, K = bank.shape
    index = _symmetric_index(length, K // 2, bank.device)
    out = torch.arange(length, device=bank.device)
    src = index[out[:, None] + torch.arange(K, device=bank.device)]  # (length, K): input sample under each tap
    which = torch.arange(n, device=bank.device)[:, None, None].expand(n, length, K)
    M = bank.new_zeros(n, length, length)
    M.index_put_((which, src.expand(n, -1, -1), out[None, :, None].expand(n, length, K)),
                 bank[:, None, :].expand(n, length, K), accumulate=True)
    return M


def dtcwt_matrices(f0: torch.Tensor, f1: torch.Tensor, H: int, W: int,
                   inverse: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The separable filter pair (f0, f1) on an H x W grid as two matrices (`rows`, `cols`).

    Analysis (h0, h1): rows (W, 2W) = [M0 | M1] and cols (2H, H) = [M0^T; M1^T], so that cols @ x @ rows is
    [[ll, hl], [lh, hh]]. Synthesis (g0, g1, `inverse=True`): rows (2W, W) = [M0; M1] and cols (H, 2H) =
    [M0^T | M1^T], so that cols @ [[ll, hl], [lh, hh]] @ rows sums the four filtered bands.
    """
    bank = _filter_pair(f0, f1)
    mw, mh = _filter_matrices(bank, W), _filter_matrices(bank, H).transpose(1, 2)
    if inverse:
        return mw.flatten(0, 1), mh.transpose(0, 1).flatten(1)
    return mw.transpose(0, 1).flatten(1), mh.flatten(0, 1)


def dtcwt_forward(x: torch.Tensor, h0: torch.Tensor, h1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One-level 2-D DTCWT of x (B, C, H, W), H and W even, as pytorch_wavelets' `DTCWTForward(J=1)`.

    Returns the low-pass band (B, C, H, W) and the high-pass coefficients (B, C, 6, H/2, W/2, 2): orientations 15,
    45, 75, 105, 135, 165 degrees, real and imaginary parts last. The two separable filter passes are two matrix
    products with the filters' banded matrices (`dtcwt_matrices`): on a CPU, GEMMs run these 1-channel 19-tap
    filters several times faster than conv2d, though their multiply-adds grow with the grid (2.9x the
    convolutions' on a 56 x 56 grid, 0.84x on 16 x 16).
    """
    B, C, H, W = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"dtcwt_forward needs an even grid, got {H} x {W}")
    rows, cols = dtcwt_matrices(h0, h1, H, W)
    z = torch.matmul(cols, torch.matmul(x, rows))  # (B, C, 2H, 2W): [[ll, hl], [lh, hh]] (rows' band second)
    low = z[..., :H, :W]
    quads = torch.stack([z[..., H:, :W], z[..., :H, W:], z[..., H:, W:]], dim=2) / math.sqrt(2)  # lh, hl, hh
    a, b = quads[..., 0::2, 0::2], quads[..., 0::2, 1::2]
    c, d = quads[..., 1::2, 0::2], quads[..., 1::2, 1::2]  # each (B, C, 3, H/2, W/2)
    # bands (lh, hl, hh): (a - d, b + c) is 15, 75, 45 degrees, (a + d, b - c) their mirrors 165, 105, 135
    real = torch.cat([(a - d)[:, :, [0, 2, 1]], (a + d)[:, :, [1, 2, 0]]], dim=2)  # (B, C, 6, H/2, W/2)
    imag = torch.cat([(b + c)[:, :, [0, 2, 1]], (b - c)[:, :, [1, 2, 0]]], dim=2)
    return low, torch.stack([real, imag], dim=-1)


def dtcwt_inverse(low: torch.Tensor, highs: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor) -> torch.Tensor:
    """Inverse of `dtcwt_forward`: low (B, C, H, W) and highs (B, C, 6, H/2, W/2, 2) -> (B, C, H, W)."""
    B, C, H, W = low.shape
    real, imag = highs.unbind(-1)  # (B, C, 6, H/2, W/2)
    w1r, w1i = real[:, :, [0, 2, 1]], imag[:, :, [0, 2, 1]]  # 15, 75, 45 degrees: lh, hl, hh
    w2r, w2i = real[:, :, [5, 3, 4]], imag[:, :, [5, 3, 4]]  # 165, 105, 135 degrees
    a, b, c, d = ((t / math.sqrt(2)) for t in (w1r + w2r, w1i + w2i, w1i - w2i, w2r - w1r))
    top, bottom = torch.stack([a, b], dim=-1), torch.stack([c, d], dim=-1)  # (B, C, 3, H/2, W/2, 2)
    quads = torch.stack([top, bottom], dim=-3).reshape(B, C, 3, H, W)  # rows interleaved, then columns
    rows, cols = dtcwt_matrices(g0, g1, H, W, inverse=True)
    # [[ll, hl], [lh, hh]] -> columns: [ll g0 + lh g1 | hl g0 + hh g1] -> rows: (.. g0) + (.. g1)
    z = torch.cat([torch.cat([low, quads[:, :, 1]], dim=-1), torch.cat([quads[:, :, 0], quads[:, :, 2]], dim=-1)],
                  dim=-2)  # (B, C, 2H, 2W)
    return torch.matmul(torch.matmul(cols, z), rows)


def _complex_as_real(weight: torch.Tensor) -> torch.Tensor:
    """Complex block weights (2, n, d, k) (real, imaginary) -> (n, 2d, 2k): the same map on [real | imag] vectors."""
    w_re, w_im = weight
    return torch.cat([torch.cat([w_re, w_im], dim=-1), torch.cat([-w_im, w_re], dim=-1)], dim=-2)


def complex_block_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                      b2: torch.Tensor) -> torch.Tensor:
    """SVT's Einstein-multiplication gating: per channel block, z -> W2 relu(W1 z + b1) + b2 with complex W, b and
    the ReLU on the real and imaginary parts separately.

    x (..., n, 2, d) holds real and imaginary parts of n blocks of d channels; w (2, n, d, d), b (2, n, d).
    """
    z = x.flatten(-2)  # (..., n, 2d): [real | imag]
    z = F.relu(torch.einsum("...nd,ndk->...nk", z, _complex_as_real(w1)) + b1.transpose(0, 1).flatten(-2))
    z = torch.einsum("...nd,ndk->...nk", z, _complex_as_real(w2)) + b2.transpose(0, 1).flatten(-2)
    return z.unflatten(-1, (2, -1))


# --- modules ----------------------------------------------------------------------------------------------

class _LinearMap(torch.autograd.Function):
    """A parameter-free linear map (the DTCWT or its inverse) as one autograd node; its vector-Jacobian product is
    recomputed in backward from zero inputs (linear: it does not depend on them), so nothing is saved.

    The transform's own graph (symmetric-extension gathers, quad slicing, interleaving) is exact but large, and
    torch-pruning's dependency graph, which follows every node to group channels, runs for minutes on it; as one
    node it is what it is, a map that keeps channels apart. (pytorch_wavelets wraps its transforms the same way.)
    """

    @staticmethod
    def forward(ctx, fn, num_inputs: int, *tensors: torch.Tensor):
        ctx.fn, ctx.num_inputs, ctx.filters = fn, num_inputs, tensors[num_inputs:]
        ctx.specs = [(t.shape, t.dtype, t.device) for t in tensors[:num_inputs]]
        return fn(*tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        with torch.enable_grad():
            inputs = [torch.zeros(s, dtype=d, device=v, requires_grad=True) for s, d, v in ctx.specs]
            outputs = ctx.fn(*inputs, *ctx.filters)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            input_grads = torch.autograd.grad(outputs, inputs, grads)
        return (None, None, *input_grads, *(None,) * len(ctx.filters))


def _one_node(fn, num_inputs: int, *tensors: torch.Tensor):
    """fn(*tensors), through `_LinearMap` where gradients flow to the first `num_inputs` tensors."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors[:num_inputs]):
        return _LinearMap.apply(fn, num_inputs, *tensors)
    return fn(*tensors)



class SpectralScattering(nn.Module):
    """SVT's scattering token mixer on (B, H*W, C) tokens: DTCWT, a learnable filter on the low-pass band, complex
    channel-block MLP on the high-pass coefficients, inverse DTCWT."""

    def __init__(self, dim: int, grid_size: Tuple[int, int], num_blocks: int = 4):
        super().__init__()
        if dim % num_blocks:
            raise ValueError(f"dim {dim} must split into num_blocks={num_blocks} channel blocks")
        if grid_size[0] % 2 or grid_size[1] % 2:
            raise ValueError(f"the DTCWT needs an even token grid, got {grid_size}; choose img_size a multiple of 8")
        self.num_blocks, self.block_size = num_blocks, dim // num_blocks
        bs = self.block_size
        self.complex_weight_ll = nn.Parameter(torch.randn(dim, *grid_size) * 0.02)
        self.complex_weight_lh_1 = nn.Parameter(torch.randn(2, num_blocks, bs, bs) * 0.02)
        self.complex_weight_lh_2 = nn.Parameter(torch.randn(2, num_blocks, bs, bs) * 0.02)
        self.complex_weight_lh_b1 = nn.Parameter(torch.randn(2, num_blocks, bs) * 0.02)
        self.complex_weight_lh_b2 = nn.Parameter(torch.randn(2, num_blocks, bs) * 0.02)
        for name, taps in zip(("h0", "h1", "g0", "g1"), near_sym_b_filters(torch.float32)):
            self.register_buffer(name, taps, persistent=False)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = hw
        if (H, W) != tuple(self.complex_weight_ll.shape[1:]):
            raise ValueError(f"SVT's low-pass filter is sized for a {tuple(self.complex_weight_ll.shape[1:])} token "
                             f"grid, got {H} x {W}: build the model with the input's img_size")
        n, d = self.num_blocks, self.block_size
        grid = x.float().transpose(1, 2).reshape(B, C, H, W)
        low, highs = _one_node(dtcwt_forward, 1, grid, self.h0, self.h1)  # (B, C, H, W), (B, C, 6, H/2, W/2, 2)
        low = low * self.complex_weight_ll
        z = highs.permute(0, 2, 3, 4, 1, 5).reshape(B, 6, H // 2, W // 2, n, d, 2).transpose(-1, -2)  # (.., n, 2, d)
        z = complex_block_mlp(z, self.complex_weight_lh_1, self.complex_weight_lh_b1, self.complex_weight_lh_2,
                              self.complex_weight_lh_b2)
        highs = z.transpose(-1, -2).reshape(B, 6, H // 2, W // 2, C, 2).permute(0, 4, 1, 2, 3, 5)
        out = _one_node(dtcwt_inverse, 2, low, highs, self.g0, self.g1)  # (B, C, H, W)
        return out.flatten(2).transpose(1, 2).to(x.dtype)


class SVTBlock(nn.Module):
    """x += mixer(LN(x)); x += PVTv2 FFN(LN(x)); the mixer is the scattering layer or global MHSA."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid_size: Optional[Tuple[int, int]] = None,
                 num_blocks: int = 4, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6)):
        """`grid_size` given: a scattering block for that token grid; None: an attention block."""
        super().__init__()
        self.spectral = grid_size is not None
        self.norm1 = norm_layer(dim)
        self.attn = (SpectralScattering(dim, grid_size, num_blocks) if self.spectral else
                     Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop))
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = MlpWithDepthwiseConv(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.drop_path1(self.attn(y, hw) if self.spectral else self.attn(y))
        return x + self.drop_path2(self.mlp(self.norm2(x), hw))


class Stem(nn.Module):
    """7x7/2 conv, two 3x3 convs (BN + ReLU after each), 3x3/2 conv, LayerNorm: image -> tokens at 1/4."""

    def __init__(self, in_chans: int, hidden_dim: int, dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, 7, 2, 3, bias=False), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True))
        self.proj = nn.Conv2d(hidden_dim, dim, 3, 2, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(self.conv(x))
        return self.norm(x.flatten(2).transpose(1, 2)), tuple(x.shape[-2:])  # (B, H*W, C)


class Downsample(nn.Module):
    """3x3/2 conv + LayerNorm: (B, C, H, W) -> tokens (B, H/2 * W/2, C')."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), tuple(x.shape[-2:])


class SVTStage(nn.Module):
    """Patch embedding (stem or downsampler), blocks, LayerNorm (Identity for the last stage, whose norm follows the
    class block). NCHW in; tokens (B, H*W, C) and (H, W) out."""

    num_prefix_tokens = 0

    def __init__(self, patch_embed: nn.Module, blocks: Sequence[SVTBlock], norm: nn.Module):
        super().__init__()
        self.patch_embed = patch_embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, hw = self.patch_embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, hw, use_reentrant=False)
            else:
                x = block(x, hw)
        return self.norm(x), hw


class SVT(StagedTokenModel):
    """SVT classifier: scattering stage(s), attention stages, class-attention block, class + token-label heads."""

    family_name = "SVT"
    stem_pattern = r"^stages\.0\.patch_embed"

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            stem_hidden_dim: int = 32,
            embed_dims: Sequence[int] = (64, 128, 320, 448),
            num_heads: Sequence[int] = (2, 4, 10, 14),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            depths: Sequence[int] = (3, 4, 6, 3),
            num_spectral_stages: int = 1,
            num_blocks: int = 4,
            token_label: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_eps: float = 1e-6,
    ):
        """`img_size` sizes the scattering stages' low-pass filters (token grid img_size / 4, / 8, ...; even);
        `num_blocks`: channel blocks of the high-pass gating; `token_label`: the token-labelling head, whose
        per-class maximum over the patch tokens is added at half weight (official evaluation)."""
        super().__init__()
        per_stage = (embed_dims, num_heads, mlp_ratios, depths)
        if len({len(s) for s in per_stage}) != 1:
            raise ValueError("embed_dims, num_heads, mlp_ratios and depths need one entry per stage, got lengths "
                             f"{[len(s) for s in per_stage]}")
        self.num_classes = num_classes
        self.token_label = token_label
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        grid = tuple(-(-s // 4) for s in to_2tuple(img_size))  # the stem's two stride-2 convs round up
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        for i, dim in enumerate(embed_dims):
            embed = Stem(in_chans, stem_hidden_dim, dim) if i == 0 else Downsample(embed_dims[i - 1], dim)
            blocks = [SVTBlock(dim, num_heads[i], mlp_ratios[i], grid if i < num_spectral_stages else None,
                               num_blocks, proj_drop_rate, attn_drop_rate, dpr[i][j], norm_layer)
                      for j in range(depths[i])]
            last = i == len(embed_dims) - 1
            stages.append(SVTStage(embed, blocks, nn.Identity() if last else norm_layer(dim)))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
            grid = tuple(-(-s // 2) for s in grid)
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.post_network = nn.ModuleList([ClassBlock(embed_dims[-1], num_heads[-1], mlp_ratio=mlp_ratios[-1],
                                                      qkv_bias=True, norm_layer=norm_layer)])
        self.norm = norm_layer(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(self.num_features, num_classes) if token_label and num_classes > 0 else None
        self._check_pool(global_pool)
        self.global_pool = global_pool
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def num_prefix_tokens(self) -> int:
        return int(len(self.post_network) > 0)  # the class token that the class block prepends

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        like = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else next(self.parameters())
        self.aux_head = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
                         if self.token_label and num_classes > 0 else None)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs as NCHW maps; `norm` applies the final LayerNorm to the last stage's. Returns the
        intermediates, or (what `forward_features` returns, intermediates)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: SVT intermediates are 'NCHW' only")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            tokens, hw = stage(x)
            x = tokens_to_map(tokens, hw, 0)
            if i in take_indices:
                last = i == len(self.stages) - 1
                intermediates.append(tokens_to_map(self.norm(tokens), hw, 0) if norm and last else x)
        if intermediates_only:
            return intermediates
        return (self._head_tokens(tokens) if len(stages) == len(self.stages) else tokens), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if max_index < len(self.stages) - 1:
            self.stages = self.stages[:max_index + 1]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_norm = prune_head = True  # the class block, norm and heads were sized for the last stage
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.post_network = nn.ModuleList()
            self.reset_classifier(0, "")
        return take_indices

    def _head_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last stage's tokens -> [class token (their mean, after the class block), tokens], normalised."""
        if len(self.post_network):
            tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, 1 + H*W, C)
            for block in self.post_network:
                tokens = block(tokens)
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages[:-1]:
            tokens, hw = stage(x)
            x = tokens_to_map(tokens, hw, 0)
        tokens, _ = self.stages[-1](x)
        return self._head_tokens(tokens)  # (B, 1 + H*W, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            out = x[:, 0]
        elif self.global_pool == "avg":
            out = x[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            out = x
        out = self.head_drop(out)
        if pre_logits:
            return out
        out = self.head(out)
        if self.aux_head is not None and self.global_pool:
            # token labelling: each class also scores its best patch token, at half weight
            out = out + 0.5 * self.aux_head(x[:, self.num_prefix_tokens:]).amax(dim=1)
        return out


# --- converter --------------------------------------------------------------------------------------------

def _resize_low_pass(weight: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(C, h, w) low-pass filter -> (C, *grid), bicubic with align_corners."""
    if tuple(weight.shape[1:]) == tuple(grid):
        return weight
    return F.interpolate(weight[None].float(), size=grid, mode="bicubic", align_corners=True)[0].to(weight.dtype)


def checkpoint_filter_fn(state_dict: dict, model: SVT) -> dict:
    """Official SVT state dict (`patch_embed{i}`, `block{i}`, `norm{i}`, `attn.q` / `attn.kv`, DTCWT buffers) ->
    vitlab's layout; low-pass filters are resized to the model's grid. Accepts {"model": ...} wrappers."""
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    num_stages = len(model.stages)
    out, qkv = {}, {}
    for key, value in state_dict.items():
        stage, rest = None, key
        for prefix in ("patch_embed", "block", "norm"):
            if key.startswith(prefix) and key[len(prefix)].isdigit():
                index, rest = key[len(prefix):].split(".", 1)
                stage = int(index) - 1
                if prefix == "norm":
                    key = f"stages.{stage}.norm.{rest}" if stage < num_stages - 1 else f"norm.{rest}"
                elif prefix == "patch_embed":
                    key = f"stages.{stage}.patch_embed.{rest}"
                else:
                    key = f"stages.{stage}.blocks.{rest}"
                break
        if ".attn.xfm." in key or ".attn.ifm." in key:
            continue  # DTCWT filter buffers: fixed constants
        if key.endswith(("attn.q.weight", "attn.q.bias", "attn.kv.weight", "attn.kv.bias")) and stage is not None:
            base, which, param = key.rsplit(".", 2)
            qkv.setdefault(f"{base}.qkv.{param}", {})[which] = value
            continue
        key = key.replace("mlp.dwconv.dwconv.", "mlp.dwconv.")
        out[key] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["kv"]], dim=0)
    for name, module in model.named_modules():
        if isinstance(module, SpectralScattering) and f"{name}.complex_weight_ll" in out:
            out[f"{name}.complex_weight_ll"] = _resize_low_pass(out[f"{name}.complex_weight_ll"],
                                                                module.complex_weight_ll.shape[1:])
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"crop_pct": 0.96, "first_conv": "stages.0.patch_embed.conv.0",
                           "classifier": ("head", "aux_head"), "license": "unknown", "paper_ids": "arXiv:2311.01310",
                           **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_svt_small": _cfg(),
    "vl_svt_base": _cfg(),
    "vl_svt_large": _cfg(),
    "vl_test_svt": _cfg(input_size=(3, 64, 64), num_classes=10),
})


def _create_svt(variant: str, pretrained: bool = False, **kwargs) -> SVT:
    return build_vitlab_model(SVT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (3, 4, 6, 3))))), **kwargs)


@register_model
def vl_svt_small(pretrained: bool = False, **kwargs) -> SVT:
    """SVT-H-S (`svt_s`): 22,052,592 params, 5.42 GMACs at 224 (README 22.0M / 3.9G), 84.2% top-1 (IN-1k)."""
    arch = dict(stem_hidden_dim=32, embed_dims=(64, 128, 320, 448), num_heads=(2, 4, 10, 14),
                mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 6, 3))
    return _create_svt("vl_svt_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_svt_base(pretrained: bool = False, **kwargs) -> SVT:
    """SVT-H-B (`svt_b`): 32,878,544 params, 7.97 GMACs at 224 (README 32.8M / 6.3G), 85.2% top-1 (IN-1k)."""
    arch = dict(stem_hidden_dim=64, embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16),
                mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 12, 3))
    return _create_svt("vl_svt_base", pretrained, **dict(arch, **kwargs))


@register_model
def vl_svt_large(pretrained: bool = False, **kwargs) -> SVT:
    """SVT-H-L (`svt_l`): 54,594,000 params, 16.18 GMACs at 224 (README 54.0M / 12.7G), 85.7% top-1 (IN-1k)."""
    arch = dict(stem_hidden_dim=64, embed_dims=(96, 192, 384, 512), num_heads=(3, 6, 12, 16),
                mlp_ratios=(8, 8, 4, 4), depths=(3, 6, 18, 3))
    return _create_svt("vl_svt_large", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_svt(pretrained: bool = False, **kwargs) -> SVT:
    """Tiny SVT for tests: widths 32-64, one block per stage (one scattering, three attention), 64 px."""
    arch = dict(img_size=64, stem_hidden_dim=16, embed_dims=(32, 32, 64, 64), num_heads=(1, 2, 4, 4),
                mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1), num_classes=10)
    return _create_svt("vl_test_svt", pretrained, **dict(arch, **kwargs))
