"""UniFormer (vitlab/models/uniformer.py) against the official code: fixtures, parameter counts, MACs, interfaces."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.models.listing import count_params_meta
from vitlab.models.uniformer import UniFormer, checkpoint_filter_fn
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_official_file_converts, official_fixture

# exact counts of the official constructors (image_classification/models/uniformer.py at 52a0415, 1000 classes)
OFFICIAL_PARAMS = {
    "vl_uniformer_small": 21_545_256,
    "vl_uniformer_small_plus": 24_032_552,
    "vl_uniformer_small_plus_dim64": 24_032_552,
    "vl_uniformer_base": 49_776_552,
    "vl_uniformer_base_ls": 49_796_520,
}


def _fixture(name: str):
    return official_fixture("uniformer", name)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("fixture", ["official_tiny", "official_tiny_convstem_ls"])
def test_logits_match_official_code(fixture):
    meta, x, logits, official_state = _fixture(fixture)
    assert meta["commit"] == "52a0415e4e0dda880fab8ffbc710e4d8e171149d"
    model = UniFormer(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))  # strict: every tensor mapped
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_uniformer"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    _, x, logits, official_state = _fixture("official_tiny")
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    model = vitlab.create_model("vl_test_uniformer", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_uniformer", pretrained=True, in_chans=1,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    # timm's in_chans adaptation sums the RGB filters of `first_conv`: a gray image then acts like an RGB one
    rgb_filters = official_state["patch_embed1.proj.weight"]
    torch.testing.assert_close(gray.patch_embed.proj.weight, rgb_filters.sum(1, keepdim=True))
    with torch.no_grad():
        gray_x = x[:, :1]
        torch.testing.assert_close(gray(gray_x), model(gray_x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_file_converts_to_a_vitlab_checkpoint(tmp_path):
    meta, x, logits, official_state = _fixture("official_tiny_convstem_ls")
    # the official files wrap the state dict in {"model": ...}
    assert_official_file_converts(tmp_path, "vl_test_uniformer", {"model": official_state}, checkpoint_filter_fn, x,
                                  logits, **meta["vitlab_kwargs"])


def test_macs_at_224_match_readme():
    with torch.device("meta"):  # uninitialised weights (skips the init of 22M parameters): enough to count MACs
        model = vitlab.create_model("vl_uniformer_small")
    macs = count_flops(model.to_empty(device="cpu").eval(), torch.randn(1, 3, 224, 224)).macs
    assert abs(macs / 3.6e9 - 1) < 0.05, macs  # README "FLOPs" 3.6G (multiply-adds); counted 3.63G


def test_features_only_and_intermediates():
    x = torch.randn(2, 3, 64, 64)
    features = timm.create_model("vl_test_uniformer", features_only=True)
    assert features.feature_info.channels() == [32, 32, 64, 64]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in features(x)] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]
    some = timm.create_model("vl_test_uniformer", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in some(x)] == [32, 64]

    model = vitlab.create_model("vl_test_uniformer").eval()
    final, inter = model.forward_intermediates(x)
    assert [tuple(t.shape[-2:]) for t in inter] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    torch.testing.assert_close(final, model.forward_features(x))
    nhwc = model.forward_intermediates(x, indices=1, output_fmt="NHWC", intermediates_only=True)
    torch.testing.assert_close(nhwc[0], inter[-1].permute(0, 2, 3, 1))


def test_other_input_size_and_one_channel():
    model = vitlab.create_model("vl_test_uniformer", num_classes=5).eval()
    assert model(torch.randn(1, 3, 96, 80)).shape == (1, 5)
    assert model.forward_features(torch.randn(1, 3, 96, 80)).shape == (1, 64, 3, 2)
    gray = vitlab.create_model("vl_test_uniformer", in_chans=1, conv_stem=True)
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_pre_logits_and_reset_classifier():
    model = vitlab.create_model("vl_test_uniformer").eval()
    features = model.forward_features(torch.randn(2, 3, 64, 64))
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 64)
