"""Small hybrid ViTs for 28x28 grayscale images: a convolutional stem, then timm `VisionTransformer` blocks.

The stem follows "Early Convolutions Help Transformers See Better" (Xiao et al., 2021): a few stride-2 3x3
convolutions instead of one large-stride patchify convolution. Its feature map feeds timm's `HybridEmbed`, so the
model *is* a `timm.models.vision_transformer.VisionTransformer` (class token, `pos_embed`, `blocks`, `norm`,
`head`) and every technique written for timm ViTs applies to it unchanged.

Normalisation in the stem is GroupNorm, not BatchNorm, so that multi-process (DDP) training computes exactly what
single-process training computes.
"""
from functools import partial
from typing import Sequence

import torch.nn as nn
from timm.layers import HybridEmbed
from timm.models import generate_default_cfgs, register_model
from timm.models._builder import build_model_with_cfg
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _timm_vit_filter

from ._builder import arch_kwargs
from ..record import update_record
from ._glpe import GLPEVisionTransformer

__all__ = ["ConvStem", "vl_vit_fmnist", "vl_test_vit"]

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


class ConvStem(nn.Sequential):
    """3x3 conv -> GroupNorm -> GELU, repeated; the product of `strides` is the patch size of the tokens.

    `groups`: GroupNorm groups, one int for every layer (capped at the width) or one per layer (a stem pruned by
    whole GroupNorm groups, vitlab.prune, keeps e.g. 7 groups of 3 channels).
    """

    def __init__(
            self,
            in_chans: int = 1,
            widths: Sequence[int] = (32, 64, 128),
            strides: Sequence[int] = (1, 2, 2),
            groups: int | Sequence[int] = 8,
            act_layer: type[nn.Module] = nn.GELU,
    ):
        if len(widths) != len(strides):
            raise ValueError(f"stem widths {tuple(widths)} and strides {tuple(strides)} must have the same length")
        if isinstance(groups, int):
            groups = [min(groups, width) for width in widths]
        if len(groups) != len(widths) or any(g < 1 or w % g for w, g in zip(widths, groups)):
            raise ValueError(f"stem groups {tuple(groups)} must give one GroupNorm group count per layer that divides "
                             f"its width (widths {tuple(widths)}); e.g. stem_groups=8 with widths that are multiples of 8")
        layers = []
        prev = in_chans
        for width, stride, group in zip(widths, strides, groups):
            layers += [
                nn.Conv2d(prev, width, 3, stride=stride, padding=1, bias=False),
                nn.GroupNorm(group, width),
                act_layer(),
            ]
            prev = width
        super().__init__(*layers)
        self.out_chans = prev


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": FMNIST_MEAN,
        "std": FMNIST_STD,
        "first_conv": "patch_embed.backbone.0",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vl_vit_fmnist": _cfg(),
    "vl_test_vit": _cfg(input_size=(1, 16, 16)),
})


def _create_hybrid_vit(
        variant: str,
        pretrained: bool = False,
        stem_widths: Sequence[int] = (24, 48, 96),
        stem_strides: Sequence[int] = (1, 2, 2),
        stem_groups: int | Sequence[int] = 8,
        **kwargs,
) -> VisionTransformer:
    in_chans = kwargs.get("in_chans", 1)
    stem_groups = stem_groups if isinstance(stem_groups, int) else [int(g) for g in stem_groups]
    stem = ConvStem(in_chans, tuple(stem_widths), tuple(stem_strides), stem_groups)
    # HybridEmbed runs the stem once to learn the grid size, then projects with a 1x1 conv to embed_dim.
    embed_layer = partial(HybridEmbed, backbone=stem)
    kwargs["patch_size"] = 1  # VisionTransformer passes patch_size on to HybridEmbed: 1 = every stem pixel is a token
    kwargs.setdefault("img_size", 28)
    kwargs.setdefault("in_chans", 1)
    kwargs.setdefault("num_classes", 10)
    arch = dict(arch_kwargs(kwargs, exclude=("patch_size",)),  # patch_size is fixed at 1 here, not a choice
                stem_widths=list(stem_widths), stem_strides=list(stem_strides), stem_groups=stem_groups)
    # pos_embed="glpe": ResFormer's global-local positional embedding (models/_glpe.py), takes any input size
    model_cls = GLPEVisionTransformer if kwargs.get("pos_embed") == "glpe" else VisionTransformer
    # features_only as timm's ViTs: forward_intermediates of the last three blocks (every block of a shallower one)
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("depth", 12)))
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=_timm_vit_filter,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        embed_layer=embed_layer,
        **kwargs,
    )
    update_record(model, arch=arch)  # every constructor kwarg, so checkpoints do not depend on this file's defaults
    return model


@register_model
def vl_vit_fmnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Reference Fashion-MNIST ViT: 3-conv stem to a 7x7 grid (49 tokens + class token), 4 blocks of width 96."""
    arch = dict(embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, stem_widths=(24, 48, 96))
    return _create_hybrid_vit("vl_vit_fmnist", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny hybrid ViT for tests: 2 blocks of width 32, 16 tokens at 16x16 input."""
    arch = dict(img_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, stem_widths=(8, 16), stem_strides=(2, 2))
    return _create_hybrid_vit("vl_test_vit", pretrained, **dict(arch, **kwargs))

