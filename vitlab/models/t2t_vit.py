"""T2T-ViT: Tokens-to-Token Vision Transformer (Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers
from Scratch on ImageNet", ICCV 2021, arXiv:2101.11986).

The Tokens-to-Token (T2T) module replaces ViT's 16x16 patchify: a soft split (`nn.Unfold`, kernel 7 stride 4, then
kernel 3 stride 2 twice) turns overlapping neighbourhoods into tokens, and between splits a one-head linear-attention
layer (Performer, positive random features) "re-structures" the tokens back into an image. The result, (H/16)(W/16)
tokens of width `embed_dim`, feeds a deep-narrow ViT backbone with a class token and a fixed (not learned) 1D
sinusoidal position embedding. The backbone is timm's `VisionTransformer` (timm `Block` / `Attention`, fused SDPA);
`T2TViT` only swaps the patch embedding and the position embedding, so ViT techniques apply unchanged.

Official code: github.com/yitu-opensource/T2T-ViT, `models/t2t_vit.py`, `models/token_performer.py`,
`models/transformer_block.py`, read at commit 0f63dc9558f4d192de926504dbddfa1b3f5db6ca. Published (README,
ImageNet-1k, 224 px):

    ==========  ==========  =====  =====
    model       params      MACs   top-1
    ==========  ==========  =====  =====
    T2T-ViT-7    4,310,222  1.1G   71.7
    T2T-ViT-10   5,889,230  1.5G   75.2
    T2T-ViT-12   6,941,902  1.8G   76.5
    T2T-ViT-14  21,545,550  4.8G   81.5   (83.3 at 384 px)
    T2T-ViT-19  39,177,422  8.5G   81.9
    T2T-ViT-24  64,105,934  13.8G  82.3
    ==========  ==========  =====  =====

The exact counts are `sum(p.numel() for p in model.parameters())` of the official constructors with 1000 classes
(README: 4.3M, 5.9M, 6.9M, 21.5M, 39.2M, 64.1M). They include two frozen parameters the official code registers
with `requires_grad=False` and keeps here too: the sinusoidal `pos_embed` (197 x embed_dim) and the Performer
random-feature matrices `w` (2 x 32 x 64); T2T-ViT-7 has 4,255,694 trainable parameters. vitlab counts 1.147 GMACs
for T2T-ViT-7 and 4.783 GMACs for T2T-ViT-14 at 224 px (`vitlab.profiling.count_flops`, attention and the
Performer's random-feature products included), exactly what the same counter gives for the official model; the
README's 1.1G for T2T-ViT-7 is that figure rounded (+4.3 %), its 4.8G for T2T-ViT-14 matches (-0.3 %).

Differences between implementations, kept as arguments with the official default:
  * `qk_scale`: attention scale. None (head_dim ** -0.5) is the official constructor default and what the README's
    evaluation of the released checkpoints uses; the official entrypoints with `pretrained=True` would set
    embed_dim ** -0.5 instead (a timm-0.3 leftover whose loading path has no weights).
  * position embedding at another input size: a model built with `img_size=S` gets the 1D sinusoid table for its
    own token count (as the official constructor does); a checkpoint from another size, or a model run with
    `dynamic_img_size=True` at another size, gets the stored table bicubic-resampled on its 2D grid, as the
    official `load_for_transfer_learning` does.
  * dropout inside the T2T Performer layers is 0.1 in the official code (`t2t_drop_rate`). The official
    `drop_rate` (position-embedding and block dropout) is timm's `pos_drop_rate` + `proj_drop_rate` here; timm's
    `drop_rate` is head dropout, which the official model does not have.

Other input channels: the first layer is a LayerNorm + Linear on unfolded 7x7 patches, not a conv, so timm's
`adapt_input_conv` cannot take it (`pretrained_cfg["first_conv"]` is None); `checkpoint_filter_fn` folds the
LayerNorm's affine into the Linear and adapts that, exactly for `in_chans=1` on grayscale input.

Checked against: the official code run locally on a tiny configuration with perturbed weights (fixture
`tests/fixtures/zoo/t2t_vit/`, loaded through `checkpoint_filter_fn`, logits within 1e-4, with and without
`qk_scale`), the official parameter counts and the official model's MAC count; see `tests/models/test_zoo_t2t_vit.py`.

    >>> import timm, torch, vitlab.models
    >>> model = timm.create_model("vl_test_t2t_vit", num_classes=10).eval()
    >>> model(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""
import math
import re
from functools import partial
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model, imagenet_cfg
from timm.models._manipulate import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer

__all__ = ["T2TViT", "T2TEmbed", "TokenPerformer", "sinusoid_pos_embed", "checkpoint_filter_fn",
           "vl_t2t_vit_7", "vl_t2t_vit_10", "vl_t2t_vit_12", "vl_t2t_vit_14", "vl_t2t_vit_19", "vl_t2t_vit_24",
           "vl_test_t2t_vit"]

# (kernel, stride, padding) of the three soft splits; their strides multiply to the token stride of 16
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def sinusoid_pos_embed(num_positions: int, dim: int) -> torch.Tensor:
    """(1, num_positions, dim) table: sin on even channels, cos on odd ones, as the official get_sinusoid_encoding."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    frequency = torch.pow(10000.0, 2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim)
    table = position / frequency  # (N, dim), float64 like the official numpy code
    table[:, 0::2] = table[:, 0::2].sin()
    table[:, 1::2] = table[:, 1::2].cos()
    return table.float()[None]


