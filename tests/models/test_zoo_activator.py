"""Activator (paper only, no official code): exact parameter counts against the block formula, MACs against the
analytic count, the mechanism (no softmax, one token-gated GLU MLP per block, what token permutation does), loaders.

The paper's parameter / FLOP tables were not readable (see vitlab/models/activator.py), so the counts here are the
structure's, asserted as literals and as the closed-form formula of the documented block."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import vitlab
from vitlab.checkpoint import load_weights
from vitlab.models.activator import ActivatorBlock, TokenGatedMLP, activator_params_per_block, checkpoint_filter_fn
from vitlab.profiling import count_flops

from _zoo_common import meta_model

PARAMS = {"vl_activator_tiny": 6_175_768, "vl_activator_small": 22_504_024, "vl_activator_base": 87_011_032,
          "vl_test_activator": 109_480}
WIDTH = {"vl_activator_tiny": 192, "vl_activator_small": 384, "vl_activator_base": 768}


def _formula(dim, depth, tokens, patch=16, in_chans=3, classes=1000, mlp_ratio=4.0):
    stem = in_chans * patch * patch * dim + dim + tokens * dim
    return stem + depth * activator_params_per_block(dim, tokens, mlp_ratio) + 2 * dim + dim * classes + classes


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count(name):
    model = meta_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[name]
    if name in WIDTH:
        assert count == _formula(WIDTH[name], 12, 196)
    else:
        assert count == _formula(48, 3, 64, patch=4, mlp_ratio=2.0)


@pytest.mark.parametrize("name", sorted(WIDTH))
def test_macs_match_analytic(name):
    C, N, D = WIDTH[name], 196, 4 * WIDTH[name]
    per_block = N * 3 * C * D + D * N * N  # fc_value, fc_gate, fc2 per token; token_proj per hidden channel
    analytic = 12 * per_block + N * 3 * 256 * C + C * 1000
    with torch.device("meta"):
        macs = count_flops(meta_model(name), torch.empty(1, 3, 224, 224)).macs
    assert macs == pytest.approx(analytic, rel=0.005)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def _ops(model, x):
    with torch.no_grad(), _OpNames() as seen:
        model(x)
    return seen.names


def test_no_softmax_anywhere():
    ops = _ops(vitlab.create_model("vl_test_activator").eval(), torch.randn(2, 3, 32, 32))
    assert not [op for op in ops if "softmax" in op or "scaled_dot_product" in op], ops
    # the detector sees attention where there is some
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    assert any("softmax" in op or "scaled_dot_product" in op for op in _ops(vit, torch.randn(2, 3, 32, 32)))


def test_one_gated_mlp_per_block():
    model = vitlab.create_model("vl_test_activator")
    assert len(model.blocks) == 3
    for block in model.blocks:
        assert isinstance(block, ActivatorBlock)
        kinds = [type(m) for m in block.modules()]
        assert kinds.count(TokenGatedMLP) == 1
        assert sum(issubclass(k, nn.Linear) for k in kinds) == 4  # value, gate, token projection, output
        assert not any("Attention" in k.__name__ or k.__name__ == "Mlp" for k in kinds)
    assert sum(isinstance(m, TokenGatedMLP) for m in model.modules()) == 3


def test_gated_mlp_equals_its_formula():
    torch.manual_seed(0)
    layer = TokenGatedMLP(8, 5, 12).eval()
    x = torch.randn(2, 5, 8)
    gate = torch.einsum("mn,bnd->bmd", layer.token_proj.weight, layer.fc_gate(x)) + layer.token_proj.bias[:, None]
    expected = layer.fc2(F.gelu(gate) * layer.fc_value(x))
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    swiglu = TokenGatedMLP(8, 5, 12, act_layer=nn.SiLU)
    swiglu.load_state_dict(layer.state_dict())
    torch.testing.assert_close(swiglu(x), layer.fc2(F.silu(gate) * layer.fc_value(x)), atol=1e-6, rtol=0)


def test_token_permutation():
    """The token projection is a fixed N x N mixing: permuting the tokens does not permute the output, unless the
    projection is conjugated by the same permutation (then the block is equivariant)."""
    torch.manual_seed(0)
    block = ActivatorBlock(16, 9, mlp_ratio=2.0).eval()
    x, perm = torch.randn(2, 9, 16), torch.randperm(9)
    with torch.no_grad():
        out = block(x)
        assert (block(x[:, perm]) - out[:, perm]).abs().max() > 1e-3
        block.mlp.token_proj.weight.copy_(block.mlp.token_proj.weight[perm][:, perm])
        block.mlp.token_proj.bias.copy_(block.mlp.token_proj.bias[perm])
        conjugated = block(x[:, perm])
    torch.testing.assert_close(conjugated, out[:, perm], atol=1e-5, rtol=0)


def test_mixing_is_global_and_size_is_fixed():
    torch.manual_seed(0)
    block = ActivatorBlock(16, 9, mlp_ratio=2.0).eval()
    x = torch.randn(1, 9, 16)
    y = x.clone()
    y[:, 0] += torch.randn(16)  # not a constant shift: the norm would remove it
    with torch.no_grad():
        changed = (block(y) - block(x)).abs().amax(dim=-1)[0]
    assert (changed[1:] > 1e-4).all()  # one token reaches every other token in one block
    with pytest.raises(ValueError, match="mixes exactly 9 tokens"):
        block(torch.randn(1, 16, 16))


def test_other_input_size_is_built_for():
    model = vitlab.create_model("vl_test_activator", img_size=48, num_classes=5).eval()
    assert model.blocks[0].mlp.token_proj.weight.shape == (144, 144)
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 5)


def test_round_trip_and_filter(tmp_path):
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_activator", num_classes=10).eval()
    state = model.state_dict()
    out = checkpoint_filter_fn(state, model)
    assert out.keys() == state.keys() and all(out[k] is state[k] for k in state)
    path = tmp_path / "activator.safetensors"
    save_file(state, str(path))
    fresh = load_weights(vitlab.create_model("vl_test_activator", num_classes=10).eval(), path,
                         filter_fn=checkpoint_filter_fn)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    other = vitlab.create_model("vl_test_activator", img_size=48)
    with pytest.raises(ValueError, match="token_proj.weight mixes 64 tokens"):
        checkpoint_filter_fn(state, other)


def test_in_chans_1_adapts_rgb_weights(tmp_path):
    rgb = vitlab.create_model("vl_test_activator")
    path = tmp_path / "rgb.safetensors"
    save_file(rgb.state_dict(), str(path))
    gray = vitlab.create_model("vl_test_activator", in_chans=1, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(gray.patch_embed.proj.weight, rgb.patch_embed.proj.weight.sum(dim=1, keepdim=True))
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 1000)


def test_intermediates_and_features_only():
    x = torch.randn(2, 3, 32, 32)
    model = vitlab.create_model("vl_test_activator").eval()
    final, inter = model.forward_intermediates(x, indices=[0, 2])
    assert [tuple(m.shape) for m in inter] == [(2, 48, 8, 8), (2, 48, 8, 8)]
    torch.testing.assert_close(final, model.forward_features(x))
    features = vitlab.create_model("vl_test_activator", features_only=True, out_indices=(1, 2))
    assert [tuple(m.shape) for m in features(x)] == [(2, 48, 8, 8), (2, 48, 8, 8)]
