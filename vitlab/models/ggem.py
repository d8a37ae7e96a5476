"""GGeM: Group Generalized Mean pooling for Vision Transformers (Ko et al., 2022, arXiv:2212.04114).

A ViT's final representation is usually its class token or the mean of its patch tokens. GGeM pools the patch
tokens with generalized-mean (GeM, Radenovic et al.) pooling whose exponent is learned per group of channels: the
C channels are split into G contiguous groups (G = the number of attention heads by default, "as ViT groups the
channels via multi-head attention") and group g pools its channels with its own p_g:

    f_c = ( mean_n  max(x_nc, eps)^(p_g) )^(1 / p_g)      for every channel c of group g

p_g = 1 is mean pooling (of the clamped features), p_g -> infinity max pooling; G = 1 is GeM, G = C per-channel GeM.
The model is timm's `VisionTransformer` without a class token whose final LayerNorm runs before the pooling (timm's
`class_token=False, fc_norm=False`) and whose `pool` is GGeM; the extra parameters are the G exponents
(`ggem.p`). No official code was found; this follows the abstract and GeM's convention (p initialised at 3, inputs
clamped at eps = 1e-6 because a real power of a negative number is undefined). The paper's method section and
tables were not available here: the group count, p's initial value and where the clamp sits are those assumptions.

| variant | params (1000 classes) | MACs at 224 | top-1 (IN-1k) |
|---|---|---|---|
| `vl_vit_small_ggem` (ViT-S/16, 6 groups) | 22,049,902 (DeiT-S 22M) | 4.57G (DeiT-S 4.6G) | (paper: +0.1-0.7%p) |
| `vl_vit_base_ggem` (ViT-B/16, 12 groups) | 86,566,132 (DeiT-B 86M) | 17.47G (DeiT-B 17.6G) | |
| `vl_vit_large_ggem` (ViT-L/16, 16 groups) | 304,324,600 (ViT-L 307M) | 61.23G (ViT-L/16 61.6G) | |

Parameters are the same ViT without a class token (timm `class_token=False, global_pool="avg", fc_norm=False`) plus
the G exponents, exactly (tests). The MACs are those of that ViT: GGeM's powers are not multiply-accumulates.

Token reduction: to the contract the model is a plain timm ViT (every block token-reducible), and the pooling
reads whatever tokens are left; when the reduction tracks how many patches each token stands for
(`token_state.size`: ToMe, MCTF; 0 for ATS's padding rows) the power mean is weighted by it,
sum_t s_t x_t^p / sum_t s_t, so each merged token counts once per patch it stands for (for p = 1 the mean over the
original patches, as ToMe's own average pooling). EViT's fused token carries no size: every kept token counts once.
vitlab.tokens still refuses the model by name (`tokens.families._check_pool` knows 'token', 'avg', '', 'map');
adding 'ggem' there is all it takes (tested with that check widened).

Checked (tests/models/test_zoo_ggem.py): p = 1 is mean pooling; large p approaches max pooling; one learnable p per group
that gets gradients and acts on its own channels only; parameter counts equal the class-token-free timm ViT plus G
and the DeiT / ViT papers' counts and MACs within 2 %; size-weighted pooling on a ToMe'd model (r = 0 identity,
the weighted formula, p = 1 the mean over patches); loading a timm ViT checkpoint (class token dropped) and gray
(in_chans=1) adaptation.
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _timm_vit_filter

from ._builder import build_vitlab_model, imagenet_cfg

__all__ = ["GGeMViT", "GroupGeM", "group_gem", "checkpoint_filter_fn", "vl_vit_small_ggem", "vl_vit_base_ggem",
           "vl_vit_large_ggem", "vl_test_ggem"]


# --- the math: a pure tensor function ---------------------------------------------------------------------

def group_gem(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6,
              weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Group GeM over tokens: x (B, N, C), p (G,) with G dividing C, weights (B, N, 1) or None -> (B, C).

    Computed as m * (mean (x/m)^p)^(1/p) with m the per-channel max (a constant for the gradient, which is exact
    since the value does not depend on m), so that large p neither overflows nor underflows.
    """
    B, N, C = x.shape
    if C % p.shape[0]:
        raise ValueError(f"{p.shape[0]} GGeM groups do not divide {C} channels")
    exponent = p.repeat_interleave(C // p.shape[0])  # (C,): group g's p on each of its C/G channels
    x = x.clamp(min=eps)
    scale = x.amax(dim=1, keepdim=True).detach()  # (B, 1, C)
    powered = (x / scale).pow(exponent)  # (B, N, C), in (0, 1]
    mean = powered.mean(1) if weights is None else (powered * weights).sum(1) / weights.sum(1)  # (B, C)
    return scale[:, 0] * mean.pow(1.0 / exponent)


class GroupGeM(nn.Module):
    """GGeM pooling of a (B, N, C) token sequence with one learnable exponent per group of C / `groups` channels."""

    def __init__(self, dim: int, groups: int, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        if dim % groups:
            raise ValueError(f"ggem_groups={groups} must divide the width {dim}")
        self.init_p, self.eps = p, eps
        self.p = nn.Parameter(torch.full((groups,), float(p)))

    def init_weights(self) -> None:
        with torch.no_grad():
            self.p.fill_(self.init_p)

    def forward(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return group_gem(x, self.p, self.eps, weights)


class GGeMViT(VisionTransformer):
    """timm VisionTransformer (no class token, final norm before pooling) whose global pool is GGeM.

    `global_pool="ggem"` (default) or any timm pool type; `ggem_groups` defaults to `num_heads`.
    """

    def __init__(self, num_heads: int = 12, global_pool: str = "ggem", class_token: bool = False,
                 fc_norm: Optional[bool] = False, ggem_groups: Optional[int] = None, ggem_p: float = 3.0,
                 ggem_eps: float = 1e-6, **kwargs):
        super().__init__(num_heads=num_heads, global_pool="avg" if global_pool == "ggem" else global_pool,
                         class_token=class_token, fc_norm=fc_norm, **kwargs)
        self.global_pool = global_pool
        self.ggem = GroupGeM(self.embed_dim, ggem_groups or num_heads, ggem_p, ggem_eps)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, None if global_pool == "ggem" else global_pool)
        if global_pool == "ggem":
            self.global_pool = global_pool

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """GGeM over the patch tokens (x (B, N, C) -> (B, C)); other pool types as timm's ViT."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type != "ggem":
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        # token reduction (vitlab.tokens) keeps how many patches each token stands for in `token_state.size`
        size = getattr(getattr(self, "token_state", None), "size", None)
        return self.ggem(x[:, start:], None if size is None else size[:, start:])


# --- converter --------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: GGeMViT) -> dict:
    """A timm / DeiT ViT state dict -> GGeM-ViT: the class token and its position embedding are dropped (GGeM pools
    the patch tokens), a final `fc_norm` becomes the pre-pool `norm`, and the exponents start at their initial value
    (`ggem.p` from `model`). Identity on a state dict already in vitlab's layout."""
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if "ggem.p" in state_dict:
        return state_dict
    state_dict = dict(state_dict)
    if "cls_token" in state_dict and model.cls_token is None:
        del state_dict["cls_token"]
        pos = state_dict.get("pos_embed")
        if pos is not None and not model.no_embed_class:
            state_dict["pos_embed"] = pos[:, 1:]  # (1, 1 + N, C) -> (1, N, C)
    if "fc_norm.weight" in state_dict and isinstance(model.fc_norm, nn.Identity):
        state_dict["norm.weight"] = state_dict.pop("fc_norm.weight")
        state_dict["norm.bias"] = state_dict.pop("fc_norm.bias")
    out = _timm_vit_filter(state_dict, model)  # npz-style keys, position-embedding resize, ...
    out["ggem.p"] = model.ggem.p.detach().clone()
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"first_conv": "patch_embed.proj", "crop_pct": 0.9, "license": "apache-2.0",
                           "paper_ids": "arXiv:2212.04114", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_vit_small_ggem": _cfg(),
    "vl_vit_base_ggem": _cfg(),
    "vl_vit_large_ggem": _cfg(),
    "vl_test_ggem": _cfg(input_size=(3, 32, 32), num_classes=10),
})