def soft_split_sizes(size: int) -> Tuple[int, int, int]:
    """Token grid side after each soft split of an input of side `size` (nn.Unfold arithmetic)."""
    sizes = []
    for kernel, stride, padding in SOFT_SPLITS:
        size = (size + 2 * padding - kernel) // stride + 1
        sizes.append(size)
    return tuple(sizes)


class TokenPerformer(nn.Module):
    """One-head Performer layer of the T2T module: linear attention with positive random features (FAVOR+).

    Maps `dim` input features per token to `in_dim`; the residual of the attention branch is v (the input has a
    different width), then a pre-norm MLP of width `in_dim`. `w` is the fixed random-feature matrix.
    """

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1, eps: float = 1e-8,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.emb = in_dim
        self.m = int(in_dim * kernel_ratio)
        self.eps = eps
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.kqv = nn.Linear(dim, 3 * in_dim, **dd)  # k, q, v in that order, as the official layer
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(in_dim, in_dim, **dd)
        self.norm2 = nn.LayerNorm(in_dim, **dd)
        self.mlp = Mlp(in_dim, in_dim, act_layer=nn.GELU, drop=(0.0, drop), **dd)
        w = torch.randn(self.m, in_dim, **dd)
        if not w.is_meta:
            w = nn.init.orthogonal_(w) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def random_features(self, x: torch.Tensor) -> torch.Tensor:
        """exp(w x - |x|^2 / 2) / sqrt(m): (B, T, d) -> (B, T, m), in float32."""
        x = x.float()
        return torch.exp(x @ self.w.t() - (x * x).sum(dim=-1, keepdim=True) / 2) / math.sqrt(self.m)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.emb, dim=-1)  # each (B, T, emb)
        kp, qp = self.random_features(k), self.random_features(q)  # (B, T, m)
        normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
        kptv = v.float().transpose(1, 2) @ kp  # (B, emb, m)
        y = (qp @ kptv.transpose(1, 2)) / (normaliser + self.eps)  # (B, T, emb)
        return v + self.dp(self.proj(y))  # v is the skip connection: the input width differs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TEmbed(nn.Module):
    """Tokens-to-Token module (Performer variant): soft split -> Performer -> soft split -> Performer -> soft split
    -> linear projection to `embed_dim`. Takes the place of timm's PatchEmbed (same constructor arguments)."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            token_dim: int = 64,
            kernel_ratio: float = 0.5,
            drop: float = 0.1,
            output_fmt: Optional[str] = None,
            strict_img_size: bool = True,
            bias: bool = True,
            dynamic_img_pad: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if to_2tuple(patch_size) != (16, 16):
            raise ValueError(f"T2T-ViT's soft splits have a fixed token stride of 16, got patch_size={patch_size}")
        if dynamic_img_pad or not bias:
            raise ValueError("T2TEmbed supports neither dynamic_img_pad nor a bias-free projection")
        self.patch_size = (16, 16)
        self.output_fmt = output_fmt
        self.strict_img_size = strict_img_size
        self.soft_split0, self.soft_split1, self.soft_split2 = (
            nn.Unfold(kernel_size=k, stride=s, padding=p) for k, s, p in SOFT_SPLITS)
        kernel0, kernel1 = SOFT_SPLITS[0][0], SOFT_SPLITS[1][0]
        self.attention1 = TokenPerformer(in_chans * kernel0 ** 2, token_dim, kernel_ratio, drop, **dd)
        self.attention2 = TokenPerformer(token_dim * kernel1 ** 2, token_dim, kernel_ratio, drop, **dd)
        self.project = nn.Linear(token_dim * SOFT_SPLITS[2][0] ** 2, embed_dim, **dd)
        self.set_input_size(img_size)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if patch_size is not None and to_2tuple(patch_size) != (16, 16):
            raise ValueError(f"T2T-ViT's token stride is fixed at 16, got patch_size={patch_size}")
        if img_size is not None:
            self.img_size = to_2tuple(img_size)
            self.grid_size = self.dynamic_feat_size(self.img_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True):
        return 16 if as_scalar else (16, 16)

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return soft_split_sizes(img_size[0])[-1], soft_split_sizes(img_size[1])[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        if self.strict_img_size and (H, W) != self.img_size:
            raise ValueError(f"input size {(H, W)} differs from the model's img_size {self.img_size}; build the "
                             "model with img_size=... or dynamic_img_size=True")
        (h1, h2, h3), (w1, w2, w3) = soft_split_sizes(H), soft_split_sizes(W)
        x = self.attention1(self.soft_split0(x).transpose(1, 2))  # (B, h1*w1, C*49) -> (B, h1*w1, token_dim)
        x = x.transpose(1, 2).reshape(B, -1, h1, w1)  # (B, token_dim, h1, w1)
        x = self.attention2(self.soft_split1(x).transpose(1, 2))  # (B, h2*w2, token_dim)
        x = x.transpose(1, 2).reshape(B, -1, h2, w2)
        x = self.project(self.soft_split2(x).transpose(1, 2))  # (B, h3*w3, embed_dim)
        if self.output_fmt == "NHWC":
            x = x.reshape(B, h3, w3, -1)
        return x


class QueryScale(nn.Module):
    """Multiplies q by a constant; placed in timm Attention's q_norm slot it turns the default head_dim ** -0.5
    scale (also SDPA's) into any other scale, on the fused and the manual path alike."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q * self.factor


class T2TViT(VisionTransformer):
    """timm VisionTransformer with the T2T module as patch embedding and a fixed sinusoidal position embedding."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = False,
            qk_scale: Optional[float] = None,
            token_dim: int = 64,
            kernel_ratio: float = 0.5,
            t2t_drop_rate: float = 0.1,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_eps: float = 1e-5,
            dynamic_img_size: bool = False,
            weight_init: str = "",
            device=None,
            dtype=None,
    ):
        embed_layer = partial(T2TEmbed, token_dim=token_dim, kernel_ratio=kernel_ratio, drop=t2t_drop_rate)
        super().__init__(
            img_size=img_size, patch_size=16, in_chans=in_chans, num_classes=num_classes, global_pool=global_pool,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            class_token=True, pos_embed="learn", dynamic_img_size=dynamic_img_size, drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, weight_init=weight_init, embed_layer=embed_layer,
            norm_layer=partial(nn.LayerNorm, eps=norm_eps), device=device, dtype=dtype,
        )
        self.pos_embed.requires_grad_(False)  # fixed sinusoid, a frozen parameter as in the official model
        self._init_pos_embed()
        if qk_scale is not None:
            for block in self.blocks:
                block.attn.q_norm = QueryScale(qk_scale / block.attn.scale)

    def _init_pos_embed(self) -> None:
        if not self.pos_embed.is_meta:
            with torch.no_grad():
                self.pos_embed.copy_(sinusoid_pos_embed(self.pos_embed.shape[1], self.pos_embed.shape[2]))

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset)
        trunc_normal_(self.cls_token, std=0.02)  # official init (timm's ViT default is normal, std 1e-6)
        self._init_pos_embed()


# --- official checkpoints -------------------------------------------------------------------------------------

def _unwrap(state_dict: dict) -> dict:
    """The weights inside a training checkpoint ({'state_dict_ema' | 'state_dict' | 'model': ...}), no 'module.'."""
    for key in ("state_dict_ema", "state_dict", "model"):  # EMA first, as timm's own loader does
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _adapt_in_chans(state_dict: dict, model: T2TViT) -> None:
    """Fit RGB weights to model.in_chans: fold attention1.norm1's affine into kqv, then adapt kqv's weight viewed as
    a 7x7 conv with timm's `adapt_input_conv` (exact for in_chans=1 on grayscale input)."""
    prefix = "patch_embed.attention1."
    weight = state_dict.get(prefix + "kqv.weight")
    target = model.patch_embed.attention1.kqv.weight
    if weight is None or weight.shape == target.shape:
        return
    area = SOFT_SPLITS[0][0] ** 2
    out_dim, in_chans, source_chans = weight.shape[0], target.shape[1] // area, weight.shape[1] // area
    gamma, beta = state_dict[prefix + "norm1.weight"], state_dict[prefix + "norm1.bias"]
    state_dict[prefix + "kqv.bias"] = state_dict[prefix + "kqv.bias"] + weight @ beta
    folded = (weight * gamma).reshape(out_dim, source_chans, SOFT_SPLITS[0][0], SOFT_SPLITS[0][0])
    state_dict[prefix + "kqv.weight"] = adapt_input_conv(in_chans, folded, base_chans=source_chans).reshape(out_dim, -1)
    state_dict[prefix + "norm1.weight"] = torch.ones(in_chans * area, dtype=gamma.dtype)
    state_dict[prefix + "norm1.bias"] = torch.zeros(in_chans * area, dtype=beta.dtype)


def checkpoint_filter_fn(state_dict: dict, model: T2TViT) -> dict:
    """Official T2T-ViT checkpoint (or a vitlab one) -> this model's state dict.

    Renames `tokens_to_token.*` to `patch_embed.*` and the Performer MLP's `mlp.0/mlp.2` to `mlp.fc1/mlp.fc2`,
    resamples `pos_embed` to the model's token grid (bicubic, as the official transfer-learning loader) and adapts
    the first layer to `model.in_chans`. The identity on a vitlab state dict for the same configuration.
    """
    out = {}
    for key, value in _unwrap(state_dict).items():
        key = re.sub(r"^tokens_to_token\.", "patch_embed.", key)
        key = re.sub(r"^(patch_embed\.attention\d\.mlp)\.0\.", r"\1.fc1.", key)
        key = re.sub(r"^(patch_embed\.attention\d\.mlp)\.2\.", r"\1.fc2.", key)
        out[key] = value
    pos_embed = out.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        out["pos_embed"] = resample_abs_pos_embed(
            pos_embed, new_size=model.patch_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens,
            interpolation="bicubic", antialias=False)
    _adapt_in_chans(out, model)
    return out


# --- registry -------------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{
        "crop_pct": 0.9,
        # no conv: the input layer is patch_embed.attention1 (LayerNorm + Linear on unfolded 7x7 patches), which timm's
        # adapt_input_conv cannot take; checkpoint_filter_fn adapts it to in_chans itself (_adapt_in_chans)
        "first_conv": None, "paper_ids": "arXiv:2101.11986", "origin_url": "https://github.com/yitu-opensource/T2T-ViT",
        "license": "bsd-3-clause-clear",
        **kwargs,
    })


