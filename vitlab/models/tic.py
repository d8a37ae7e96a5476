"""TiC: Exploring Vision Transformer in Convolution (Zhang, Wang, Bian, Xiong, arXiv:2310.04134, 2023).

MSA-Conv puts self-attention inside a (generalised) convolution: every output position attends, with softmax
attention, to the keys of the k x k window a convolution at that position would read (standard, dilated, or
depthwise = one head per channel), then a k x k convolution mixes the attended map. Nothing in it depends on the
image size, so one set of weights runs at any resolution. TiC stacks MSA-Conv into a hierarchical classifier with two
"capacity enhancing strategies": a Multi-Directional Cyclic Shift (MDCS, long-distance links between tokens) and
Inter-Pooling (a larger effective receptive field).

Official code: github.com/StriveZs/MSA-Conv (the paper's github.com/zs670980918/MSA-Conv, renamed), commit
2d96f54799aab37d92e7400061d3d04ec27b40b5. It releases the MSA-Conv layer only (`core/op/Transformer_in_Convolution.py`
`MSA_Conv_2d` with the C++/CUDA ops `msa_conv.cpp` / `msa_conv_cuda.cu`): a 1x1 conv to q, k, v; one head over all C
channels; logits q . k_j * C^-0.5 for the k x k (dilated) window positions j, keys outside the image being zero
(logit 0, value 0: conv zero padding); softmax over the window; the attended v plus the input; a k x k conv
(`mlp`, stride s, no bias, dilation 1); ReLU. `MSAConv2d` here is that layer with `num_heads` heads (1 = the
official layer), checked against it (below). The repository has no TiC network, MDCS, Inter-Pooling, variants,
parameter counts or weights, and the paper's text (beyond its abstract; searched: the code and pages corpora, arXiv
abstract / HTML pages, papers-with-code mirrors) was not available, so the following are vitlab's own choices,
unverified against the paper:

* the network: a 4x4 patch embedding, four stages (stages 2-4 start with a 3x3 stride-2 conv + LayerNorm), pre-norm
  blocks x += MSAConv2d(LN(x)); x += MLP(LN(x)), a final LayerNorm and an average-pooled linear head;
* MDCS: in every second block of a stage, head h's keys and values are cyclically rolled (wrapping around the map)
  by `shift` tokens in direction h mod 4 (down, up, right, left), so the four head groups attend to windows
  displaced around the query and tokens at one border reach the other; `shift` defaults to the window's extent;
* Inter-Pooling: keys and values are average-pooled (`pool` x `pool`, stride 1, padding not counted) before the
  window attention, so each key summarises its neighbourhood and the window sees (k + pool - 1)^2 input tokens;
* the variants: `vl_tic_tiny` / `vl_tic_small` are Swin-T / Swin-S-like widths and depths, not the paper's.

| variant | params (1000 classes) | MACs at 224 | top-1 (IN-1k) |
|---|---|---|---|
| `vl_tic_tiny` (vitlab's configuration) | 47,446,984 | 7.37G counted here | none (paper's models unknown) |
| `vl_tic_small` (vitlab's configuration) | 82,891,720 | 14.32G counted here | none |

Differences from the official layer, none changing its function: q, k, v are one `nn.Linear` on NHWC tokens
(official: a 1x1 `qkv_conv`; `checkpoint_filter_fn` reshapes it), the conv is named `proj` (official: `mlp`), the window
products run as two batched matmuls (official: a C++ im2col loop) that `vitlab.quant` sees and quantizes, and the
scale is head_dim^-0.5 (= C^-0.5 for the official single head). `masked=True` (not official) drops the out-of-image
positions from the softmax instead of giving them logit 0: a window covering the whole image is then global
attention exactly.

Checked (tests/models/test_zoo_tic.py): the official `MSA_Conv_2d`, built on CPU from its C++ source, on a dilated,
strided, width-changing layer and as every mixer of a tiny TiC, committed as a fixture in the official key layout and
loaded through `checkpoint_filter_fn` (within 1e-4); global attention from a whole-image masked window; the same
weights at two resolutions; the cyclic shift a permutation undone by the opposite shift; Inter-Pooling's receptive
field growth; parameter counts of the variants.
"""
from functools import partial
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, LayerScale, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import NHWCStageModel

