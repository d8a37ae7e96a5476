"""Tiny instances of every seed backbone (timm's and vitlab's), shared by the contract and applicability tests.

`SEED_MODELS[name]()` builds a random-init model with 10 classes, small enough for CPU tests; `input_shape(name,
model)` is the (C, H, W) it takes. Models are built with `vitlab.create_model`, which records name and kwargs so a
pruned model rebuilds from its config (VOLO too: create_model merges widths over those its registry functions fix;
its stem is scaled with its widths, stem_hidden_dim 64 -> 8, or the stem would be 96 % of the MACs) and PoolFormer
keeps poolformer_s12's widths.
"""
import torch.nn as nn

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
    "efficientformer_l1": dict(depths=(1, 1, 4, 2), embed_dims=(16, 32, 128, 128), num_vit=1),
    "nextvit_small": dict(depths=(1, 1, 5, 1)),
    "crossvit_tiny_240": dict(img_size=48, img_scale=(1.0, 1.0), patch_size=(8, 16), embed_dim=(24, 48),
                              num_heads=(2, 2), depth=((1, 1, 0),), mlp_ratio=(2.0, 2.0, 4.0)),
    "poolformer_s12": dict(),
}
_INPUT = {"efficientformer_l1": 224, "crossvit_tiny_240": 48, "vit_tiny_patch16_224": 32, "convit_tiny": 32,
          "tnt_s_patch16_224": 32}


def _timm(name):
    # the configured input size (what deployment exports at) is the size the tests feed
    size = _INPUT.get(name) or _TIMM_KWARGS[name].get("img_size", 64)
    overlay = dict(pretrained_cfg_overlay=dict(input_size=(3, size, size)))
    return lambda: vitlab.create_model(name, num_classes=10, **_TIMM_KWARGS[name], **overlay)


SEED_MODELS = {name: _timm(name) for name in _TIMM_KWARGS}
SEED_MODELS["volo_d1_224"] = lambda: vitlab.create_model(   # create_model overrides the widths volo_d1_224 fixes
    "volo_d1_224", layers=(1, 1, 1, 1), img_size=64, embed_dims=(24, 48, 48, 48), num_heads=(1, 2, 2, 2),
    stem_hidden_dim=8, num_classes=10, pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))
_ZOO = ("vl_test_vit", "vl_test_t2t_vit", "vl_test_spectformer", "vl_test_cvt", "vl_test_pvt", "vl_test_dinat",
        "vl_test_hornet", "vl_test_crossformer", "vl_test_rmt", "vl_test_sret", "vl_test_uniformer",
        # zoo wave 2
        "vl_test_channelvit", "vl_test_gmm_vit", "vl_test_ggem", "vl_test_fcaformer", "vl_test_favit", "vl_test_vir",
        "vl_test_soft", "vl_test_activator", "vl_test_hyena_nd", "vl_test_svt", "vl_test_sgformer", "vl_test_msvmamba",
        "vl_test_maformer", "vl_test_fmvit",
        "vl_test_dualtoken_vit",
        "vl_test_turbovit",
        "vl_test_tic",
        "vl_test_uniformer_light",
        "vl_test_crossformer_pp",
        "vl_test_stvit")
for _name in _ZOO:
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