def _create_ggem(variant: str, pretrained: bool = False, **kwargs) -> GGeMViT:
    out_indices = min(3, kwargs.get("depth", 12))  # features_only: the last three blocks, as timm's ViTs
    return build_vitlab_model(GGeMViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=out_indices, **kwargs)


@register_model
def vl_vit_small_ggem(pretrained: bool = False, **kwargs) -> GGeMViT:
    """ViT-S/16 with GGeM pooling (6 groups): 22,049,902 params, 4.57 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_ggem("vl_vit_small_ggem", pretrained, **dict(arch, **kwargs))


@register_model
def vl_vit_base_ggem(pretrained: bool = False, **kwargs) -> GGeMViT:
    """ViT-B/16 with GGeM pooling (12 groups): 86,566,132 params, 17.47 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_ggem("vl_vit_base_ggem", pretrained, **dict(arch, **kwargs))


@register_model
def vl_vit_large_ggem(pretrained: bool = False, **kwargs) -> GGeMViT:
    """ViT-L/16 with GGeM pooling (16 groups): 304,324,600 params, 61.23 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_ggem("vl_vit_large_ggem", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_ggem(pretrained: bool = False, **kwargs) -> GGeMViT:
    """Tiny GGeM-ViT for tests: width 48, 2 blocks of 4 heads (4 GGeM groups), 16 tokens at 32 px."""
    arch = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
    return _create_ggem("vl_test_ggem", pretrained, **dict(arch, **kwargs))
