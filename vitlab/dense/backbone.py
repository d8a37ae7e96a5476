"""Stage features of any timm / vitlab backbone, for dense heads: `Backbone(model)(x) -> [NCHW maps, finest first]`.

Hierarchical families (Swin, PVT v2, ConvNeXt, vitlab's zoo) give one map per stage through timm's
`forward_intermediates` (the API timm's own `features_only=True` wraps); channels and strides come from the model's
`feature_info`, the same numbers `features_only`'s `feature_info.channels()` / `.reduction()` report. The wrapped
`.model` stays the whole timm model (its unused classifier included), so the model contract
(`vitlab.contract.describe`), the techniques and vitlab's checkpoint loader see the module they know.

A plain ViT (one stride for every block: vl_vit_fmnist, vl_test_vit, deit_tiny) goes through ViTDet's simple
feature pyramid (Li et al., 2022, "Exploring Plain Vision Transformer Backbones for Object Detection"; detectron2
`detectron2/modeling/backbone/vit.py`, `SimpleFeaturePyramid`): from the last block's patch tokens (final norm
applied: the encoder output a classification checkpoint was trained to give), stride-2 deconvolutions to go finer,
identity, max-pooling to go coarser, then 1x1 and 3x3 convolutions with LayerNorm to `pyramid_dim` channels.
ViTDet's scale factors (4, 2, 1, 0.5) turn a stride-16 ViT into strides (4, 8, 16, 32); here the output strides
are fixed (`pyramid_strides`, default the same (4, 8, 16, 32)) and the scale factors follow from the ViT's patch
stride (vl_vit_fmnist's stride-4 tokens: scales 1, 1/2, 1/4, 1/8; deit_tiny's stride 16: exactly ViTDet's).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from ..checkpoint import create_model, is_checkpoint, model_spec
from ..errors import UserError

__all__ = ["Backbone", "SimpleFeaturePyramid", "BackboneError"]


class BackboneError(UserError):
    """A backbone that cannot give stage features (or a bad pyramid setting); names it and the families that can."""


_WORKING = "timm Swin / PVT v2 / ConvNeXt, vitlab's vl_* families, plain ViTs (vl_vit_fmnist, deit_tiny_patch16_224)"


def _power_of_two(ratio: float) -> int:
    """log2 of `ratio`, which must be a power of two."""
    k = round(math.log2(ratio))
    if not math.isclose(2.0 ** k, ratio):
        raise BackboneError(f"pyramid stride ratio {ratio} is not a power of two; use pyramid_strides that are "
                            "the ViT's patch stride times powers of two (e.g. 4/8/16/32)")
    return k


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-`stride` map [B, dim, h, w] -> maps at `out_strides`.

    Per level (detectron2 `SimpleFeaturePyramid`): k = log2(stride / out_stride) > 0 stride-2 ConvTranspose2d's
    halving the channels (LayerNorm + GELU between them), k = 0 identity, k < 0 |k| 2x2 max-pools; then a 1x1 conv
    and a 3x3 conv, each followed by a channel LayerNorm and without bias (detectron2 `use_bias = norm == ""`).
    """

    def __init__(self, dim: int, stride: int, out_strides: Sequence[int] = (4, 8, 16, 32), out_dim: int | None = None):
        super().__init__()
        out_dim = out_dim or dim
        self.levels = nn.ModuleList()
        for out_stride in out_strides:
            k = _power_of_two(stride / out_stride)
            layers: list[nn.Module] = []
            width = dim
            for i in range(k):   # finer: deconvolutions, dim -> dim/2 -> dim/4 ...
                if i:
                    layers += [LayerNorm2d(width), nn.GELU()]
                layers.append(nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2))
                width //= 2
            layers += [nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(-k)]   # coarser
            layers += [nn.Conv2d(width, out_dim, 1, bias=False), LayerNorm2d(out_dim),
                       nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm2d(out_dim)]
            self.levels.append(nn.Sequential(*layers))
        self.channels = [out_dim] * len(out_strides)
        self.strides = list(out_strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [level(x) for level in self.levels]


def _build(model: str, in_chans: int, img_size: int, model_kwargs: dict) -> nn.Module:
    """A timm / vitlab model by name (built for `in_chans` x `img_size`), or one loaded from a checkpoint folder."""
    if is_checkpoint(model) or "/" in model:
        return create_model(model, **model_kwargs)   # vitlab's checkpoint loader: checked weights
    kwargs = {"in_chans": in_chans, "img_size": img_size, **model_kwargs}
    try:
        return create_model(model, **kwargs)
    except (UserError, TypeError) as e:
        if "img_size" not in str(e) or "img_size" in model_kwargs:
            raise
    kwargs.pop("img_size")    # families without a fixed grid (ConvNeXt, PVT v2) take no img_size
    return create_model(model, **kwargs)


class Backbone(nn.Module):
    """Stage features of a timm / vitlab model: `forward(x) -> list of [B, channels[i], H/strides[i], W/strides[i]]`.

    `model`: a timm / vitlab name (built with `in_chans`, `img_size` where it takes one, and `model_kwargs`, which
    win), a vitlab checkpoint folder (classification weights to start from) or a module.
    `out_indices`: which `feature_info` entries to return (default: the last one of each stride); a plain ViT
    (every entry at one stride) returns the simple feature pyramid at `pyramid_strides` instead.
    """

    def __init__(self, model: str | nn.Module, in_chans: int = 1, img_size: int = 64,
                 out_indices: Sequence[int] | None = None, pyramid_strides: Sequence[int] = (4, 8, 16, 32),
                 pyramid_dim: int | None = None, model_kwargs: dict | None = None):
        super().__init__()
        name = model if isinstance(model, str) else type(model).__name__
        if isinstance(model, (str, Path)):
            model = _build(str(model), in_chans, img_size, dict(model_kwargs or {}))
        info = getattr(model, "feature_info", None)
        if not hasattr(model, "forward_intermediates") or not isinstance(info, list) or not info:
            raise BackboneError(f"backbone {name!r} ({type(model).__name__}) has no stage features (timm's "
                                f"forward_intermediates and feature_info); backbones that work: {_WORKING}")
        self._resize(model, name, img_size)
        reductions = [int(f["reduction"]) for f in info]
        if out_indices is None:    # the last entry of each stride
            out_indices = [i for i, r in enumerate(reductions) if i + 1 == len(reductions) or reductions[i + 1] != r]
        out_indices = [i % len(info) for i in out_indices]
        self.plain = len(set(reductions)) == 1
        self.model = model
        self.in_chans, self.img_size = in_chans, img_size
        self.spec = model_spec(model)     # {"name", "kwargs"}: rebuilds the architecture (vl_dense checkpoints)
        if self.plain:
            self.out_indices = [out_indices[-1]]
            dim, stride = int(info[out_indices[-1]]["num_chs"]), reductions[0]
            if max(pyramid_strides) > img_size:
                raise BackboneError(f"pyramid stride {max(pyramid_strides)} exceeds the {img_size} px input of "
                                    f"{name!r}; pass smaller pyramid_strides (e.g. 4/8) or a larger img_size")
            self.pyramid: SimpleFeaturePyramid | None = SimpleFeaturePyramid(dim, stride, pyramid_strides, pyramid_dim)
            self.channels, self.strides = self.pyramid.channels, self.pyramid.strides
        else:
            self.out_indices = list(out_indices)
            self.pyramid = None
            self.channels = [int(info[i]["num_chs"]) for i in self.out_indices]
            self.strides = [reductions[i] for i in self.out_indices]

    @staticmethod
    def _resize(model: nn.Module, name: str, img_size: int) -> None:
        """Rebuild a fixed-grid model (ViT, Swin) for `img_size` input: timm's `set_input_size` resamples the
        position embedding and the attention windows (a checkpoint trained at 28 px serves 64 px scenes)."""
        grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if grid is None or tuple(grid) == (img_size, img_size):
            return
        if not hasattr(model, "set_input_size"):
            raise BackboneError(f"backbone {name!r} was built for {tuple(grid)} px input and cannot be resized to "
                                f"{img_size} px; build it with img_size={img_size}")
        model.set_input_size(img_size=img_size)

    def tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stage maps the backbone model gives (a plain ViT: its last block's normed patch tokens, NCHW)."""
        if self.plain:
            return self.model.forward_intermediates(x, indices=self.out_indices, norm=True, intermediates_only=True)
        return self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.tokens(x)
        return self.pyramid(maps[-1]) if self.pyramid is not None else list(maps)
