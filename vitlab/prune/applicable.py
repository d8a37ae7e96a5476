"""Which models structured pruning (`prune`) can cut and rebuild, checked before any work.

`prune` removes heads, MLP channels, blocks, stem and embedding channels of a timm `VisionTransformer` made of timm
`Block`s (`Attention` + `Mlp`-style MLP with `fc1` / `fc2`), and rebuilds the result from the model's name and
kwargs (`vitlab.checkpoint.model_spec`), so a pruned checkpoint reloads from config.json alone. Anything else is
refused with `TechniqueNotApplicable` naming the model class and the reason (hierarchical and conv models: the
model-contract work; see README, "Techniques and models").
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Mlp, SwiGLUPacked
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from ..checkpoint import CheckpointError, create_model, model_spec
from ..techniques import TechniqueNotApplicable

__all__ = ["check_prunable"]

SUPPORTED = ("timm VisionTransformer models built from timm Blocks with Attention and an fc1/fc2 MLP (ViT, DeiT, "
             "DeiT III, register tokens, vl_vit_fmnist, ...), created with vitlab.create_model or timm.create_model")


def check_prunable(model: nn.Module, technique: str = "prune") -> None:
    """Raise `TechniqueNotApplicable` unless `prune` can cut `model` and rebuild it from its name and kwargs."""
    def refuse(why: str):
        raise TechniqueNotApplicable(technique, model, f"{why}; it supports {SUPPORTED}")

    if not isinstance(model, VisionTransformer):
        stages = "stages" if hasattr(model, "stages") or hasattr(model, "layers") else "no `blocks`"
        refuse(f"not a plain ViT (it has {stages})")
    proj = getattr(model.patch_embed, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        refuse(f"its patch embedding {type(model.patch_embed).__name__} has no `proj` convolution to cut the "
               "embedding channels of")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            refuse(f"block {i} is {type(blk).__name__}, not timm Block")
        if type(blk.attn) is not Attention:
            refuse(f"block {i}'s attention is {type(blk.attn).__name__}, not timm Attention")
        if type(blk.mlp) not in (Mlp, SwiGLUPacked) or not isinstance(getattr(blk.mlp, "fc1", None), nn.Linear):
            refuse(f"block {i}'s MLP is {type(blk.mlp).__name__}, not an fc1/fc2 Mlp")
    if getattr(model, "attn_pool", None) is not None:
        refuse("its head pools with attention (global_pool='map'), whose widths pruning does not follow")
    _check_rebuild(model, refuse)


def _check_rebuild(model: nn.Module, refuse) -> None:
    """The pruned model is rebuilt from `model_spec(model)`: that spec must rebuild this very architecture (a timm
    model built with kwargs vitlab does not know, e.g. another patch size or depth, would come back different)."""
    try:
        spec = model_spec(model)
    except CheckpointError as e:
        refuse(str(e))
    try:
        with torch.device("meta"):
            again = create_model(spec["name"], **spec["kwargs"])
    except Exception as e:  # noqa: BLE001 - any failure to rebuild means the same refusal
        refuse(f"it cannot be rebuilt from {spec['name']} with {spec['kwargs']} ({type(e).__name__}: {e})")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in again.state_dict().items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got.get(k)]
        refuse(f"{spec['name']} rebuilt with {spec['kwargs']} is another architecture ({', '.join(diff[:3])} differ): "
               "create the model with vitlab.create_model(name, **kwargs) so that its kwargs are recorded")