__all__ = ["TiC", "MSAConv2d", "TiCBlock", "window_columns", "window_validity", "msa_conv_attention",
           "cyclic_shift", "mdcs_shifts", "checkpoint_filter_fn", "vl_tic_tiny", "vl_tic_small", "vl_test_tic"]

# MDCS directions (dy, dx), assigned to heads in turn: down, up, right, left
_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))


# --- the math: pure tensor functions ----------------------------------------------------------------------

def _window_padding(kernel_size: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int]:
    if kernel_size[0] % 2 == 0 or kernel_size[1] % 2 == 0:
        raise ValueError(f"MSA-Conv windows are centred on their query: kernel_size {kernel_size} must be odd")
    return dilation[0] * (kernel_size[0] - 1) // 2, dilation[1] * (kernel_size[1] - 1) // 2


def window_columns(x: torch.Tensor, kernel_size: Tuple[int, int], dilation: Tuple[int, int]) -> torch.Tensor:
    """The k_h x k_w (dilated) window around every position of x (B, C, H, W), zeros outside: (B, C, K, H*W)."""
    B, C, H, W = x.shape
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=_window_padding(kernel_size, dilation))
    return cols.view(B, C, kernel_size[0] * kernel_size[1], H * W)  # unfold orders channel-major: (C, K)


def window_validity(height: int, width: int, kernel_size: Tuple[int, int], dilation: Tuple[int, int],
                    device=None) -> torch.Tensor:
    """True where a window position falls inside the image: (K, H*W) bool."""
    ones = torch.ones(1, 1, height, width, device=device)
    return window_columns(ones, kernel_size, dilation)[0, 0] > 0


def msa_conv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                       kernel_size: Tuple[int, int], dilation: Tuple[int, int] = (1, 1), scale: Optional[float] = None,
                       masked: bool = False, attn_drop: float = 0.0) -> torch.Tensor:
    """Softmax attention of every position of q (B, C, H, W) over the keys / values of its conv window.

    Per head h: out[p] = sum_j softmax_j(q[p] . k[p + o_j] * scale) v[p + o_j] over the window offsets o_j; outside
    the image k = v = 0 (logit 0, as the official op), or, with `masked`, those positions leave the softmax.
    """
    B, C, H, W = q.shape
    n = num_heads
    d = C // n
    K = kernel_size[0] * kernel_size[1]
    scale = d ** -0.5 if scale is None else scale
    # one batch entry per (image, head, query): 3-D matmuls (bmm), which graph tracers and quantizers follow
    k_win = window_columns(k, kernel_size, dilation).view(B, n, d, K, H * W).permute(0, 1, 4, 2, 3)  # (B, n, HW, d, K)
    v_win = window_columns(v, kernel_size, dilation).view(B, n, d, K, H * W).permute(0, 1, 4, 3, 2)  # (B, n, HW, K, d)
    q = (q * scale).reshape(B, n, d, H * W).transpose(2, 3)  # (B, n, HW, d)
    logits = q.reshape(B * n * H * W, 1, d) @ k_win.reshape(B * n * H * W, d, K)  # (BnHW, 1, K)
    if masked:
        valid = window_validity(H, W, kernel_size, dilation, q.device).t()  # (HW, K)
        logits = logits.view(B * n, H * W, K).masked_fill(~valid, float("-inf")).view(-1, 1, K)
    attn = F.dropout(logits.softmax(dim=-1), attn_drop)
    out = attn @ v_win.reshape(B * n * H * W, K, d)  # (BnHW, 1, d)
    return out.view(B, n, H * W, d).transpose(2, 3).reshape(B, C, H, W)


def mdcs_shifts(num_heads: int, shift: int) -> Tuple[Tuple[int, int], ...]:
    """The (dy, dx) roll of each head: the four directions in turn, `shift` tokens each."""
    return tuple((dy * shift, dx * shift) for dy, dx in (_DIRECTIONS[h % 4] for h in range(num_heads)))


