"""Hyena N-D (2-D for images): a ViT whose first blocks mix tokens with a multi-axis Hyena operator, not attention.

Paper: "Multi-Dimensional Hyena for Spatial Inductive Bias" (Itamar Zimerman, Lior Wolf), AISTATS 2024 (PMLR
238:973-981), arXiv:2309.13600. The code was attached to the submission as supplementary material; no public
repository was found, so nothing here is checked against code (no official commit, no official checkpoint layout).
The 1-D operator it generalises is Hyena (Poli et al., ICML 2023, arXiv:2302.10866); where the readable N-D text is
silent, the defaults of the 1-D Hyena operator are used.

What the paper says (abstract and introduction; the method section, its tables and its configurations were NOT
readable here): the Hyena layer is generalised to several axes: implicit long-convolution filters whose values are an
MLP of the N-D position, applied with an N-D FFT, interleaved with multiplicative (data-controlled) gating; it replaces
self-attention in ViT / DeiT / Swin and is data-efficient; a hybrid with Hyena N-D in the first layers and attention
in the later ones is consistently better.

The operator (`HyenaND`, order 2 as Hyena's default), on a (B, H, W, C) grid of tokens:

    x0, x1, v = dwconv3x3(in_proj(u)).split(C)            # short depthwise filter, as Hyena's short conv
    v = fftconv2d(v * x1, h) + v * x1 * bias              # h: (C, 2H-1, 2W-1) implicit filter, bias: skip term
    y = out_proj(v * x0)

`fftconv2d` is a zero-padded (linear, non-circular) 2-D convolution with a centred filter, by FFT with period
(2H-1, 2W-1), the smallest at which none of the H x W outputs wraps around: every token sees every token, h[dy, dx]
weights the offset (dy, dx) in [-(H-1), H-1] x [-(W-1), W-1]. The filter is h = FFN(PE(dy, dx)) * window(dy, dx):
PE concatenates, per axis, the offset normalised to [-1, 1] and `num_bands` sin/cos bands of it (Hyena's positional
features); the FFN is Linear-Sin-Linear-Sin-Linear-Sin-Linear(no bias) of width `filter_order`, one learned Sin
frequency per width (Hyena's implicit filter); the window is Hyena's exponential modulation applied per axis,
exp(-|delta_c| (|t_y| + |t_x|)), with Hyena's per-channel decays (fast 0.3, slow 1.5, target 1e-2). The filter is a
function of positions, evaluated for whatever grid comes in: any input size works (the position embedding is
resampled, bicubic). The FFN's weights are plain parameters applied with F.linear: it generates weights from the fixed
position grid and is no data-path layer, so quantization keeps it float (an int8 OpenVINO engine folds it to a
constant; as nn.Linear layers they made OpenVINO's CPU plugin fail to compile the w8 model with a dynamic batch).

Checked (tests/models/test_zoo_hyena_nd.py): FFT convolution == direct zero-padded conv2d (atol 1e-5) and not circular;
the filter of a grid equals the filter of a finer grid at the shared offsets; the operator == its formula with a
direct convolution; one operator reaches the whole grid (and only the 3x3 short filter's neighbours without the long
filter); parameter counts == the closed-form formula; FFT MACs == 3 transforms x 2.5 n log2 n per channel and block.

Assumptions where the readable text is silent: 2-D filter as one MLP over the 2-D position (not a product of 1-D
filters); non-causal, centred support; separable L1 exponential window; order 2, filter_order 64, 8 bands per axis;
the host is a pre-norm ViT without class token (average-pooled head, like SpectFormer), the mixer replaced in the
first `num_hyena_blocks` blocks; hybrid variants put Hyena in the first half and timm attention blocks after.

Variants (the paper's configurations were not readable; DeiT widths at 224 px, patch 16, 1000 classes, counted here;
MACs with vitlab.profiling.count_flops at 224, FFTs counted at 2.5 n log2 n, the filter MLP included):

| model | embed_dim | depth (Hyena + attention) | heads | params (exact) | MACs at 224 |
|---|---|---|---|---|---|
| vl_hyena_nd_tiny         | 192 | 12 + 0 | 3 | 6,063,400  | 1.40 G |
| vl_hyena_nd_hybrid_tiny  | 192 | 6 + 6  | 3 | 5,890,216  | 1.32 G |
| vl_hyena_nd_small        | 384 | 12 + 0 | 6 | 22,615,144 | 4.79 G |
| vl_hyena_nd_hybrid_small | 384 | 6 + 6  | 6 | 22,332,520 | 4.68 G |
"""
import math
from functools import partial
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import GridSequenceMixin

