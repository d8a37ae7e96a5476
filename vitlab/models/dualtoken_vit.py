"""DualToken-ViT: Position-aware Efficient Vision Transformer with Dual Token Fusion (Chu et al., arXiv:2309.12424).

PAPER ONLY, AND ONLY ITS ABSTRACT: no official code and no readable architecture table were found. Searched (zoo
wave 2): the code index for "DualToken-ViT" / "position-aware global tokens" / "dual token fusion" (only the
unrelated DualToken tokenizer, songweii/DualToken), repository names containing "dualtoken" (15 hits, none a vision
backbone), and the stored pages and docs (arXiv / Hugging Face abstract pages, the arXiv HTML's table of contents,
a reading note): they give the abstract, the section titles (3.1 "Fusion of Local and Global Information", 3.2
"Position-aware Global Tokens", 3.3 "Architectures") and one sentence of the method: the keys and values of the
global branch come from a feature map reduced by *step-wise downsampling* (to keep more information than one big
stride). The SEED_CATALOG lists the family as paper-only too.

What the abstract specifies, and how this file does it (NHWC tokens, three stages at strides 8 / 16 / 32):

* local tokens from a convolution-based structure: the `ConvEncoder`, x + fc2(GELU(fc1(LN(DWConv7x7(x))))) with
  fc1 widening 2x;
* global tokens from self-attention on down-sampled tokens: `StepDown` reduces the LayerNormed local map with
  depthwise 3x3 stride-2 convs (one per halving, as many as the stage needs to reach the token grid at 224 px) and
  an adaptive average pool onto the s x s token grid (s = 7: the last stage's grid at 224);
* position-aware global tokens, carried through all stages: `GlobalTokens` holds s*s tokens, one per cell of an
  s x s grid over the image (a learned position embedding at the start); every block adds its down-sampled map
  cell by cell (so token (i, j) keeps describing image region (i, j)) and runs self-attention among them
  (`GlobalTokenAttention`); each later stage carries them on through LN + Linear to its width (`token_proj`);
* fusion: every local token attends to the global tokens (`TokenBroadcastAttention`: queries from the local map,
  keys / values from the global tokens) and the result is added to it; an MLP follows (pre-norm, residual).

Everything below the abstract's level is this file's reading and is UNVERIFIED against the paper: the kernel sizes,
the stem (three 3x3 stride-2 convs with BN), the conv + BN downsampling between stages, adding (rather than
weighting) the down-sampled map into the global tokens, the LN + Linear carrying them between stages, the head (LN,
average pool, Linear). The widths, depths, heads and MLP ratios of the two variants follow LightViT (Huang et al.,
2022), the baseline the abstract compares to (LightViT-T: widths 64 / 128 / 256, depths 2 / 6 / 6, heads 2 / 4 /
8, MLP ratios 8 / 4 / 4); the conv encoder's 2x widening brings -T to the abstract's 1.0G, and -S (widths 48 / 96 /
192, depths 1 / 5 / 6) is this file's choice for 0.5G. Neither parameter count is published in what was found: the
counts below are this file's, not the paper's.

| variant | params (1000 classes), counted here | MACs at 224, counted here (abstract "FLOPs") | top-1 (abstract) |
|---|---|---|---|
| DualToken-ViT-S (`vl_dualtoken_vit_small`) | 5,999,752 | 0.508G (0.5G) | 75.4% |
| DualToken-ViT-T (`vl_dualtoken_vit_tiny`) | 10,979,304 | 1.017G (1.0G) | 79.4% |

Checked (tests/models/test_zoo_dualtoken_vit.py): exact parameter counts of both variants (literals and the closed form of
the layers above), their MACs within 2% of the abstract's (vitlab.profiling, attention included), the stated
properties (the global branch reaches the opposite corner of the map within one block, and only through itself;
global tokens are carried from stage to stage and change the output; each global token follows its own image
region), any input size, the converter and in_chans=1 loading. Official repository and commit: none (see above).
"""
from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Attention

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import LinearHeadMixin

__all__ = ["DualTokenViT", "DualTokenBlock", "ConvEncoder", "StepDown", "GlobalTokenAttention",
           "TokenBroadcastAttention", "GlobalTokens", "down_steps", "checkpoint_filter_fn",
           "vl_dualtoken_vit_small", "vl_dualtoken_vit_tiny", "vl_test_dualtoken_vit"]


def down_steps(grid: int, token_grid: int) -> int:
    """Stride-2 steps that take a `grid`-sized map down to about `token_grid` (0 when it is there already)."""
    steps = 0
    while grid > token_grid:
        grid, steps = (grid + 1) // 2, steps + 1
    return steps


@dataclass
class GlobalTokens:
    """Per-forward state of a DualToken-ViT: the position-aware global tokens (B, s*s, C) the blocks read and update."""

    tokens: torch.Tensor