def cyclic_shift(x: torch.Tensor, shifts: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Roll head h of x (B, C, H, W) (C split into len(shifts) heads) by shifts[h] along (H, W), wrapping around."""
    B, C, H, W = x.shape
    heads = x.view(B, len(shifts), C // len(shifts), H, W)  # (B, n, d, H, W)
    return torch.stack([heads[:, h].roll(s, dims=(-2, -1)) for h, s in enumerate(shifts)], 1).view(B, C, H, W)


# --- modules ----------------------------------------------------------------------------------------------

class MSAConv2d(nn.Module):
    """MSA-Conv on NHWC tokens: q, k, v; window attention (+ MDCS, Inter-Pooling); + input; k x k conv; act.

    With num_heads=1, shift=0, pool=1 and a ReLU it is the official `MSA_Conv_2d` layer.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, num_heads: int = 1,
                 kernel_size: Union[int, Tuple[int, int]] = 3, dilation: Union[int, Tuple[int, int]] = 1,
                 stride: int = 1, shift: int = 0, pool: int = 1, masked: bool = False, qkv_bias: bool = True,
                 proj_bias: bool = False, attn_drop: float = 0.0, act_layer: type[nn.Module] = nn.ReLU):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must split into {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size, self.dilation = to_2tuple(kernel_size), to_2tuple(dilation)
        _window_padding(self.kernel_size, self.dilation)
        self.shifts = mdcs_shifts(num_heads, shift) if shift else ()
        self.masked = masked
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.pool = nn.AvgPool2d(pool, 1, pool // 2, count_include_pad=False) if pool > 1 else nn.Identity()
        self.proj = nn.Conv2d(dim, out_dim or dim, self.kernel_size, stride,
                              padding=(self.kernel_size[0] // 2, self.kernel_size[1] // 2), bias=proj_bias)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H / stride, W / stride, out_dim)."""
        q, k, v = self.qkv(x).permute(0, 3, 1, 2).chunk(3, dim=1)  # each (B, C, H, W)
        k, v = self.pool(k), self.pool(v)
        if self.shifts:
            k, v = cyclic_shift(k, self.shifts), cyclic_shift(v, self.shifts)
        out = msa_conv_attention(q, k, v, self.num_heads, self.kernel_size, self.dilation, self.head_dim ** -0.5,
                                 self.masked, self.attn_drop if self.training else 0.0)
        out = out + x.permute(0, 3, 1, 2)  # the official layer's residual, before its conv
        return self.act(self.proj(out)).permute(0, 2, 3, 1)


class TiCBlock(nn.Module):
    """x += MSAConv2d(LN(x)); x += MLP(LN(x)); NHWC in and out."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, dilation: int = 1, shift: int = 0,
                 pool: int = 1, masked: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None, mixer_act_layer: type[nn.Module] = nn.ReLU,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = MSAConv2d(dim, dim, num_heads, kernel_size, dilation, shift=shift, pool=pool, masked=masked,
                              qkv_bias=qkv_bias, attn_drop=attn_drop, act_layer=mixer_act_layer)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv, then LayerNorm; NHWC in and out."""

    def __init__(self, dim: int, out_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class TiCStage(nn.Module):
    """Optional downsampler, then blocks; MDCS in every second block."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, kernel_size: int, dilation: int,
                 shift: Optional[int], pool: int, drop_path: Sequence[float],
                 norm_layer: type[nn.Module] = nn.LayerNorm, **block_kwargs):
        super().__init__()
        self.downsample = ConvDownsample(in_dim, dim, norm_layer) if downsample else nn.Identity()
        shift = dilation * (kernel_size - 1) + 1 if shift is None else shift  # default: the window's extent
        self.blocks = nn.Sequential(*[
            TiCBlock(dim, kernel_size=kernel_size, dilation=dilation, shift=shift if i % 2 else 0, pool=pool,
                     drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class TiC(NHWCStageModel):
    """TiC classifier: 4x4 patch embedding, MSA-Conv stages, final LayerNorm, pooled linear head."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (4, 8, 16, 32),
            kernel_sizes: Sequence[int] = (3, 3, 3, 3),
            dilations: Sequence[int] = (1, 1, 1, 1),
            shifts: Optional[Sequence[Optional[int]]] = None,
            pools: Sequence[int] = (3, 3, 3, 1),
            masked: bool = False,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            layer_scale: Optional[float] = None,
            mixer_act_layer: type[nn.Module] = nn.ReLU,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ):
        super().__init__()
        shifts = (None,) * len(depths) if shifts is None else shifts  # None: the window's extent; 0: no MDCS
        per_stage = (embed_dims, depths, num_heads, kernel_sizes, dilations, shifts, pools)
        if len({len(s) for s in per_stage}) != 1:
            raise ValueError("embed_dims, depths, num_heads, kernel_sizes, dilations, shifts and pools need one "
                             f"entry per stage, got lengths {[len(s) for s in per_stage]}")
        self.num_classes = num_classes
        self.output_fmt = "NHWC"
        self.patch_embed = PatchEmbed(None, 4, in_chans, embed_dims[0], norm_layer=norm_layer, flatten=False,
                                      output_fmt="NHWC", strict_img_size=False)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        for i in range(len(depths)):
            stages.append(TiCStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], i > 0, kernel_sizes[i], dilations[i], shifts[i],
                pools[i], dpr[i], norm_layer, num_heads=num_heads[i], masked=masked, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, layer_scale=layer_scale,
                mixer_act_layer=mixer_act_layer, act_layer=act_layer))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, input_fmt="NHWC")
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


# --- converter --------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: TiC) -> dict:
    """Official `MSA_Conv_2d` layers (`<prefix>qkv_conv.*`, `<prefix>mlp.*`) -> vitlab's `MSAConv2d` (`qkv`, `proj`).

    The official repository has layers only, no network: each official layer found under a prefix becomes the
    `MSAConv2d` at that prefix. Identity on vitlab's layout. Accepts a {"model": ...} / {"state_dict": ...} wrapper.
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    prefixes = {k[:-len("qkv_conv.weight")] for k in state_dict if k.endswith("qkv_conv.weight")}
    if not prefixes:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        rest = key[len(prefix):] if prefix is not None else ""
        if rest.startswith("qkv_conv."):
            out[prefix + "qkv." + rest[len("qkv_conv."):]] = value.flatten(1) if value.dim() == 4 else value
        elif rest.startswith("mlp."):
            out[prefix + "proj." + rest[len("mlp."):]] = value  # the official layer's k x k conv
        else:
            out[key] = value
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "first_conv": "patch_embed.proj", "classifier": "head.fc",
                           "license": "unknown", "paper_ids": "arXiv:2310.04134", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_tic_tiny": _cfg(),
    "vl_tic_small": _cfg(),
    "vl_test_tic": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})


def _create_tic(variant: str, pretrained: bool = False, **kwargs) -> TiC:
    return build_vitlab_model(TiC, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))),
                              exclude=("mixer_act_layer", "act_layer", "norm_layer"), **kwargs)


@register_model
def vl_tic_tiny(pretrained: bool = False, **kwargs) -> TiC:
    """TiC, vitlab's Swin-T-like configuration (the paper's is unknown): 47,446,984 params, 7.37 GMACs at 224."""
    arch = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(4, 8, 16, 32))
    return _create_tic("vl_tic_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_tic_small(pretrained: bool = False, **kwargs) -> TiC:
    """TiC, vitlab's Swin-S-like configuration (the paper's is unknown): 82,891,720 params, 14.32 GMACs at 224."""
    arch = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_tic("vl_tic_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_tic(pretrained: bool = False, **kwargs) -> TiC:
    """Tiny TiC for tests: widths 32-64, two blocks in stage 1 (plain, then MDCS), one after, 64 px."""
    arch = dict(embed_dims=(32, 32, 64, 64), depths=(2, 1, 1, 1), num_heads=(4, 4, 4, 4), pools=(3, 3, 1, 1),
                num_classes=10)
    return _create_tic("vl_test_tic", pretrained, **dict(arch, **kwargs))