__all__ = ["HyenaViT", "HyenaND", "HyenaBlock", "ImplicitFilter2d", "fft_conv2d", "direct_conv2d",
           "checkpoint_filter_fn"]


def fft_conv2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel linear (zero-padded, not circular) 2-D convolution by FFT.

    x: (B, C, H, W); kernel: (C, 2H-1, 2W-1), centred: kernel[c, H-1+dy, W-1+dx] weights input (i-dy, j-dx) for output
    (i, j). Returns (B, C, H, W) in x's dtype (computed in float32 at least).
    """
    H, W = x.shape[-2:]
    # period 2H-1 x 2W-1 (the kernel's size): for outputs 0..H-1 every offset i - a + H - 1 lies in 0..2H-2, so none
    # of the kept outputs wraps around; it is the linear convolution there, at the smallest FFT that gives it
    size = tuple(kernel.shape[-2:])
    dtype = torch.promote_types(x.dtype, torch.float32)  # half precision FFTs lose too much
    # zero padding done here rather than by rfft2's `s`: OpenVINO's CPU RDFT does not pad a signal itself
    padded = F.pad(x.to(dtype), (0, size[1] - W, 0, size[0] - H))  # (B, C, 2H-1, 2W-1)
    spec = torch.fft.rfft2(padded) * torch.fft.rfft2(kernel.to(dtype))  # (B, C, 2H-1, W)
    full = torch.fft.irfft2(spec, s=size)  # (B, C, 2H-1, 2W-1)
    return full[..., H - 1:2 * H - 1, W - 1:2 * W - 1].to(x.dtype)


def direct_conv2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The same convolution as `fft_conv2d`, directly (conv2d is a correlation, hence the flipped kernel)."""
    H, W = x.shape[-2:]
    weight = kernel.flip(-2, -1).unsqueeze(1)  # (C, 1, 2H-1, 2W-1)
    return F.conv2d(x, weight.to(x.dtype), padding=(H - 1, W - 1), groups=x.shape[1])


def axis_features(length: int, num_bands: int, device=None, dtype=None) -> torch.Tensor:
    """(2L-1, 1 + 2 bands): offsets -(L-1)..(L-1) normalised to [-1, 1], then cos and sin of pi * band * offset."""
    t = (torch.linspace(-1.0, 1.0, 2 * length - 1, device=device, dtype=dtype) if length > 1
         else torch.zeros(1, device=device, dtype=dtype))
    bands = torch.arange(1, num_bands + 1, device=device, dtype=t.dtype)
    angle = math.pi * t[:, None] * bands  # (2L-1, bands)
    return torch.cat([t[:, None], angle.cos(), angle.sin()], dim=-1)