def _nchw(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an NCHW module to NHWC x (the permutes are views)."""
    return module(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvEncoder(nn.Module):
    """The local branch: DWConv kxk -> LN -> fc1 -> GELU -> fc2 on NHWC tokens (the block adds it to its input)."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 1.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(_nchw(self.conv_dw, x)))


class StepDown(nn.Module):
    """Step-wise downsampling: `steps` depthwise 3x3 stride-2 convs, then an average pool onto the s x s token grid.

    NHWC (B, H, W, C) in, tokens (B, s*s, C) out in raster order: token i*s + j summarises image region (i, j).
    """

    def __init__(self, dim: int, steps: int, token_grid: int):
        super().__init__()
        self.token_grid = token_grid
        self.convs = nn.Sequential(*[nn.Conv2d(dim, dim, 3, 2, 1, groups=dim) for _ in range(steps)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x.permute(0, 3, 1, 2))  # (B, C, h, w)
        if x.shape[-2:] != (self.token_grid, self.token_grid):
            x = F.adaptive_avg_pool2d(x, self.token_grid)
        return x.flatten(2).transpose(1, 2)  # (B, s*s, C)


class GlobalTokenAttention(Attention):
    """timm's multi-head self-attention, run among the global tokens (not over the block's token map)."""


class TokenBroadcastAttention(nn.Module):
    """Every local token (query) attends to the global tokens (keys, values): softmax(q k^T / sqrt(d)) v, projected."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) local tokens, tokens (B, M, C) global tokens -> (B, H, W, C)."""
        B, H, W, _ = x.shape
        n, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, H * W, n, d).transpose(1, 2)  # (B, n, HW, d)
        k, v = self.kv(tokens).reshape(B, -1, 2, n, d).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, n, M, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, H, W, n * d)  # (B, H, W, C)
        return self.proj_drop(self.proj(out))


class DualTokenBlock(nn.Module):
    """x += ConvEncoder(x); global tokens += StepDown(LN(x)), then self-attend; x += Broadcast(LN(x), tokens);
    x += MLP(LN(x)). NHWC in and out; the global tokens are read from and written back to `tokens`."""

    def __init__(self, dim: int, num_heads: int, token_grid: int, steps: int, mlp_ratio: float = 4.0,
                 local_mlp_ratio: float = 2.0, kernel_size: int = 7, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.local = ConvEncoder(dim, kernel_size, local_mlp_ratio, act_layer, norm_layer)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm1 = norm_layer(dim)
        self.down = StepDown(dim, steps, token_grid)
        self.token_norm = norm_layer(dim)
        self.token_attn = GlobalTokenAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                               proj_drop=proj_drop)
        self.attn = TokenBroadcastAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path3 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, tokens: GlobalTokens) -> torch.Tensor:
        x = x + self.drop_path1(self.local(x))  # local tokens
        y = self.norm1(x)
        g = tokens.tokens + self.down(y)  # (B, s*s, C): each global token takes its own region's down-sampled token
        g = g + self.token_attn(self.token_norm(g))
        tokens.tokens = g
        x = x + self.drop_path2(self.attn(y, g))  # fusion: local + global information
        return x + self.drop_path3(self.mlp(self.norm2(x)))


class ConvStem(nn.Module):
    """Three 3x3 stride-2 convs with BN (GELU between): NCHW image in, NHWC tokens at 1/8 out."""

    def __init__(self, in_chans: int, embed_dim: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        half = embed_dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), act_layer(),
            nn.Conv2d(half, embed_dim, 3, 2, 1), nn.BatchNorm2d(embed_dim), act_layer(),
            nn.Conv2d(embed_dim, embed_dim, 3, 2, 1), nn.BatchNorm2d(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H/8, W/8, C)


class Downsample(nn.Module):
    """3x3 stride-2 conv + BN, NHWC in and out."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class DualTokenStage(nn.Module):
    """Optional downsampler (and LN + Linear carrying the global tokens to the new width), then DualToken blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, token_grid: int, steps: int,
                 downsample: bool, drop_path: Sequence[float], norm_layer: type[nn.Module] = nn.LayerNorm,
                 **block_kwargs):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.token_proj = nn.Sequential(norm_layer(in_dim), nn.Linear(in_dim, dim)) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            DualTokenBlock(dim, num_heads, token_grid, steps, drop_path=drop_path[i], norm_layer=norm_layer,
                           **block_kwargs) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, tokens: GlobalTokens) -> torch.Tensor:
        x = self.downsample(x)  # (B, H, W, C)
        tokens.tokens = self.token_proj(tokens.tokens)  # (B, s*s, C): carried on from the previous stage
        for block in self.blocks:
            x = block(x, tokens)
        return x


