"""MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition (Wang, Sun et al., Baidu
VIS / Beihang, arXiv:2209.01620, 2022; journal version Neurocomputing 595, 2024, doi:10.1016/j.neucom.2024.127828).

A four-stage NHWC transformer whose block, Multi-scale Attention Fusion (MAF), runs two streams on the same
normalised tokens and fuses them by attention:

* local stream: multi-head self-attention inside non-overlapping w x w windows (fine-grained, short range);
* global stream, Global Learning with Down-sampling (GLD): the map is down-sampled r x r -> 1 by a learned linear
  map of each r x r patch (a stride-r r x r conv) and LayerNorm, and the down-sampled tokens run multi-head
  self-attention over the whole (reduced) image (coarse-grained, long range, (HW / r^2)^2 cost);
* fusion: cross attention whose queries are the local stream's tokens (every position) and whose keys / values are
  the global stream's tokens; the block's mixer output is proj(local + fused).

Each block is x += MAF(LN(x)); x += MLP(LN(x)) (timm Mlp, ratio 4). The stem is a 7x7 stride-4 conv + LayerNorm,
stages are joined by a 3x3 stride-2 conv + LayerNorm (the layout of CSWin, the paper's main baseline), the head is
LayerNorm, global average pool, Linear. Window and down-sampling sizes per stage default to w = 7 and
r = (8, 4, 2, 1), so the global stream holds 7 x 7 tokens in every stage at 224 px (stage 4: plain global attention).
Sizes that are not multiples of w (r) are zero-padded bottom / right; padded keys are masked in the windows, and a
padded r x r patch is the conv of its zero-padded pixels, so any input size runs.

Official code: none found. Searched (Dec 2026): the code index for "MAFormer" / "Multi-scale Attention Fusion" /
"Global Learning with Down-sampling" (repositories named *maformer*: bistuxlf/MAFormer is skeleton action
recognition, bocaix/MAFormer a plant-disease CNN, neither this paper); web pages (arXiv / ar5iv, papers-with-code
("no code"), Hugging Face papers, emergentmind, researchtrend, bohrium, CSDN): only the abstract was readable, and
the ar5iv page beyond its abstract is not stored. PaddleClas (Baidu) has no MAFormer.

UNVERIFIED (the paper's text beyond the abstract was not available here):
* the exact MAF formulation: the branch structure above is the abstract's (local window attention; GLD for
  long-range context; fusion of both "via attention"), the choice of local-stream queries attending to global-stream
  keys for the fusion, the strided-conv form of the down-sampling, w and r are this file's;
* the variant configurations: MAFormer-S / B / L are given the stage widths, depths and heads of CSWin-T / S / B,
  the models the abstract compares them with at "similar-sized parameters"; MAFormer-L's 85.9% top-1 is the
  abstract's, the other top-1 figures, and every published parameter / FLOP figure, could not be read.

| variant | params (1000 classes), this file | MACs at 224, this file | top-1 (IN-1k, abstract) |
|---|---|---|---|
| MAFormer-S (`vl_maformer_small`: 64, (1, 2, 21, 1), heads (2, 4, 8, 16)) | 38,655,848 | 5.42G | not readable |
| MAFormer-B (`vl_maformer_base`: 64, (2, 4, 32, 2), heads (2, 4, 8, 16)) | 60,762,856 | 8.56G | not readable |
| MAFormer-L (`vl_maformer_large`: 96, (2, 4, 32, 2), heads (4, 8, 16, 32)) | 136,160,872 | 18.84G | 85.9% |

Counts are this implementation's (tests assert them as literals and as the per-block closed form
`maf_params_per_block`); they are NOT checked against the paper. Each MAF block here holds about 10 C^2 + r^2 C^2
attention weights against CSWin's 4 C^2, so these models are 1.7x the size of the CSWin models whose layout they
take (CSWin-T/S/B: 23M / 35M / 78M), while the abstract speaks of "similar-sized parameters": the paper's MAF is
probably lighter (for instance, streams splitting the heads); that could not be checked. MACs are
vitlab.profiling.count_flops's (attention matmuls included), equal to the closed-form count within 0.2% (tested).

Checked here (tests/models/test_zoo_maformer.py): each stream against a direct softmax(q k^T) v computation (per clipped
w x w tile, padded keys masked, on sizes that are and are not multiples of w; over the r x r down-sampled map, the
conv written as a Linear of each patch); the fusion against its formula; that it uses both streams (zeroing either
stream's qkv changes the output); that with the global stream zeroed a block is local (a pixel changes nothing
outside its window) while with it on the same pixel reaches every position; exact parameter counts; MACs of
MAFormer-S at 224; loaders (round trip, `pretrained_cfg_overlay` file, gray input, features_only).
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import NHWCStageModel

__all__ = ["MAFormer", "MultiScaleAttentionFusion", "MAFBlock", "window_partition", "window_reverse",
           "maf_params_per_block", "checkpoint_filter_fn", "vl_maformer_small", "vl_maformer_base",
           "vl_maformer_large", "vl_test_maformer"]


# --- the math: pure tensor functions ----------------------------------------------------------------------

def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * nH * nW, window * window, C), windows in raster order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)  # (B, nH, w, nW, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(x: torch.Tensor, window: int, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nH * nW, window * window, C) -> (B, H, W, C)."""
    C = x.shape[-1]
    x = x.view(batch, height // window, width // window, window, window, C)  # (B, nH, nW, w, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, C)


def padded_key_mask(height: int, width: int, window: int, device=None) -> Optional[torch.Tensor]:
    """Boolean (nH * nW, 1, w*w, w*w) mask, True where a key is a real pixel, for a map zero-padded bottom / right to
    multiples of `window`; None when no padding is needed."""
    pad_h, pad_w = -height % window, -width % window
    if not pad_h and not pad_w:
        return None
    real = torch.zeros(height + pad_h, width + pad_w, 1, dtype=torch.bool, device=device)
    real[:height, :width] = True
    keys = window_partition(real[None], window)[..., 0]  # (nWindows, w*w)
    return keys[:, None, None, :].expand(-1, 1, window * window, -1)


def maf_params_per_block(dim: int, reduction: int, mlp_ratio: float = 4.0) -> int:
    """Parameters of one MAF block: two LayerNorms, local qkv, GLD conv + LayerNorm + qkv, fusion q / kv, proj, MLP."""
    hidden = int(dim * mlp_ratio)
    norms = 2 * 2 * dim
    local = 3 * dim * dim + 3 * dim
    gld = (reduction * reduction * dim * dim + dim + 2 * dim if reduction > 1 else 0) + 3 * dim * dim + 3 * dim
    fusion = 3 * dim * dim + 3 * dim + dim * dim + dim
    mlp = 2 * dim * hidden + hidden + dim
    return norms + local + gld + fusion + mlp


# --- modules ----------------------------------------------------------------------------------------------

class MultiScaleAttentionFusion(nn.Module):
    """MAF token mixer on NHWC tokens: window attention (local stream), GLD attention (global stream on the r x r
    down-sampled map), fused by cross attention from the local to the global tokens; out = proj(local + fused)."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, reduction: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must split into {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.reduction = reduction
        self.local_qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.reduce = nn.Conv2d(dim, dim, reduction, stride=reduction) if reduction > 1 else nn.Identity()
        self.reduce_norm = nn.LayerNorm(dim) if reduction > 1 else nn.Identity()
        self.global_qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.fuse_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.fuse_kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor, parts: int) -> Tuple[torch.Tensor, ...]:
        """(B, N, parts * C) -> `parts` tensors (B, heads, N, head_dim)."""
        B, N, _ = x.shape
        return x.view(B, N, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v per head, (B, heads, N, d) -> (B, N, C)."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return out.transpose(1, 2).flatten(2)

    def local_stream(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention inside w x w windows: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        w = self.window_size
        mask = padded_key_mask(H, W, w, x.device)
        x = F.pad(x, (0, 0, 0, -W % w, 0, -H % w))  # (B, Hp, Wp, C), zeros bottom / right
        Hp, Wp = x.shape[1:3]
        windows = window_partition(x, w)  # (B * nWin, w*w, C)
        if mask is not None:
            mask = mask.repeat(B, 1, 1, 1)  # (B * nWin, 1, w*w, w*w), windows batch-major as window_partition's
        out = self._attend(*self._heads(self.local_qkv(windows), 3), mask)  # (B * nWin, w*w, C)
        return window_reverse(out, w, B, Hp, Wp)[:, :H, :W]

    def global_stream(self, x: torch.Tensor) -> torch.Tensor:
        """GLD: down-sample r x r -> 1, then self-attention over every reduced token: (B, H, W, C) -> (B, M, C)."""
        r = self.reduction
        x = F.pad(x, (0, 0, 0, -x.shape[2] % r, 0, -x.shape[1] % r)).permute(0, 3, 1, 2)  # (B, C, Hp, Wp)
        x = self.reduce_norm(self.reduce(x).flatten(2).transpose(1, 2))  # (B, M, C), M = Hp * Wp / r^2
        return self._attend(*self._heads(self.global_qkv(x), 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        local = self.local_stream(x).reshape(B, H * W, C)  # (B, N, C)
        glob = self.global_stream(x)  # (B, M, C)
        q = self._heads(self.fuse_q(local), 1)[0]
        k, v = self._heads(self.fuse_kv(glob), 2)
        fused = self._attend(q, k, v)  # (B, N, C): every position reads the global tokens
        return self.proj_drop(self.proj(local + fused)).view(B, H, W, C)


class MAFBlock(nn.Module):
    """x += MAF(LN(x)); x += MLP(LN(x)); NHWC in and out."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, reduction: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = MultiScaleAttentionFusion(dim, num_heads, window_size, reduction, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
    """Conv (stem: 7x7 stride 4; between stages: 3x3 stride 2) then LayerNorm; NCHW or NHWC in, NHWC out."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, channels_last_input: bool = False,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.channels_last_input = channels_last_input
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=(kernel - 1) // 2)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)  # (B, C, H, W) view
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H', W', C')


class MAFormerStage(nn.Module):
    """Optional downsampler (stages 2-4), then MAF blocks."""

    def __init__(self, dim: int, out_dim: int, depth: int, downsample: bool, drop_path: Sequence[float],
                 norm_layer: type[nn.Module] = nn.LayerNorm, **block_kwargs):
        super().__init__()
        self.downsample = ConvEmbed(dim, out_dim, 3, 2, True, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            MAFBlock(out_dim, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class MAFormer(NHWCStageModel):
    """MAFormer classifier: conv stem, stages of MAF blocks joined by strided convs, norm, pooled Linear head."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 64,
            depths: Sequence[int] = (1, 2, 21, 1),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            window_size: Union[int, Sequence[int]] = 7,
            reductions: Sequence[int] = (8, 4, 2, 1),
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        num_stages = len(depths)
        if not len(num_heads) == len(reductions) == num_stages:
            raise ValueError(f"depths, num_heads and reductions need one entry per stage: {depths}, {num_heads}, "
                             f"{reductions}")
        windows = [window_size] * num_stages if isinstance(window_size, int) else list(window_size)
        self.num_classes = num_classes
        self.output_fmt = "NHWC"
        self.patch_embed = ConvEmbed(in_chans, embed_dim, 7, 4, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(MAFormerStage(
                dims[max(i - 1, 0)], dims[i], depths[i], i > 0, dpr[i], norm_layer, num_heads=num_heads[i],
                window_size=windows[i], reduction=reductions[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, act_layer=act_layer))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
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

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(x))


def checkpoint_filter_fn(state_dict: dict, model: MAFormer) -> dict:
    """A saved MAFormer state dict (bare, or under "model" / "state_dict") -> this model's: the identity on vitlab's
    layout (no official checkpoint layout exists). timm adapts `patch_embed.proj` to `in_chans` after this."""
    return dict(state_dict.get("model", state_dict.get("state_dict", state_dict)))


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "first_conv": "patch_embed.proj", "classifier": "head.fc",
                           "paper_ids": "arXiv:2209.01620", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_maformer_small": _cfg(),
    "vl_maformer_base": _cfg(),
    "vl_maformer_large": _cfg(),
    "vl_test_maformer": _cfg(input_size=(3, 64, 64), pool_size=(8, 8), num_classes=10),
})


