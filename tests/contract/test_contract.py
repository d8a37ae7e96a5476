"""The model contract (vitlab.contract): every seed backbone is described, and every claim an adapter makes holds
on the model — names resolve to the modules given, each block's declared layout is the layout a forward pass feeds
it, attention mixers' heads divide their widths, and token-reducible blocks are exactly the expected ones."""
import pytest
import torch
import torch.nn as nn

from seed_models import SEED_MODELS, build, input_shape
from vitlab.contract import ATTENTION_KINDS, NoAdapter, describe

# blocks where merging tokens is well defined (sequence layout, global attention, no grid use), per model
REDUCIBLE = {"vit_tiny_patch16_224": 2, "vitamin_small_224": 2, "convit_tiny": 1, "crossvit_tiny_240": 2,
             "vl_test_vit": 2, "vl_test_t2t_vit": 2, "vl_test_spectformer": 2, "vl_test_pvt": 1,
             "vl_test_channelvit": 2, "vl_test_ggem": 2, "vl_test_soft": 1,
             "vl_test_hyena_nd": 2}


def _channels(block) -> set[int]:
    """The block's input width: that of its first MLP's first layer, or of its first layer (Next-ViT's blocks
    start with a channel-changing patch embedding)."""
    out = set()
    for where in ([block.module.get_submodule(block.mlps[0])] if block.mlps else []) + [block.module]:
        first = next(m for m in where.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        out.add(first.in_features if isinstance(first, nn.Linear) else first.in_channels)
    return out


@pytest.mark.parametrize("name", list(SEED_MODELS))
def test_adapter_claims_hold(name):
    model = build(name)
    spec = describe(model)
    modules = dict(model.named_modules())
    assert spec.blocks and all(modules[b.name] is b.module for b in spec.blocks)
    assert spec.stem and all(n in modules for n in spec.stem + spec.head), (spec.stem, spec.head)
    for block, mixer in spec.mixers():
        assert block.module.get_submodule(mixer.name) is mixer.module
        for rel in mixer.qkv + ((mixer.proj,) if mixer.proj else ()):
            assert isinstance(mixer.module.get_submodule(rel), nn.Module)
        if mixer.kind in ATTENTION_KINDS:
            assert mixer.num_heads and mixer.num_heads > 0, (block.name, mixer.kind)
        for mlp in block.mlps:
            block.module.get_submodule(mlp)

    seen = {}
    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].shape)
        return hook

    hooks = [b.module.register_forward_pre_hook(record(b.name)) for b in spec.blocks]
    with torch.no_grad():
        model(torch.randn(1, *input_shape(name, model)))
    for h in hooks:
        h.remove()
    checked = 0
    for b in spec.blocks:
        shape, c = seen[b.name], _channels(b)
        if b.layout == "sequence":
            assert len(shape) == 3 and shape[-1] in c, (b.name, shape)
            checked += 1
        elif shape[1] != shape[-1]:        # (B, C, H, W) and (B, H, W, C) differ only when C != W
            assert len(shape) == 4 and shape[1 if b.layout == "nchw" else -1] in c, (b.name, b.layout, shape, c)
            checked += 1
    assert checked, "every block's layout was ambiguous; change the tiny instance's widths"
    assert sum(b.token_reducible for b in spec.blocks) == REDUCIBLE.get(name, 0)


def test_unknown_model_is_refused_by_name():
    with pytest.raises(NoAdapter, match="Sequential.*supports the families"):
        describe(nn.Sequential(nn.Conv2d(3, 8, 3)), "prune")
