"""SpectFormer (vanilla): a plain ViT whose first blocks mix tokens with a learnable filter in the Fourier domain.

Paper: "SpectFormer: Frequency and Attention is what you need in a Vision Transformer" (Patro, Namboodiri,
Agneeswaran, 2023). Official code: github.com/badripatro/SpectFormers, `vanilla_architecture/spectformer.py` and
`vanilla_architecture/main_spectformer.py` (model configs) at commit b6cf487a0ea71eeb252d5ba0fc7410b3f5dbd256.

The first `num_spectral_blocks` (alpha = 4) blocks are GFNet blocks: x + mlp(norm2(filter(norm1(x)))) -- one
residual around both halves -- where the filter is rfft2 over the token grid (ortho), times a learnable complex
weight (h, w//2+1, C), then irfft2. The remaining blocks are timm `Block`s (MHSA + MLP). No class token; the head
averages the normalised tokens.

Published (vanilla_architecture/README.md, ImageNet-1k, 224 px):

| model | params (exact, = official constructor) | MACs at 224 (vitlab) | paper "FLOPs" | top-1 |
|---|---|---|---|---|
| vl_spectformer_tiny (spectformer-ti) | 9,158,376  | 1.85 G | 1.8 G | 76.9 |
| vl_spectformer_xs (spectformer-xs)   | 20,028,520 | 4.01 G | 4.0 G | 80.2 |
| vl_spectformer_small (spectformer-s) | 32,449,768 | 6.64 G | 6.6 G | 81.7 |

The counts equal `n_parameters` in the official training logs (vanilla_architecture/logs/); the README rounds
spectformer-xs to "22M". MACs are `vitlab.profiling.count_flops` at 224 px: linears and the patch conv, attention
(Q K^T and A V) and each rfft2/irfft2 at 2.5 n log2 n MACs per channel (n = 196). The FFTs are 0.4 % of the tiny
model; the published figures round to one decimal.

Checked against: the official `SpectFormer` class run locally on a tiny configuration (patch 4, 32 px, width 48,
4 spectral + 2 attention blocks, 6 heads), logits within 1e-4 (fixture in tests/fixtures/zoo/spectformer/).

Departures from the official code, all arguments with the official behaviour as default:

* `num_heads`: the official `Block_attention` hard-codes 6 heads ("4 for tiny, 6 for small and 12 for base"); 6 heads
  cannot split spectformer-ti's width 256, so `vl_spectformer_tiny` uses 4, as that comment says.
* Other input sizes: the official model is built for one `img_size` (filter h = img_size/16, w = h//2+1) and its
  fine-tuning script resizes a checkpoint's `pos_embed` (bicubic) and `complex_weight` (bicubic, align_corners) to
  the new grid. `checkpoint_filter_fn` does that resize when shapes differ; `dynamic_img_size=True` does the same
  resize on the fly for any input size.
* Attention runs through timm's `Attention` (fused SDPA), numerically equal to the official explicit softmax.
* Speed only: the patch conv runs channels-last and `pos_embed` is added as `pos_embed + x`, so the residual stream is
  contiguous tokens (the official `x + pos_embed` keeps the transposed conv layout through every block, and each
  norm copies it).
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

__all__ = ["SpectFormer", "SpectralGatingNetwork", "SpectralBlock", "checkpoint_filter_fn", "resize_complex_filter"]


def resize_complex_filter(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(h, w, C, 2) filter -> (height, width, C, 2), bicubic with align_corners, as the official fine-tuning script."""
    h, w, channels, _ = weight.shape
    if (h, w) == (height, width):
        return weight
    weight = weight.reshape(1, h, w, channels * 2).permute(0, 3, 1, 2)  # (1, 2C, h, w)
    weight = F.interpolate(weight, size=(height, width), mode="bicubic", align_corners=True)
    return weight.permute(0, 2, 3, 1).reshape(height, width, channels, 2)


class SpectralGatingNetwork(nn.Module):
    """Token mixing by a learnable complex filter on the 2D Fourier transform of the token grid (GFNet)."""

    def __init__(self, dim: int, h: int = 14, w: int = 8):
        super().__init__()
        self.complex_weight = nn.Parameter(torch.randn(h, w, dim, 2) * 0.02)  # (h, w//2+1, C, re/im)

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = grid_size
        spec = torch.fft.rfft2(x.float().view(B, H, W, C), dim=(1, 2), norm="ortho")  # (B, H, W//2+1, C)
        weight = resize_complex_filter(self.complex_weight, spec.shape[1], spec.shape[2])
        spec = spec * torch.view_as_complex(weight.contiguous())
        x_out = torch.fft.irfft2(spec, s=(H, W), dim=(1, 2), norm="ortho")  # (B, H, W, C)
        return x_out.reshape(B, N, C).to(x.dtype)