default_cfgs = generate_default_cfgs({
    "vl_t2t_vit_7": _cfg(),
    "vl_t2t_vit_10": _cfg(),
    "vl_t2t_vit_12": _cfg(),
    "vl_t2t_vit_14": _cfg(),
    "vl_t2t_vit_19": _cfg(),
    "vl_t2t_vit_24": _cfg(),
    "vl_test_t2t_vit": _cfg(input_size=(3, 64, 64), num_classes=10),
})


def _create_t2t_vit(variant: str, pretrained: bool = False, **kwargs) -> T2TViT:
    return build_vitlab_model(T2TViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=min(3, kwargs.get("depth", 12)), **kwargs)


@register_model
def vl_t2t_vit_7(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-7 (Yuan et al., 2021): 4,310,222 params (4,255,694 trainable), 1.1 GMACs at 224, 71.7 % top-1."""
    arch = dict(img_size=224, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0)
    return _create_t2t_vit("vl_t2t_vit_7", pretrained, **dict(arch, **kwargs))


@register_model
def vl_t2t_vit_10(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-10 (Yuan et al., 2021): 5,889,230 params, 1.5 GMACs at 224, 75.2 % top-1."""
    arch = dict(img_size=224, embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0)
    return _create_t2t_vit("vl_t2t_vit_10", pretrained, **dict(arch, **kwargs))


@register_model
def vl_t2t_vit_12(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-12 (Yuan et al., 2021): 6,941,902 params, 1.8 GMACs at 224, 76.5 % top-1."""
    arch = dict(img_size=224, embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0)
    return _create_t2t_vit("vl_t2t_vit_12", pretrained, **dict(arch, **kwargs))


@register_model
def vl_t2t_vit_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-14 (Yuan et al., 2021): 21,545,550 params, 4.8 GMACs at 224, 81.5 % top-1."""
    arch = dict(img_size=224, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
    return _create_t2t_vit("vl_t2t_vit_14", pretrained, **dict(arch, **kwargs))


@register_model
def vl_t2t_vit_19(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-19 (Yuan et al., 2021): 39,177,422 params, 8.5 GMACs at 224, 81.9 % top-1."""
    arch = dict(img_size=224, embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0)
    return _create_t2t_vit("vl_t2t_vit_19", pretrained, **dict(arch, **kwargs))


@register_model
def vl_t2t_vit_24(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-24 (Yuan et al., 2021): 64,105,934 params, 13.8 GMACs at 224, 82.3 % top-1."""
    arch = dict(img_size=224, embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0)
    return _create_t2t_vit("vl_t2t_vit_24", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_t2t_vit(pretrained: bool = False, **kwargs) -> T2TViT:
    """Tiny T2T-ViT for tests: token_dim 16, 2 blocks of width 48, 64 px input (4x4 tokens + class token)."""
    arch = dict(img_size=64, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16)
    return _create_t2t_vit("vl_test_t2t_vit", pretrained, **dict(arch, **kwargs))
