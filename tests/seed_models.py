"""Tiny instances of every seed backbone (timm's and vitlab's), shared by the contract and applicability tests.

`SEED_MODELS[name]()` builds a random-init model with 10 classes, small enough for CPU tests; `input_shape(model)`
is the (C, H, W) it takes. Families whose timm registry functions fix the widths are built from their classes.
"""
import timm
import torch.nn as nn
from timm.models import crossvit, efficientformer, metaformer, nextvit, volo

import vitlab

_TIMM_KWARGS = {
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2, reg_tokens=2, qk_norm=True),
    "swin_tiny_patch4_window7_224": dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2)),
    "swinv2_tiny_window8_256": dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2)),
    "pvt_v2_b0": dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1)),
    "tiny_vit_5m_224": dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                            window_sizes=(4, 4, 4, 2)),
    "convit_tiny": dict(img_size=32, patch_size=8, depth=2, local_up_to_layer=1, embed_dim=48, num_heads=4),
    "tnt_s_patch16_224": dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads_outer=4, inner_dim=16,
                              num_heads_inner=2),
    "vitamin_small_224": dict(img_size=64, depth=2),
    "efficientvit_m0": dict(img_size=64),
    "convnext_atto": dict(dims=(16, 32, 48, 64)),
}
_INPUT = {"efficientformer_l1": 224, "crossvit_tiny_240": 48, "vit_tiny_patch16_224": 32, "convit_tiny": 32,
          "tnt_s_patch16_224": 32}


def _timm(name):
    return lambda: timm.create_model(name, num_classes=10, **_TIMM_KWARGS[name])


SEED_MODELS = {name: _timm(name) for name in _TIMM_KWARGS}
SEED_MODELS.update({
    "efficientformer_l1": lambda: efficientformer.EfficientFormer(depths=(1, 1, 1, 2), embed_dims=(16, 32, 48, 64),
                                                                  num_vit=1, num_classes=10),
    "nextvit_small": lambda: nextvit.NextViT(in_chans=3, depths=(1, 1, 5, 1), num_classes=10),
    "crossvit_tiny_240": lambda: crossvit.CrossVit(img_size=48, patch_size=(8, 16), embed_dim=(24, 48),
                                                   num_heads=(2, 2), depth=((1, 1, 0),), num_classes=10),
    "volo_d1_224": lambda: volo.VOLO(layers=(1, 1, 1, 1), img_size=64, embed_dims=(24, 48, 48, 48),
                                     num_heads=(1, 2, 2, 2), num_classes=10),
    "poolformer_s12": lambda: metaformer.MetaFormer(
        depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), token_mixers=metaformer.Pooling, num_classes=10,
        norm_layers=metaformer.GroupNorm1, mlp_act=nn.GELU, mlp_bias=True, layer_scale_init_values=1e-5,
        res_scale_init_values=None, use_mlp_head=False),
})
for _name in ("vl_test_vit", "vl_test_t2t_vit", "vl_test_spectformer", "vl_test_cvt", "vl_test_pvt", "vl_test_dinat",
              "vl_test_hornet", "vl_test_crossformer", "vl_test_rmt", "vl_test_sret", "vl_test_uniformer"):
    SEED_MODELS[_name] = (lambda n: lambda: vitlab.create_model(n, num_classes=10))(_name)


def input_shape(name: str, model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None)
    if name in _INPUT:
        return (3, _INPUT[name], _INPUT[name])
    if name.startswith("vl_"):
        return tuple(cfg["input_size"])
    size = _TIMM_KWARGS.get(name, {}).get("img_size", 64)
    return (3, size, size)


def build(name: str) -> nn.Module:
    """A fresh tiny instance in eval mode."""
    return SEED_MODELS[name]().eval()
