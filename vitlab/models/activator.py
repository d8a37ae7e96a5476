"""Activator: an isotropic ViT whose only sublayer per block is one GLU MLP that mixes tokens (no softmax attention).

Paper: "Activator: GLU Activation Function as the Core Component of a Vision Transformer" (Abdullah Nazhat Abdullah,
Tarkan Aydin, 2024), arXiv:2405.15953. No official code is published (a Hugging Face model card,
Abdullah-Nazhat/Activator, holds the abstract only), so nothing here is checked against code; there is no
official commit and no official checkpoint layout.

What the paper says (abstract v2/v4 and the stored summaries of the full text; the method section, its equations and
its configuration/params tables were NOT readable here): scaled dot-product attention with softmax is replaced by an
MLP with a gated linear unit (GLU) activation; the reduced model ("Activator") also removes the second, non-gated
MLP of the transformer block, so that one GLU-based step does both the token interaction and the channel
transformation. GEGLU, SwiGLU and ReGLU gates are ablated with similar accuracy. Experiments are CIFAR-10/100 in an
"equalized" setting against ViT and MLP-Mixer (73.2 / 46.1 % top-1 vs ViT 65.7 / 34.9 %).

Assumptions where the readable text is silent (each is an argument, so another reading is one kwarg away):

* The block is pre-norm with one residual: x + drop_path(TokenGatedMLP(LN(x))).
* `TokenGatedMLP` (the "GLU-activated MLP token-mixing structure"): two channel projections to a hidden width
  D = mlp_ratio * C, a value and a gate; the gate is mixed across the N tokens by one learned N x N linear layer
  (the MLP-Mixer / gMLP token projection), activated (GELU: GEGLU, the first of the paper's ablations), multiplied with
  the value, and projected back to C. So per block: 2CD + 2D + N^2 + N + DC + C (+ 2C for the norm).
* mlp_ratio = 4: a block then holds 12 C^2 + N^2 + O(C) weights, the 12 C^2 of a ViT block (4 C^2 attention + 8 C^2
  MLP): the paper's "equalized" comparison at matched parameters, our reading of it.
* ViT host: conv patch embedding, learned absolute position embedding, no class token, final LayerNorm, average
  pooling and a linear head (MLP-Mixer's head, as the token projection makes a class token pointless).
* Init: truncated normal (std 0.02) for every linear layer, zero biases, as timm's ViT.

Mechanism properties (tested in tests/models/test_zoo_activator.py): nothing calls softmax; each block has exactly one
gated MLP and no attention; the token projection is a fixed (input-independent) N x N mixing, so the model is NOT
permutation equivariant over tokens, but becomes so when the token projection is conjugated by the same permutation
(P W P^T); mixing is global (changing one token changes every output token after one block); the number of tokens is
fixed by the token projection, so other input sizes need a model built for them (`img_size=`).

Variants: the paper's sizes were not readable; these are ViT/DeiT widths at 224 px, patch 16 (N = 196), 1000 classes,
counted here (MACs with vitlab.profiling.count_flops at 224):

| model | embed_dim | depth | params (exact) | MACs at 224 |
|---|---|---|---|---|
| vl_activator_tiny  | 192 | 12 | 6,175,768  | 1.42 G |
| vl_activator_small | 384 | 12 | 22,504,024 | 4.93 G |
| vl_activator_base  | 768 | 12 | 87,011,032 | 18.18 G |
"""
from functools import partial
from typing import Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import GridSequenceMixin

__all__ = ["Activator", "ActivatorBlock", "TokenGatedMLP", "checkpoint_filter_fn", "activator_params_per_block"]


def activator_params_per_block(dim: int, num_tokens: int, mlp_ratio: float = 4.0) -> int:
    """Parameters of one `ActivatorBlock`: the norm, two channel projections in, the token projection, one out."""
    hidden = int(dim * mlp_ratio)
    return 2 * dim + 2 * (dim * hidden + hidden) + num_tokens * num_tokens + num_tokens + hidden * dim + dim