def _create_maformer(variant: str, pretrained: bool = False, **kwargs) -> MAFormer:
    return build_vitlab_model(MAFormer, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (1, 2, 21, 1))))),
                              exclude=("act_layer", "norm_layer"), **kwargs)


@register_model
def vl_maformer_small(pretrained: bool = False, **kwargs) -> MAFormer:
    """MAFormer-S (CSWin-T layout, unverified): 38,655,848 params, 5.42 GMACs at 224 (this file's counts)."""
    arch = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16))
    return _create_maformer("vl_maformer_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_maformer_base(pretrained: bool = False, **kwargs) -> MAFormer:
    """MAFormer-B (CSWin-S layout, unverified): 60,762,856 params, 8.56 GMACs at 224 (this file's counts)."""
    arch = dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16))
    return _create_maformer("vl_maformer_base", pretrained, **dict(arch, **kwargs))


@register_model
def vl_maformer_large(pretrained: bool = False, **kwargs) -> MAFormer:
    """MAFormer-L (CSWin-B layout, unverified): 136,160,872 params, 18.84 GMACs at 224; 85.9% top-1 (abstract)."""
    arch = dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32))
    return _create_maformer("vl_maformer_large", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_maformer(pretrained: bool = False, **kwargs) -> MAFormer:
    """Tiny MAFormer for tests: widths 32 / 64, 2 + 2 blocks, 4x4 windows, GLD 4x / 2x, 64 px."""
    arch = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4, reductions=(4, 2), mlp_ratio=2.0,
                num_classes=10)
    return _create_maformer("vl_test_maformer", pretrained, **dict(arch, **kwargs))
