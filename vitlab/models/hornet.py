"""HorNet: a ConvNeXt-like hierarchy whose token mixer is the recursive gated convolution g^nConv.

Paper: "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions" (Rao et al.,
NeurIPS 2022). Official code: github.com/raoyongming/HorNet, `hornet.py` at commit
ac9e21058935f1cf8e27fcca72bbf598fa691d69.

g^nConv of order n projects x to p0 and a stack of features whose widths double, q_k = dwconv(.) * s
(s = 1/3 in every published model), then recursively gates: p_{k+1} = pw_k(p_k) * q_k. Stage i uses order i+2.
The GF variants replace the 7x7 depthwise conv of stages 3-4 with a GlobalLocalFilter: half the channels go through
a 3x3 depthwise conv, the other half through a learnable global filter in the 2D Fourier domain (rfft2, ortho); the
two halves are interleaved channel by channel, as in the official code.

Published (README, ImageNet-1k, 224 px):

| model | params (= official constructor) | MACs at 224 (vitlab) | official calc_flops.py | README "FLOPs" | top-1 |
|---|---|---|---|---|---|
| vl_hornet_tiny_7x7  | 22,409,512 | 3.968 G | 3.977 G | 4.0 G | 82.8 |
| vl_hornet_tiny_gf   | 22,991,848 | 3.922 G | 3.914 G | 3.9 G | 83.0 |
| vl_hornet_small_7x7 | 49,528,264 | 8.814 G |         | 8.8 G | 83.8 |
| vl_hornet_small_gf  | 50,401,768 | 8.745 G |         | 8.7 G | 84.0 |

MACs are `vitlab.profiling.count_flops` at 224 px: convolutions and linears (3.889 G for tiny GF), plus each
rfft2/irfft2 at 2.5 n log2 n MACs per channel (n = 14x14 or 7x7 grid points; 33.6 M for tiny GF). The official
`calc_flops.py` (fvcore, run locally) also counts the channels-last LayerNorms (8.3 M) and counts an FFT as
N * C * ceil(log2 N) on a (B, H, W, C) reading of the (B, C, H, W) input (16.9 M for tiny GF). The FFTs are < 1 % of
the total under either convention, and both counts are within 0.3 % of each other and within 1 % of the README.

Checked against: the official `HorNet` class run locally on a tiny GF configuration (7x7 gnconv in stages 1-2,
GlobalLocalFilter in stages 3-4) at its native size and at a size where the global filter is interpolated; logits
agree within 1e-4 (fixture in tests/fixtures/zoo/hornet/). Parameter counts above come from the official
constructors with 1000 classes.

Departures from the official layout (mapped by `checkpoint_filter_fn`): timm ConvNeXt naming (`stem`,
`stages.i.downsample`, `stages.i.blocks.j`, `mlp.fc1/fc2`, `ls1/ls2.gamma`, `head.norm`, `head.fc`), and the blocks
run channels-last, (B, H, W, C), so g^nConv's 1x1 convs (`proj_in`, `pws`, `proj_out`) are `nn.Linear`s (the
converter flattens their (out, in, 1, 1) weights); stage outputs are NCHW as in timm. Same math, fewer layout
copies: about 10 % less CPU time than the official code (benchmarks/zoo/hornet_vs_reference.py).
`img_size` only sizes the global filters (the official 384 px models use h=24, w=13 / h=12, w=7); other input sizes
interpolate the filter bilinearly at run time exactly as the official code does.
"""
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerNorm2d, LayerScale, Mlp, NormMlpClassifierHead
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from ._builder import build_vitlab_model, imagenet_cfg

__all__ = ["HorNet", "GnConv", "GlobalLocalFilter", "checkpoint_filter_fn"]


