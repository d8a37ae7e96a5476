"""Per-block widths for timm `VisionTransformer`s: the model family that pruned ViTs are saved and rebuilt as.

timm's `VisionTransformer` builds every block with one width (`num_heads`, `embed_dim // num_heads`,
`mlp_ratio * embed_dim`). Structured pruning (NViT, Yang et al., 2023; LPViT, Xu et al., 2024) leaves each block with
its own number of heads and MLP channels, so `vl_pruned_vit` builds the *base* model by name (any timm ViT or a
vitlab hybrid such as `vl_vit_fmnist` with its conv stem), with the base's own kwargs (pruned `embed_dim`, `depth`,
stem widths go there), then gives block i `num_heads[i]` heads of `head_dim[i]` channels and `mlp_hidden[i]` MLP
channels. Every constructor kwarg is recorded in `model.vitlab.arch`, so `vitlab.create_model(DIR)` rebuilds a
pruned checkpoint from its config.json alone.

Head geometry is re-derived on each `timm.layers.Attention`: `num_heads`, `head_dim`, `attn_dim` and
`scale = head_dim ** -0.5` (what `F.scaled_dot_product_attention` uses on the fused path, so the fused and the
manual paths agree; checked in tests/prune/test_prune.py).
"""
from typing import Sequence

import timm
import torch.nn as nn
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

from ._builder import arch_kwargs
from ..record import record, update_record
from . import vit_fmnist

__all__ = ["vl_pruned_vit", "set_block_widths", "block_widths"]


def _linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None,
                     device=like.weight.device, dtype=like.weight.dtype)