class TokenGatedMLP(nn.Module):
    """GLU MLP whose gate is mixed across tokens: fc2(act(token_proj(fc_gate(x))) * fc_value(x))."""

    def __init__(self, dim: int, num_tokens: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.fc_value = nn.Linear(dim, hidden_features)
        self.fc_gate = nn.Linear(dim, hidden_features)
        self.token_proj = nn.Linear(num_tokens, num_tokens)  # over the token axis
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"TokenGatedMLP mixes exactly {self.num_tokens} tokens, got {x.shape[1]}: build the "
                             f"model for this input size (img_size=...)")
        gate = self.token_proj(self.fc_gate(x).transpose(1, 2)).transpose(1, 2)  # (B, N, D), mixed across N
        return self.fc2(self.drop(self.act(gate) * self.fc_value(x)))  # (B, N, C)


class ActivatorBlock(nn.Module):
    """x + drop_path(mlp(norm(x))): the block's single sublayer is the token-gated MLP."""

    def __init__(self, dim: int, num_tokens: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(dim)
        self.mlp = TokenGatedMLP(dim, num_tokens, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm(x)))


class Activator(GridSequenceMixin, nn.Module):
    """Activator: patch embedding + position embedding, `depth` ActivatorBlocks, LayerNorm, average pool, linear head.

    Args:
        mlp_ratio: hidden width of the gated MLP over the embedding width (value and gate each).
        act_layer: the gate's activation (GELU -> GEGLU; nn.SiLU -> SwiGLU; nn.ReLU -> ReGLU, the paper's ablation).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 768, depth: int = 12,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer=None, act_layer=nn.GELU):
        super().__init__()
        self._check_pool(global_pool)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_tokens = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            ActivatorBlock(embed_dim, num_tokens, mlp_ratio, drop_rate, dpr[i], act_layer, norm_layer)
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
        return self.pos_drop(self.patch_embed(x) + self.pos_embed), tuple(self.patch_embed.grid_size)  # (B, N, C)


def checkpoint_filter_fn(state_dict: dict, model: Activator) -> dict:
    """A saved Activator state dict (bare, or under "model" / "state_dict") -> this model's. No official checkpoint
    layout exists; the position embedding is resampled (bicubic) when the grid differs, and a token projection of
    another token count is refused: a learned N x N mixing has no size-independent meaning."""
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            side = int(round(value.shape[1] ** 0.5))  # square grids only in saved files
            value = resample_abs_pos_embed(value, model.patch_embed.grid_size, (side, side), num_prefix_tokens=0,
                                           interpolation="bicubic", antialias=False)
        elif key.endswith("token_proj.weight") and value.shape[0] != model.patch_embed.num_patches:
            raise ValueError(f"{key} mixes {value.shape[0]} tokens but the model has {model.patch_embed.num_patches}:"
                             f" build the model with the checkpoint's img_size")
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"first_conv": "patch_embed.proj", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_activator_tiny": _cfg(),
    "vl_activator_small": _cfg(),
    "vl_activator_base": _cfg(),
    "vl_test_activator": _cfg(input_size=(3, 32, 32)),
})


def _create_activator(variant: str, pretrained: bool = False, **kwargs) -> Activator:
    return build_vitlab_model(Activator, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=3, exclude=("norm_layer", "act_layer"), **kwargs)


@register_model
def vl_activator_tiny(pretrained: bool = False, **kwargs) -> Activator:
    """Activator at DeiT-Ti width (the paper's sizes were not readable): 6,175,768 params, 1.42 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=192, depth=12)
    return _create_activator("vl_activator_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_activator_small(pretrained: bool = False, **kwargs) -> Activator:
    """Activator at DeiT-S width: 22,504,024 params, 4.93 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=384, depth=12)
    return _create_activator("vl_activator_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_activator_base(pretrained: bool = False, **kwargs) -> Activator:
    """Activator at ViT-B width: 87,011,032 params, 18.18 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=768, depth=12)
    return _create_activator("vl_activator_base", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_activator(pretrained: bool = False, **kwargs) -> Activator:
    """Tiny Activator for tests: 32 px, patch 4 (8x8 = 64 tokens), width 48, 3 blocks, mlp_ratio 2."""
    arch = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, mlp_ratio=2.0)
    return _create_activator("vl_test_activator", pretrained, **dict(arch, **kwargs))
