"""ViT-Res (Liao et al., "Searching for Efficient Multi-Stage Vision Transformers", 2021), built from a ViT-ResNAS
`network_def`: a multi-stage ViT whose stages are joined by residual spatial reduction.

Reference: github.com/yilunliao/vit-search @ 303e7c30638e9c7aee2e2b329e5c71bd3e89ccb9 (the official code;
nets/vit_sr_supernet.py `FlexibleDistillVisionTransformerSR` and `SpatialReductionPatchEmbedding`,
search_utils/gen_utils.py for the grammar). `network_def` is the official tuple grammar as JSON lists, same type codes:

    [0, C]                                        patch embedding to C channels
    [1, [C, heads, head_dim], [C, hidden], exists]  pre-norm transformer block; exists=0: the block is left out
    [3, C_in, C_out]                              residual spatial reduction to a grid half as wide, C_out channels
    [2, C, num_classes]                           LayerNorm on the class token, then a linear classifier

Residual spatial reduction (official `SpatialReductionPatchEmbedding.forward`): patch tokens -> LayerNorm -> 3x3
stride-2 conv (+ a new positional embedding); class token -> the same LayerNorm -> Linear(C_in, C_out); skip path:
2x2 average pooling of the un-normalised patch tokens, the class token as is, both zero-padded from C_in to C_out.

Differences from the official network, for 28 px Fashion-MNIST: vitlab's conv stem (`ConvStem`, GroupNorm) plus a
1x1 projection replaces the 14x14 patchify conv; no distillation token; an odd grid is reduced with ceil (7 -> 4:
conv padding 1 as theirs, average pooling with `ceil_mode=True` so the skip grid matches). Blocks are timm's `Block`
with `Attention(attn_head_dim=head_dim)`, so the attention width is heads * head_dim, independent of C (as theirs).
"""
import functools
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._builder import build_model_with_cfg
from timm.models.vision_transformer import Attention, Block

from .vit_fmnist import FMNIST_MEAN, FMNIST_STD, ConvStem
from ..record import update_record

__all__ = ["ResNAS", "ResidualSpatialReduction", "check_network_def", "pad_channels", "EMBED", "BLOCK", "REDUCE",
           "HEAD", "DEFAULT_NETWORK_DEF"]

# network_def type codes (official nets/vit_sr_supernet.py `_TYPE_IS_*`)
EMBED, BLOCK, HEAD, REDUCE = 0, 1, 2, 3

# The largest net of vitlab.search.SearchSpace.fmnist() (a test keeps the two equal): 3 stages on 7x7 -> 4x4 -> 2x2.
DEFAULT_NETWORK_DEF = [
    [EMBED, 48],
    *[[BLOCK, [48, 3, 16], [48, 144], 1]] * 2,
    [REDUCE, 48, 96],
    *[[BLOCK, [96, 6, 16], [96, 288], 1]] * 3,
    [REDUCE, 96, 160],
    *[[BLOCK, [160, 8, 16], [160, 480], 1]] * 2,
    [HEAD, 160, 10],
]
_TEST_NETWORK_DEF = [[EMBED, 16], [BLOCK, [16, 2, 8], [16, 32], 1], [REDUCE, 16, 32], [BLOCK, [32, 4, 8], [32, 64], 1],
                     [HEAD, 32, 10]]


def check_network_def(network_def: list) -> None:
    """Raise ValueError naming the first entry of `network_def` that breaks the grammar or the channel chain."""
    if not isinstance(network_def, (list, tuple)) or len(network_def) < 2:
        raise ValueError(f"network_def must be a list [[0, C], ..., [2, C, num_classes]], got {network_def!r}")
    if network_def[0][0] != EMBED or network_def[-1][0] != HEAD:
        raise ValueError(f"network_def must start with [0, C] and end with [2, C, num_classes], got "
                         f"{network_def[0]!r} ... {network_def[-1]!r}")
    width = network_def[0][1]
    for i, entry in enumerate(network_def[1:], 1):
        kind = entry[0]
        if kind == BLOCK:
            (c_attn, heads, head_dim), (c_mlp, hidden), exists = entry[1], entry[2], entry[3]
            ok = c_attn == c_mlp == width and min(heads, head_dim, hidden) >= 1 and exists in (0, 1)
        elif kind == REDUCE:
            ok = entry[1] == width and entry[2] >= 1
            width = entry[2]
        elif kind == HEAD:
            ok = i == len(network_def) - 1 and entry[1] == width
        else:
            ok = False
        if not ok:
            raise ValueError(f"network_def[{i}] = {entry!r} does not fit the grammar (embedding width here: {width})")


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero-pad (or cut) the last dim of `x` to `channels`: the skip path of residual spatial reduction."""
    have = x.shape[-1]
    return F.pad(x, (0, channels - have)) if channels >= have else x[..., :channels]


def reduced_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """Grid after a stride-2 3x3 conv with padding 1 (= ceil(n / 2))."""
    return math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)


class ResidualSpatialReduction(nn.Module):
    """Halve the token grid: LayerNorm -> stride-2 conv on patch tokens, Linear on the class token, plus a skip of
    average-pooled tokens zero-padded to the new width (official `SpatialReductionPatchEmbedding`)."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], num_prefix_tokens: int = 1,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.in_dim, self.out_dim, self.grid, self.out_grid = in_dim, out_dim, tuple(grid), reduced_grid(grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = norm_layer(in_dim)
        # official kernel patch + 1, stride patch, padding patch // 2, with patch 2
        self.reduce = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.token_transform = nn.Linear(in_dim, out_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.out_grid[0] * self.out_grid[1], out_dim))
        trunc_normal_(self.pos_embed, std=0.02)

    def to_grid(self, patches: torch.Tensor) -> torch.Tensor:
        B, N, C = patches.shape
        return patches.transpose(1, 2).reshape(B, C, *self.grid)  # (B, C, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        y = self.norm(x)
        patches = self.reduce(self.to_grid(y[:, p:])).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N', C_out)
        tokens = self.token_transform(y[:, :p])  # (B, p, C_out)
        pooled = self.pool(self.to_grid(x[:, p:])).flatten(2).transpose(1, 2)  # (B, N', C_in)
        skip = pad_channels(torch.cat([x[:, :p], pooled], dim=1), self.out_dim)
        return torch.cat([tokens, patches], dim=1) + skip