def _norm_like(norm: nn.Module, width: int) -> nn.Module:
    """A LayerNorm / RmsNorm like `norm` over `width` channels (Identity stays Identity)."""
    if isinstance(norm, nn.Identity):
        return norm
    if isinstance(norm, nn.LayerNorm):
        return type(norm)(width, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    raise ValueError(f"cannot resize {type(norm).__name__} to width {width}: only LayerNorm and Identity are supported")


def block_widths(model: VisionTransformer) -> dict[str, list[int]]:
    """{"num_heads", "head_dim", "mlp_hidden"}: one entry per block of a timm VisionTransformer."""
    heads, dims, hidden = [], [], []
    for i, blk in enumerate(model.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if attn is None or not hasattr(attn, "qkv") or mlp is None or not hasattr(mlp, "fc1"):
            raise ValueError(f"block {i} ({type(blk).__name__}) is not a timm Block with attn.qkv and mlp.fc1")
        heads.append(int(attn.num_heads))
        dims.append(int(attn.head_dim))
        hidden.append(int(mlp.fc1.out_features))
    return {"num_heads": heads, "head_dim": dims, "mlp_hidden": hidden}


def set_block_widths(model: VisionTransformer, num_heads: Sequence[int], head_dim: Sequence[int],
                     mlp_hidden: Sequence[int]) -> VisionTransformer:
    """Give block i `num_heads[i]` x `head_dim[i]` attention and `mlp_hidden[i]` MLP channels (new, untrained layers).

    Only layers whose width changes are replaced; the rest keep their weights. Weights are loaded afterwards.
    """
    depth = len(model.blocks)
    for name, values in (("num_heads", num_heads), ("head_dim", head_dim), ("mlp_hidden", mlp_hidden)):
        if len(values) != depth:
            raise ValueError(f"{name} has {len(values)} entries but the model has {depth} blocks; give one per block")
        if any(int(v) < 1 for v in values):
            raise ValueError(f"{name}={list(values)}: every block needs at least 1 (remove whole blocks via depth)")
    for blk, h, d, m in zip(model.blocks, num_heads, head_dim, mlp_hidden):
        attn, mlp = blk.attn, blk.mlp
        if (attn.num_heads, attn.head_dim) != (h, d):
            dim = attn.qkv.in_features
            if getattr(attn, "gate", None) is not None:
                raise ValueError("gated attention is not supported by vl_pruned_vit")
            attn.qkv = _linear(dim, 3 * h * d, attn.qkv)
            attn.proj = _linear(h * d, attn.proj.out_features, attn.proj)
            if attn.head_dim != d:
                attn.q_norm, attn.k_norm = _norm_like(attn.q_norm, d), _norm_like(attn.k_norm, d)
            attn.norm = _norm_like(attn.norm, h * d)
            attn.num_heads, attn.head_dim, attn.attn_dim = int(h), int(d), int(h * d)
            attn.scale = d ** -0.5
        if mlp.fc1.out_features != m:
            mlp.fc1 = _linear(mlp.fc1.in_features, m, mlp.fc1)
            mlp.fc2 = _linear(m, mlp.fc2.out_features, mlp.fc2)
            if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
                mlp.norm = _norm_like(mlp.norm, m)
    return model


def _features_only(model: VisionTransformer, base: str, **feature_kwargs) -> nn.Module:
    """`model` as `features_only=True` serves a timm VisionTransformer: timm's `build_model_with_cfg` wraps it with
    the ViTs' `feature_cfg=dict(feature_cls="getter")` (a FeatureGetterNet around `forward_intermediates`), by
    default over the last three blocks (every block of a shallower model); `feature_kwargs` are timm's
    `out_indices` / `feature_cls`. The model is built already, so the builder gets it back as is (its pretrained_cfg
    and input traits, none of the cfg's defaults as constructor kwargs)."""
    return build_model_with_cfg(
        lambda **_: model, base, pretrained=False, pretrained_cfg=model.pretrained_cfg,
        kwargs_filter=("num_classes", "global_pool", "in_chans", "img_size"),
        feature_cfg=dict(out_indices=min(3, len(model.blocks)), feature_cls="getter"), features_only=True,
        **feature_kwargs)


@register_model
def vl_pruned_vit(pretrained: bool = False, base: str = "vl_vit_fmnist", base_kwargs: dict | None = None,
                  num_heads: Sequence[int] = (), head_dim: Sequence[int] = (), mlp_hidden: Sequence[int] = (),
                  **kwargs) -> nn.Module:
    """A timm ViT `base` (built with `base_kwargs`) whose block i has its own heads, head_dim and MLP width.

    `features_only=True` (with timm's `out_indices`) gives the pruned ViT's feature maps as timm's own ViTs do. The
    record names this family (`model.vitlab.spec`) and holds every constructor kwarg (`.arch`), so an instance built
    by `timm.create_model` saves as a checkpoint that `vitlab.create_model(DIR)` rebuilds, as one built by vitlab.
    """
    if pretrained:
        raise ValueError("vl_pruned_vit has no pretrained weights: rebuild it from a checkpoint folder")
    features = {k: kwargs.pop(k) for k in ("features_only", "out_indices", "feature_cls") if k in kwargs}
    base_kwargs = {**(base_kwargs or {}), **arch_kwargs(kwargs)}  # e.g. num_classes from `vitlab train`
    model = timm.create_model(base, **base_kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"base {base!r} is a {type(model).__name__}, not a timm VisionTransformer")
    widths = block_widths(model)
    set_block_widths(model, list(num_heads) or widths["num_heads"], list(head_dim) or widths["head_dim"],
                     list(mlp_hidden) or widths["mlp_hidden"])
    arch = {"base": base, "base_kwargs": {**(record(model).arch or {}), **base_kwargs},
            **{k: list(v) for k, v in block_widths(model).items()}}
    if features.pop("features_only", False):
        model = _features_only(model, base, **features)
    # spec without kwargs: the arch holds them all (vitlab.create_model replaces it with its own name and kwargs)
    update_record(model, arch=arch, spec={"name": "vl_pruned_vit", "kwargs": {}})
    return model