def _conv_nhwc(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an NCHW conv to a (B, H, W, C) tensor; the permutes are views (channels_last memory for the conv)."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GlobalLocalFilter(nn.Module):
    """Half the channels: 3x3 depthwise conv; the other half: learnable complex filter on rfft2 (ortho) of the map.

    Works on (B, H, W, C) tensors.
    """

    def __init__(self, dim: int, h: int = 14, w: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(dim // 2, dim // 2, kernel_size=3, padding=1, bias=False, groups=dim // 2)
        self.complex_weight = nn.Parameter(torch.zeros(dim // 2, h, w, 2))  # (C/2, h, w//2+1, re/im)
        trunc_normal_(self.complex_weight, std=0.02)
        self.pre_norm = LayerNorm(dim, eps=1e-6)
        self.post_norm = LayerNorm(dim, eps=1e-6)

    def filter_for(self, height: int, width: int) -> torch.Tensor:
        """Complex (height, width, C/2) filter; bilinear (align_corners) resize when the grid differs, as official."""
        weight = self.complex_weight
        if weight.shape[1:3] != (height, width):
            weight = F.interpolate(weight.permute(3, 0, 1, 2), size=(height, width), mode="bilinear",
                                   align_corners=True).permute(1, 2, 3, 0)  # (2, C/2, h, w) -> (C/2, h, w, 2)
        return torch.view_as_complex(weight.contiguous()).permute(1, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        x1, x2 = torch.chunk(x, 2, dim=-1)
        x1 = _conv_nhwc(self.dw, x1)
        B, H, W, C = x2.shape
        spec = torch.fft.rfft2(x2.float(), dim=(1, 2), norm="ortho")  # (B, H, W//2+1, C) complex
        spec = spec * self.filter_for(*spec.shape[1:3])
        x2 = torch.fft.irfft2(spec, s=(H, W), dim=(1, 2), norm="ortho").to(x1.dtype)
        x = torch.stack([x1, x2], dim=-1).reshape(B, H, W, 2 * C)  # interleave: channel 2i local, 2i+1 global
        return self.post_norm(x)


class GnConv(nn.Module):
    """Recursive gated convolution of order `order` (g^nConv) on (B, H, W, C) tensors: 7x7 depthwise conv, or a
    GlobalLocalFilter sized `gf_size` (h, w//2+1). The official 1x1 convs are Linear layers here."""

    def __init__(self, dim: int, order: int = 5, scale: float = 1.0, gf_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.order = order
        self.dims = [dim // 2 ** i for i in range(order)][::-1]  # e.g. order 3, dim 256: [64, 128, 256]
        width = sum(self.dims)
        self.proj_in = nn.Linear(dim, 2 * dim)
        self.dwconv = GlobalLocalFilter(width, *gf_size) if gf_size else nn.Conv2d(width, width, 7, padding=3,
                                                                                    groups=width)
        self.proj_out = nn.Linear(dim, dim)
        self.pws = nn.ModuleList([nn.Linear(self.dims[i], self.dims[i + 1]) for i in range(order - 1)])
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pwa, abc = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=-1)
        abc = self.dwconv(abc) if isinstance(self.dwconv, GlobalLocalFilter) else _conv_nhwc(self.dwconv, abc)
        gates = torch.split(abc * self.scale, self.dims, dim=-1)
        x = pwa * gates[0]
        for pw, gate in zip(self.pws, gates[1:]):
            x = pw(x) * gate
        return self.proj_out(x)


class HorBlock(nn.Module):
    """x + ls1(gnconv(norm1(x))), then x + ls2(mlp(norm2(x))), on (B, H, W, C); one drop-path rate for both."""

    def __init__(self, dim: int, gnconv: nn.Module, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 ls_init_value: Optional[float] = 1e-6, act_layer=nn.GELU):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.gnconv = gnconv
        self.ls1 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=act_layer)
        self.ls2 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.gnconv(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class HorNetStage(nn.Module):
    """Downsample (NCHW), then blocks in (B, H, W, C); returns NCHW (a view of channels_last memory)."""

    def __init__(self, in_dim: int, dim: int, depth: int, order: int, scale: float, stride: int,
                 gf_size: Optional[Tuple[int, int]], drop_path: Sequence[float], **block_kwargs):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, stride, stride)) \
            if stride > 1 else nn.Identity()
        self.blocks = nn.Sequential(*[
            HorBlock(dim, GnConv(dim, order, scale, gf_size), drop_path=drop_path[j], **block_kwargs)
            for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class HorNet(nn.Module):
    """HorNet. `global_filter` marks the stages whose g^nConv uses a GlobalLocalFilter (GF variants: stages 3-4).

    Args:
        orders: g^nConv order per stage (official: 2, 3, 4, 5).
        gnconv_scale: s that multiplies the depthwise output (official models: 1/3).
        img_size: input size the global filters are sized for (filter of stage i: (g, g//2+1), g = img_size/4/2^i).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 depths: Sequence[int] = (2, 3, 18, 2), base_dim: int = 64, orders: Sequence[int] = (2, 3, 4, 5),
                 gnconv_scale: float = 1.0 / 3.0, global_filter: Sequence[bool] = (False,) * 4,
                 img_size: Union[int, Tuple[int, int]] = 224, mlp_ratio: float = 4.0,
                 ls_init_value: Optional[float] = 1e-6, head_init_scale: float = 1.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, act_layer=nn.GELU):
        super().__init__()
        dims = [base_dim * 2 ** i for i in range(4)]
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        dpr = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info, prev = [], [], dims[0]
        for i in range(4):
            reduction = 4 * 2 ** i
            grid = (img_h // reduction, img_w // reduction)
            gf_size = (grid[0], grid[1] // 2 + 1) if global_filter[i] else None
            stages.append(HorNetStage(prev, dims[i], depths[i], orders[i], gnconv_scale, 1 if i == 0 else 2, gf_size,
                                      dpr[i], mlp_ratio=mlp_ratio, ls_init_value=ls_init_value, act_layer=act_layer))
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
            prev = dims[i]
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        # official head: global average pool -> LayerNorm -> Linear
        self.head = NormMlpClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=1e-6))
        self.apply(self._init_weights)
        if isinstance(self.head.fc, nn.Linear):
            self.head.fc.weight.data.mul_(head_init_scale)
            self.head.fc.bias.data.mul_(head_init_scale)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW) at `indices` (last n if int, all if None); `norm` is a no-op (the norm is in the
        head, after pooling)."""
        if output_fmt != "NCHW":
            raise ValueError(f"HorNet intermediates are NCHW; got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.stem(x)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < len(self.feature_info) - 1:
            self.head.reset(0, "", reset_other=True, in_features=self.num_features)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, 8 * base_dim, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_BLOCK_RENAMES = {"pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2", "gamma1": "ls1.gamma", "gamma2": "ls2.gamma"}


def checkpoint_filter_fn(state_dict: dict, model: HorNet) -> dict:
    """Official HorNet state dict (or a {"model": ...} training checkpoint) -> vitlab layout; identity on vitlab's."""
    state_dict = state_dict.get("model", state_dict)
    if not any(k.startswith("downsample_layers.") for k in state_dict):
        return state_dict
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "downsample_layers":  # downsample_layers.0.* = stem; .i.* = stages.i.downsample.*
            prefix = ["stem"] if parts[1] == "0" else ["stages", parts[1], "downsample"]
            key = ".".join(prefix + parts[2:])
        elif parts[0] == "stages":  # stages.i.j.rest -> stages.i.blocks.j.rest
            rest = ".".join(parts[3:])
            for old, new in _BLOCK_RENAMES.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
            key = ".".join(["stages", parts[1], "blocks", parts[2], rest])
        elif parts[0] == "norm":
            key = "head.norm." + parts[1]
        elif parts[0] == "head":
            key = "head.fc." + parts[1]
        if ".gnconv." in key and key.endswith(".weight") and value.ndim == 4 and value.shape[-2:] == (1, 1):
            value = value.flatten(1)  # official 1x1 conv (out, in, 1, 1) -> Linear (out, in)
        if key.endswith("complex_weight") and key in own and value.shape != own[key].shape:
            # e.g. a 384 px checkpoint into a 224 px model: resize once, as the official forward would each call
            value = F.interpolate(value.permute(3, 0, 1, 2), size=own[key].shape[1:3], mode="bilinear",
                                  align_corners=True).permute(1, 2, 3, 0).contiguous()
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "crop_pct": 0.9, "first_conv": "stem.0", "classifier": "head.fc",
                           "license": "mit", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_hornet_tiny_7x7": _cfg(),
    "vl_hornet_tiny_gf": _cfg(),
    "vl_hornet_small_7x7": _cfg(),
    "vl_hornet_small_gf": _cfg(),
    "vl_test_hornet": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _create_hornet(variant: str, pretrained: bool = False, **kwargs) -> HorNet:
    return build_vitlab_model(HorNet, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
                              exclude=("act_layer",), **kwargs)


_GF = (False, False, True, True)


@register_model
def vl_hornet_tiny_7x7(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-T (7x7): 22,409,512 params, 3.97 GMACs at 224 (paper 4.0G), 82.8 % top-1."""
    arch = dict(depths=(2, 3, 18, 2), base_dim=64)
    return _create_hornet("vl_hornet_tiny_7x7", pretrained, **dict(arch, **kwargs))


@register_model
def vl_hornet_tiny_gf(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-T (GF): 22,991,848 params, 3.92 GMACs at 224 (paper 3.9G), 83.0 % top-1."""
    arch = dict(depths=(2, 3, 18, 2), base_dim=64, global_filter=_GF)
    return _create_hornet("vl_hornet_tiny_gf", pretrained, **dict(arch, **kwargs))


@register_model
def vl_hornet_small_7x7(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-S (7x7): 49,528,264 params, 8.81 GMACs at 224 (paper 8.8G), 83.8 % top-1."""
    arch = dict(depths=(2, 3, 18, 2), base_dim=96)
    return _create_hornet("vl_hornet_small_7x7", pretrained, **dict(arch, **kwargs))


@register_model
def vl_hornet_small_gf(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-S (GF): 50,401,768 params, 8.74 GMACs at 224 (paper 8.7G), 84.0 % top-1."""
    arch = dict(depths=(2, 3, 18, 2), base_dim=96, global_filter=_GF)
    return _create_hornet("vl_hornet_small_gf", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_hornet(pretrained: bool = False, **kwargs) -> HorNet:
    """Tiny HorNet for tests: widths 32-256, one block per stage, global filters in stages 3-4, 64 px."""
    arch = dict(depths=(1, 1, 1, 1), base_dim=32, global_filter=_GF, img_size=64)
    return _create_hornet("vl_test_hornet", pretrained, **dict(arch, **kwargs))