class DualTokenViT(LinearHeadMixin, nn.Module):
    """DualToken-ViT classifier: conv stem, three stages of DualToken blocks sharing position-aware global tokens,
    LN, average pool, Linear."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            img_size: int = 224,
            embed_dims: Sequence[int] = (64, 128, 256),
            depths: Sequence[int] = (2, 6, 6),
            num_heads: Sequence[int] = (2, 4, 8),
            mlp_ratios: Sequence[float] = (8, 4, 4),
            local_mlp_ratio: float = 2.0,
            token_grid: int = 7,
            kernel_size: int = 7,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ):
        """`img_size` only sets how many step-wise downsampling convs each stage has (down to `token_grid` at that
        size); any input size runs."""
        super().__init__()
        per_stage = (embed_dims, depths, num_heads, mlp_ratios)
        if len({len(s) for s in per_stage}) != 1:
            raise ValueError("embed_dims, depths, num_heads and mlp_ratios need one entry per stage, got lengths "
                             f"{[len(s) for s in per_stage]}")
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NCHW"
        self.patch_embed = ConvStem(in_chans, embed_dims[0], act_layer)
        self.global_pos = nn.Parameter(torch.zeros(1, token_grid * token_grid, embed_dims[0]))
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        for i in range(len(depths)):
            grid = -(-img_size // (8 * 2 ** i))  # the stage's map side at img_size
            stages.append(DualTokenStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], num_heads[i], token_grid,
                down_steps(grid, token_grid), downsample=i > 0, drop_path=dpr[i], norm_layer=norm_layer,
                mlp_ratio=mlp_ratios[i], local_mlp_ratio=local_mlp_ratio, kernel_size=kernel_size,
                qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, act_layer=act_layer))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=8 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.global_pos, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"global_pos"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed|^global_pos", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(downsample|token_proj)", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _start(self, x: torch.Tensor) -> Tuple[torch.Tensor, GlobalTokens]:
        x = self.patch_embed(x)  # (B, H/8, W/8, C)
        return x, GlobalTokens(self.global_pos.expand(x.shape[0], -1, -1))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs at `indices` (last n if int, all if None); `norm` applies the final LN to the last stage's."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x, tokens = self._start(x)
        for i, stage in enumerate(stages):
            x = stage(x, tokens)  # (B, H, W, C)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self.norm(x)
        return x.permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if prune_norm or max_index < len(self.stages) - 1:
            self.norm = nn.Identity()  # sized for the last stage only
        if max_index < len(self.stages) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, tokens = self._start(x)
        for stage in self.stages:
            x = stage(x, tokens)
        return self.norm(x).permute(0, 3, 1, 2)  # (B, C, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: DualTokenViT) -> dict:
    """A saved DualTokenViT state dict (bare, or under "model" / "state_dict", as training scripts write it) -> this
    model's. No official layout exists (no released code or weights), so this unwraps and passes tensors through."""
    return state_dict.get("model", state_dict.get("state_dict", state_dict))


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "first_conv": "patch_embed.proj.0", "license": "unknown",
                           "paper_ids": "arXiv:2309.12424", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_dualtoken_vit_small": _cfg(),
    "vl_dualtoken_vit_tiny": _cfg(),
    "vl_test_dualtoken_vit": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> DualTokenViT:
    return build_vitlab_model(DualTokenViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (2, 6, 6))))),
                              exclude=("act_layer", "norm_layer"), **kwargs)


@register_model
def vl_dualtoken_vit_small(pretrained: bool = False, **kwargs) -> DualTokenViT:
    """DualToken-ViT-S (this file's config, see above): 5,999,752 params, 0.508 GMACs at 224 (0.5G), 75.4% top-1."""
    arch = dict(embed_dims=(48, 96, 192), depths=(1, 5, 6), num_heads=(2, 4, 8), mlp_ratios=(8, 4, 4))
    return _create("vl_dualtoken_vit_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_dualtoken_vit_tiny(pretrained: bool = False, **kwargs) -> DualTokenViT:
    """DualToken-ViT-T (LightViT-T's stages): 10,979,304 params, 1.017 GMACs at 224 (1.0G), 79.4% top-1 (IN-1k)."""
    arch = dict(embed_dims=(64, 128, 256), depths=(2, 6, 6), num_heads=(2, 4, 8), mlp_ratios=(8, 4, 4))
    return _create("vl_dualtoken_vit_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_dualtoken_vit(pretrained: bool = False, **kwargs) -> DualTokenViT:
    """Tiny DualToken-ViT for tests: widths 32-64, one or two blocks per stage, a 2 x 2 token grid, 64 px."""
    arch = dict(img_size=64, embed_dims=(32, 48, 64), depths=(1, 2, 1), num_heads=(2, 2, 4), mlp_ratios=(2, 2, 2),
                token_grid=2, kernel_size=3, num_classes=10)
    return _create("vl_test_dualtoken_vit", pretrained, **dict(arch, **kwargs))