class SpectralBlock(nn.Module):
    """GFNet block: x + drop_path(mlp(norm2(filter(norm1(x))))), a single residual."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, h: int = 14, w: int = 8):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.filter = SpectralGatingNetwork(dim, h=h, w=w)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(self.filter(self.norm1(x), grid_size))))


class SpectFormer(GridSequenceMixin, nn.Module):
    """Vanilla SpectFormer: patch embedding + absolute position embedding, spectral blocks, then attention blocks.

    Args:
        num_spectral_blocks: leading blocks that are spectral (official alpha = 4); the rest are MHSA blocks.
        num_heads: heads of the MHSA blocks (official: hard-coded 6; 4 for the tiny model).
        dynamic_img_size: accept any input size whose sides are multiples of the patch size, resizing pos_embed
            and the spectral filters per call; otherwise the input must be `img_size`.
        head_drop_rate: dropout before the classifier (official `dropcls`).
        uniform_drop_path: every block gets `drop_path_rate` (official `uniform_drop`) instead of a linear ramp.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 768, depth: int = 12,
                 num_spectral_blocks: int = 4, num_heads: int = 6, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, uniform_drop_path: bool = False, head_drop_rate: float = 0.0,
                 dynamic_img_size: bool = False, norm_layer=None, act_layer=nn.GELU):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"SpectFormer global_pool must be 'avg' or '' (tokens), got {global_pool!r}")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.dynamic_img_size = dynamic_img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=not dynamic_img_size)
        grid_h, grid_w = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_h * grid_w, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate] * depth if uniform_drop_path else torch.linspace(0, drop_path_rate, depth,
                                                                                device="cpu").tolist()
        self.blocks = nn.ModuleList([
            SpectralBlock(embed_dim, mlp_ratio, drop_rate, dpr[i], act_layer, norm_layer, h=grid_h, w=grid_w // 2 + 1)
            if i < num_spectral_blocks else
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=drop_rate, attn_drop=drop_rate,
                  drop_path=dpr[i], act_layer=act_layer, norm_layer=norm_layer)
            for i in range(depth)])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


    def _tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        grid = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        # channels-last: the patch conv runs faster on it on CPU and its tokens come out contiguous
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))  # (B, N, C)
        pos_embed = self.pos_embed
        if tuple(grid) != tuple(self.patch_embed.grid_size):
            pos_embed = resample_abs_pos_embed(pos_embed, grid, self.patch_embed.grid_size, num_prefix_tokens=0,
                                               interpolation="bicubic", antialias=False)
        # pos_embed first: the sum takes its token-major layout, not that of the transposed conv output, so the
        # residual stream is contiguous and no block's norm or residual add has to copy or stride through it
        return self.pos_drop(pos_embed + x), tuple(grid)

    def _run_block(self, block: nn.Module, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        return block(x, grid) if isinstance(block, SpectralBlock) else block(x)


def checkpoint_filter_fn(state_dict: dict, model: SpectFormer) -> dict:
    """Official SpectFormer state dict (or {"model": ...}) -> vitlab's; the layouts share key names, so this only
    unwraps, drops the unused official `pre_logits` Identity and resizes pos_embed / complex_weight to the model's
    grid the way the official fine-tuning script does. Identity on a state dict that already fits the model."""
    state_dict = state_dict.get("model", state_dict)
    grid = model.patch_embed.grid_size
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            old = int(math.sqrt(value.shape[1]))  # official checkpoints are square
            value = resample_abs_pos_embed(value, grid, (old, old), num_prefix_tokens=0, interpolation="bicubic",
                                           antialias=False)
        elif key.endswith("filter.complex_weight") and value.shape[:2] != (grid[0], grid[1] // 2 + 1):
            value = resize_complex_filter(value, grid[0], grid[1] // 2 + 1)
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"crop_pct": 0.9, "first_conv": "patch_embed.proj", "license": "mit", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_spectformer_tiny": _cfg(),
    "vl_spectformer_xs": _cfg(),
    "vl_spectformer_small": _cfg(),
    "vl_test_spectformer": _cfg(input_size=(3, 32, 32)),
})


def _create_spectformer(variant: str, pretrained: bool = False, **kwargs) -> SpectFormer:
    return build_vitlab_model(SpectFormer, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=3, exclude=("norm_layer", "act_layer"), **kwargs)


@register_model
def vl_spectformer_tiny(pretrained: bool = False, **kwargs) -> SpectFormer:
    """SpectFormer-T (vanilla spectformer-ti): 9,158,376 params, 1.85 GMACs at 224 (paper 1.8G), 76.9 % top-1."""
    arch = dict(patch_size=16, embed_dim=256, depth=12, num_heads=4)
    return _create_spectformer("vl_spectformer_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_spectformer_xs(pretrained: bool = False, **kwargs) -> SpectFormer:
    """SpectFormer-XS (vanilla): 20,028,520 params, 4.01 GMACs at 224 (paper 4.0G), 80.2 % top-1."""
    arch = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_spectformer("vl_spectformer_xs", pretrained, **dict(arch, **kwargs))


@register_model
def vl_spectformer_small(pretrained: bool = False, **kwargs) -> SpectFormer:
    """SpectFormer-S (vanilla): 32,449,768 params, 6.64 GMACs at 224 (paper 6.6G), 81.7 % top-1."""
    arch = dict(patch_size=16, embed_dim=384, depth=19, num_heads=6, drop_path_rate=0.15)  # official training rate
    return _create_spectformer("vl_spectformer_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_spectformer(pretrained: bool = False, **kwargs) -> SpectFormer:
    """Tiny SpectFormer for tests: 32 px, patch 4 (8x8 tokens), width 48, 2 spectral + 2 attention blocks."""
    arch = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_spectral_blocks=2, num_heads=6, mlp_ratio=2.0)
    return _create_spectformer("vl_test_spectformer", pretrained, **dict(arch, **kwargs))
