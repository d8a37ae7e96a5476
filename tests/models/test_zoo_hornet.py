"""HorNet: exact parameter counts, MACs against the README, parity with the official code (fixture), loaders, shapes."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.models.hornet import GnConv, checkpoint_filter_fn
from vitlab.profiling import count_flops

from _zoo_common import assert_file_converts, assert_filter_is_identity, meta_model

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zoo" / "hornet"
# the official tiny configuration of the fixture, in vitlab's arguments (official_tiny.json has the official ones)
TINY = dict(base_dim=8, depths=(1, 1, 2, 1), num_classes=10, img_size=64)

# exact counts of the official constructors (raoyongming/HorNet hornet.py @ ac9e210), 1000 classes
OFFICIAL_PARAMS = {
    "vl_hornet_tiny_7x7": 22_409_512,
    "vl_hornet_tiny_gf": 22_991_848,
    "vl_hornet_small_7x7": 49_528_264,
    "vl_hornet_small_gf": 50_401_768,
}


@pytest.fixture(scope="module")
def official():
    tensors = load_file(str(FIXTURE / "official_tiny.safetensors"))
    extras = {k: tensors.pop(k) for k in list(tensors) if k.startswith("__")}
    return tensors, extras


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert sum(p.numel() for p in meta_model(name).parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name, published", [("vl_hornet_tiny_7x7", 4.0e9), ("vl_hornet_tiny_gf", 3.9e9)])
def test_macs_match_readme(name, published):
    with torch.device("meta"):
        count = count_flops(meta_model(name), torch.empty(1, 3, 224, 224))
    assert abs(count.macs / published - 1) < 0.05, count.macs
    fft = sum(v for op, v in count.by_op.items() if "fft" in op)
    if name.endswith("_gf"):  # 18 stage-3 + 2 stage-4 filters, each an rfft2 and an irfft2 (2.5 n log2 n per channel)
        assert 30e6 < fft < 40e6, fft
    else:
        assert fft == 0


def test_fixture_provenance():
    meta = json.loads((FIXTURE / "official_tiny.json").read_text())
    assert meta["official_commit"] == "ac9e21058935f1cf8e27fcca72bbf598fa691d69"
    assert meta["config"]["base_dim"] == TINY["base_dim"] and tuple(meta["config"]["depths"]) == TINY["depths"]


def test_logits_match_official(official):
    state, extras = official
    model = vitlab.create_model("vl_test_hornet", **TINY).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(extras["__input__"]), extras["__logits__"], atol=1e-4, rtol=0)
        # 96 px: stage-3/4 grids 6x6 / 3x3, global filters interpolated at run time as the official forward does
        torch.testing.assert_close(model(extras["__input_96__"]), extras["__logits_96__"], atol=1e-4, rtol=0)


def test_filter_resized_at_load_equals_runtime_interpolation(official):
    state, extras = official
    model = vitlab.create_model("vl_test_hornet", **dict(TINY, img_size=96)).eval()  # filters sized (6, 4), (3, 2)
    assert model.stages[2].blocks[0].gnconv.dwconv.complex_weight.shape[1:3] == (6, 4)
    model.load_state_dict(checkpoint_filter_fn({"model": state}, model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(extras["__input_96__"]), extras["__logits_96__"], atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_hornet"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_and_convert(official, tmp_path):
    state, extras = official
    path = tmp_path / "official.pth"
    torch.save({"model": state, "epoch": 3}, path)  # the official training checkpoint layout
    # num_classes in the overlay too: otherwise timm drops a classifier whose size differs from the cfg's
    overlay = dict(file=str(path), num_classes=TINY["num_classes"])
    model = vitlab.create_model("vl_test_hornet", pretrained=True, pretrained_cfg_overlay=overlay, **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(extras["__input__"]), extras["__logits__"], atol=1e-4, rtol=0)
    assert_file_converts(tmp_path, "vl_test_hornet", path, checkpoint_filter_fn, extras["__input__"],
                         extras["__logits__"], **TINY)


def test_in_chans_1_adapts_rgb_weights(tmp_path):
    rgb = vitlab.create_model("vl_test_hornet")
    path = tmp_path / "rgb.safetensors"
    save_file(rgb.state_dict(), str(path))
    gray = vitlab.create_model("vl_test_hornet", in_chans=1, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(gray.stem[0].weight, rgb.stem[0].weight.sum(dim=1, keepdim=True))
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("size", [(96, 96), (64, 128)])
def test_other_input_sizes(size):
    model = vitlab.create_model("vl_test_hornet", num_classes=5).eval()
    assert model(torch.randn(1, 3, *size)).shape == (1, 5)


def test_features_only_and_intermediates():
    x = torch.randn(2, 3, 64, 64)
    features = vitlab.create_model("vl_test_hornet", features_only=True)
    maps = features(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    model = vitlab.create_model("vl_test_hornet").eval()
    final, inter = model.forward_intermediates(x, indices=[1, 3])
    assert [tuple(m.shape) for m in inter] == [(2, 64, 8, 8), (2, 256, 2, 2)]
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)) == 2
    assert tuple(model.forward_head(final, pre_logits=True).shape) == (2, 256)


def test_order_one_gnconv_is_a_gated_conv():
    torch.manual_seed(0)
    layer = GnConv(8, order=1, scale=0.5)
    x = torch.randn(1, 5, 5, 8)  # (B, H, W, C): blocks run channels-last
    p, q = layer.proj_in(x).chunk(2, dim=-1)
    gate = layer.dwconv(q.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(layer(x), layer.proj_out(p * gate * 0.5))