@functools.cache
def _attention_with_head_dim(head_dim: int) -> type[Attention]:
    """timm's Attention with a fixed head width (timm's Block passes no `attn_head_dim` and wants a class)."""

    def __init__(self, dim: int, **kwargs):
        Attention.__init__(self, dim, attn_head_dim=head_dim, **kwargs)

    return type(f"AttentionHeadDim{head_dim}", (Attention,), {"__init__": __init__})


def _mlp_with_hidden(hidden: int, in_features: int, hidden_features: int | None = None, **kwargs) -> Mlp:
    """timm's Mlp with an exact hidden width (timm's Block derives it as int(dim * mlp_ratio))."""
    return Mlp(in_features, hidden_features=hidden, **kwargs)


class ResNAS(nn.Module):
    """A ViT-Res network from a `network_def` (module docstring); `vitlab.search.Supernet.materialise` builds these."""

    def __init__(self, network_def: list | None = None, img_size: int = 28, in_chans: int = 1, num_classes: int = 10,
                 stem_widths: tuple[int, ...] = (16, 32), stem_strides: tuple[int, ...] = (2, 2),
                 stem_groups: int = 8, drop_path_rate: float = 0.0, global_pool: str = "token"):
        super().__init__()
        network_def = [list(e) for e in (network_def or DEFAULT_NETWORK_DEF)]
        network_def[-1] = [HEAD, network_def[-1][1], num_classes]
        check_network_def(network_def)
        self.network_def = network_def
        self.num_classes, self.global_pool, self.num_prefix_tokens = num_classes, global_pool, 1
        self.img_size, self.in_chans = img_size, in_chans
        width = network_def[0][1]
        self.stem = ConvStem(in_chans, tuple(stem_widths), tuple(stem_strides), stem_groups)
        self.proj = nn.Conv2d(self.stem.out_chans, width, kernel_size=1)
        grid = (img_size, img_size)
        for stride in stem_strides:  # each stem conv is 3x3 with padding 1: n -> ceil(n / stride)
            grid = (math.ceil(grid[0] / stride), math.ceil(grid[1] / stride))
        self.grid = grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, width))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # official MaskedLayerNorm eps
        kept = [e for e in network_def if e[0] == BLOCK and e[3]]
        rates = iter([drop_path_rate * i / max(len(kept) - 1, 1) for i in range(len(kept))])  # timm's linear rule
        layers = []
        for entry in network_def[1:-1]:
            if entry[0] == BLOCK and entry[3]:
                (_, heads, head_dim), (_, hidden) = entry[1], entry[2]
                layers.append(Block(width, heads, qkv_bias=True, norm_layer=norm_layer, drop_path=next(rates),
                                    attn_layer=_attention_with_head_dim(head_dim),
                                    mlp_layer=partial(_mlp_with_hidden, hidden)))
            elif entry[0] == REDUCE:
                layers.append(ResidualSpatialReduction(entry[1], entry[2], grid, norm_layer=norm_layer))
                grid, width = layers[-1].out_grid, entry[2]
        self.blocks = nn.Sequential(*layers)
        self.num_features = self.embed_dim = width
        self.norm = norm_layer(width)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"} | {f"blocks.{n}" for n, _ in self.blocks.named_parameters()
                                             if n.endswith("pos_embed")}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.network_def[-1] = [HEAD, self.num_features, num_classes]
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, projection, class token and positional embedding: (B, 1 + h*w, C)."""
        x = self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, h*w, C)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 10, "input_size": (1, 28, 28), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": FMNIST_MEAN, "std": FMNIST_STD, "first_conv": "stem.0",
            "classifier": "head", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({"vl_resnas": _cfg(), "vl_test_resnas": _cfg(input_size=(1, 16, 16))})


_ARCH_KWARGS = ("img_size", "in_chans", "num_classes", "stem_widths", "stem_strides", "stem_groups", "drop_path_rate",
                "global_pool")


def _create_resnas(variant: str, pretrained: bool = False, **kwargs) -> ResNAS:
    model = build_model_with_cfg(ResNAS, variant, pretrained, **kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (model.in_chans, model.img_size, model.img_size)}
    arch = {k: v for k, v in kwargs.items() if k in _ARCH_KWARGS}  # not timm's pretrained_cfg and the like
    update_record(model, arch={**arch, "network_def": [list(e) for e in model.network_def]})  # rebuilds from a checkpoint
    return model


@register_model
def vl_resnas(pretrained: bool = False, **kwargs) -> ResNAS:
    """ViT-Res from `network_def=` (default: the largest net of the Fashion-MNIST space, 7 blocks, 11.6M MACs)."""
    return _create_resnas("vl_resnas", pretrained, **kwargs)


@register_model
def vl_test_resnas(pretrained: bool = False, **kwargs) -> ResNAS:
    """Tiny ViT-Res for tests: 16 px, 4x4 -> 2x2 tokens, widths 16 / 32, one block per stage."""
    arch = dict(network_def=_TEST_NETWORK_DEF, img_size=16, stem_widths=(8, 16), stem_strides=(2, 2))
    return _create_resnas("vl_test_resnas", pretrained, **dict(arch, **kwargs))