class Sin(nn.Module):
    """sin(freq * x) with one learned frequency per feature (Hyena's implicit-filter activation)."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter2d(nn.Module):
    """h(dy, dx) = FFN(PE(dy, dx)) * window(dy, dx) for `channels` channels, evaluated on the grid it is asked for."""

    def __init__(self, channels: int, filter_order: int = 64, num_bands: int = 8, num_inner_mlps: int = 2,
                 fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2):
        super().__init__()
        self.num_bands = num_bands
        emb_dim = 2 * (1 + 2 * num_bands)
        self.act = Sin(filter_order)  # one activation (one set of frequencies) after every hidden layer, as in Hyena
        # The MLP maps the fixed position grid to filter values: it generates weights, it is no layer of the data
        # path. Its weights are plain parameters applied with F.linear, so techniques that act on data-path
        # nn.Linear layers (activation quantizers, int8 engines, which fold it to a constant) leave it float.
        widths = [emb_dim] + [filter_order] * (num_inner_mlps + 1) + [channels]
        self.weights = nn.ParameterList([nn.Parameter(trunc_normal_(torch.empty(o, i), std=0.02))
                                         for i, o in zip(widths[:-1], widths[1:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(o)) for o in widths[1:-1]])  # none on the last
        self.channels = channels
        # per-channel decay rates of Hyena's exponential modulation (fixed, not learned)
        self.max_decay, self.min_decay = math.log(target) / fast_decay_pct, math.log(target) / slow_decay_pct

    def forward(self, height: int, width: int) -> torch.Tensor:
        like = dict(device=self.act.freq.device, dtype=self.act.freq.dtype)
        deltas = torch.linspace(self.min_decay, self.max_decay, self.channels, **like)  # (C,)
        ty, tx = axis_features(height, self.num_bands, **like), axis_features(width, self.num_bands, **like)
        pe = torch.cat([ty[:, None].expand(-1, tx.shape[0], -1), tx[None].expand(ty.shape[0], -1, -1)], dim=-1)
        h = pe  # (2H-1, 2W-1, emb)
        for weight, bias in zip(self.weights, self.biases):
            h = self.act(F.linear(h, weight, bias))  # (2H-1, 2W-1, filter_order)
        h = F.linear(h, self.weights[-1])  # (2H-1, 2W-1, C)
        distance = ty[:, None, 0].abs() + tx[None, :, 0].abs()  # (2H-1, 2W-1), L1 in normalised offsets
        window = torch.exp(-distance[..., None] * deltas.abs())  # (2H-1, 2W-1, C)
        return (h * window).permute(2, 0, 1)  # (C, 2H-1, 2W-1)


class HyenaND(nn.Module):
    """Order-2 Hyena over a 2-D token grid: projections, short depthwise filter, gate, long 2-D conv (FFT), gate."""

    def __init__(self, dim: int, order: int = 2, filter_order: int = 64, num_bands: int = 8, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.order = dim, order
        self.in_proj = nn.Linear(dim, (order + 1) * dim)
        self.short_filter = nn.Conv2d((order + 1) * dim, (order + 1) * dim, 3, padding=1, groups=(order + 1) * dim)
        self.filter = ImplicitFilter2d(dim * (order - 1), filter_order, num_bands)
        self.bias = nn.Parameter(torch.randn(dim * (order - 1)))
        self.out_proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = grid_size
        u = self.in_proj(x).transpose(1, 2).reshape(B, (self.order + 1) * C, H, W)  # (B, 3C, H, W)
        *gates, v = self.short_filter(u).split(C, dim=1)  # order gates and the value, each (B, C, H, W)
        kernels = self.filter(H, W).view(self.order - 1, C, 2 * H - 1, 2 * W - 1)
        bias = self.bias.view(self.order - 1, C, 1, 1)
        for o, gate in enumerate(reversed(gates[1:])):
            v = v * gate
            v = fft_conv2d(v, kernels[o]) + v * bias[o]
        y = (v * gates[0]).flatten(2).transpose(1, 2)  # (B, N, C)
        return self.proj_drop(self.out_proj(y))


class HyenaBlock(nn.Module):
    """Pre-norm transformer block with HyenaND in place of attention: x + hyena(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, filter_order: int = 64, num_bands: int = 8):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.hyena = HyenaND(dim, filter_order=filter_order, num_bands=num_bands, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.hyena(self.norm1(x), grid_size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class HyenaViT(GridSequenceMixin, nn.Module):
    """ViT with Hyena N-D blocks first and timm attention blocks after; no class token, average-pooled head.

    Args:
        num_hyena_blocks: leading blocks that are HyenaBlocks (all of them: attention-free; half: the paper's hybrid).
        filter_order: width of the implicit filter's MLP; num_bands: sin/cos bands per axis of its positional input.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 192, depth: int = 12,
                 num_hyena_blocks: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, filter_order: int = 64,
                 num_bands: int = 8, drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_layer=None,
                 act_layer=nn.GELU):
        super().__init__()
        self._check_pool(global_pool)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        grid_h, grid_w = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_h * grid_w, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            HyenaBlock(embed_dim, mlp_ratio, drop_rate, dpr[i], act_layer, norm_layer, filter_order, num_bands)
            if i < num_hyena_blocks else
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=drop_rate, attn_drop=drop_rate,
                  drop_path=dpr[i], act_layer=act_layer, norm_layer=norm_layer)
            for i in range(depth)])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        pos_embed = self.pos_embed
        if grid != tuple(self.patch_embed.grid_size):
            pos_embed = resample_abs_pos_embed(pos_embed, grid, self.patch_embed.grid_size, num_prefix_tokens=0,
                                               interpolation="bicubic", antialias=False)
        return self.pos_drop(self.patch_embed(x) + pos_embed), grid  # (B, N, C)

    @staticmethod
    def _run_block(block: nn.Module, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        return block(x, grid) if isinstance(block, HyenaBlock) else block(x)


def checkpoint_filter_fn(state_dict: dict, model: HyenaViT) -> dict:
    """A saved HyenaViT state dict (bare, or under "model" / "state_dict") -> this model's: no official layout exists;
    the position embedding is resampled (bicubic) to the model's grid. The implicit filters need nothing: they are
    functions of position, re-evaluated for any grid."""
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            side = int(round(value.shape[1] ** 0.5))  # square grids only in saved files
            value = resample_abs_pos_embed(value, model.patch_embed.grid_size, (side, side), num_prefix_tokens=0,
                                           interpolation="bicubic", antialias=False)
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"first_conv": "patch_embed.proj", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_hyena_nd_tiny": _cfg(),
    "vl_hyena_nd_hybrid_tiny": _cfg(),
    "vl_hyena_nd_small": _cfg(),
    "vl_hyena_nd_hybrid_small": _cfg(),
    "vl_test_hyena_nd": _cfg(input_size=(3, 32, 32)),
})


def _create_hyena_nd(variant: str, pretrained: bool = False, **kwargs) -> HyenaViT:
    return build_vitlab_model(HyenaViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=3, exclude=("norm_layer", "act_layer"), **kwargs)


@register_model
def vl_hyena_nd_tiny(pretrained: bool = False, **kwargs) -> HyenaViT:
    """Attention-free Hyena 2-D ViT at DeiT-Ti width: 6,063,400 params, 1.40 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=192, depth=12, num_hyena_blocks=12, num_heads=3)
    return _create_hyena_nd("vl_hyena_nd_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_hyena_nd_hybrid_tiny(pretrained: bool = False, **kwargs) -> HyenaViT:
    """Hybrid (6 Hyena 2-D blocks, then 6 attention blocks) at DeiT-Ti width: 5,890,216 params, 1.32 GMACs."""
    arch = dict(patch_size=16, embed_dim=192, depth=12, num_hyena_blocks=6, num_heads=3)
    return _create_hyena_nd("vl_hyena_nd_hybrid_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_hyena_nd_small(pretrained: bool = False, **kwargs) -> HyenaViT:
    """Attention-free Hyena 2-D ViT at DeiT-S width: 22,615,144 params, 4.79 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=384, depth=12, num_hyena_blocks=12, num_heads=6)
    return _create_hyena_nd("vl_hyena_nd_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_hyena_nd_hybrid_small(pretrained: bool = False, **kwargs) -> HyenaViT:
    """Hybrid (6 Hyena 2-D blocks, then 6 attention blocks) at DeiT-S width: 22,332,520 params, 4.68 GMACs."""
    arch = dict(patch_size=16, embed_dim=384, depth=12, num_hyena_blocks=6, num_heads=6)
    return _create_hyena_nd("vl_hyena_nd_hybrid_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_hyena_nd(pretrained: bool = False, **kwargs) -> HyenaViT:
    """Tiny hybrid for tests: 32 px, patch 4 (8x8 tokens), width 48, 2 Hyena 2-D + 2 attention blocks."""
    arch = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_hyena_blocks=2, num_heads=3, mlp_ratio=2.0,
                filter_order=16, num_bands=4)
    return _create_hyena_nd("vl_test_hyena_nd", pretrained, **dict(arch, **kwargs))
