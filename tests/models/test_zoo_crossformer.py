"""CrossFormer: parity with the official code (fixture), published sizes, the timm contract of a hierarchical model."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.models.crossformer import CrossFormerBlock, checkpoint_filter_fn
from vitlab.profiling import count_flops

from _zoo_common import assert_file_converts

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo" / "crossformer"


def _fixture():
    """(official state dict, {"__input__": ..., "__logits__": ..., ...}, vitlab kwargs of the tiny config)."""
    meta = json.loads((FIXTURES / "official_tiny.json").read_text())
    tensors = load_file(FIXTURES / "official_tiny.safetensors")
    cfg = dict(meta["config"])
    for key in ("drop_path_rate", "use_acl"):  # training-only / CrossFormer++ switch (False = plain CrossFormer)
        cfg.pop(key)
    weights = {k: v for k, v in tensors.items() if not k.startswith("__")}
    return weights, {k: v for k, v in tensors.items() if k.startswith("__")}, cfg


def _fixture_model():
    weights, tensors, cfg = _fixture()
    model = timm.create_model("vl_test_crossformer", **cfg).eval()
    model.load_state_dict(checkpoint_filter_fn(weights, model))
    return model, tensors


def test_official_tiny_fixture_parity():
    model, tensors = _fixture_model()
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["__input__"]), tensors["__logits__"], atol=1e-4, rtol=0)
        # 72 px: 18x18 and 9x9 maps, so SDA and LDA pad bottom/right and mask the padded keys
        torch.testing.assert_close(model(tensors["__input_72__"]), tensors["__logits_72__"], atol=1e-4, rtol=0)
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()  # identity on vitlab


def test_official_file_loads_through_timm_and_convert(tmp_path):
    weights, tensors, cfg = _fixture()
    path = tmp_path / "official.pth"
    torch.save({"model": weights, "epoch": 3}, path)  # the official training checkpoint layout
    overlay = dict(file=str(path), num_classes=cfg["num_classes"])
    model = vitlab.create_model("vl_test_crossformer", pretrained=True, pretrained_cfg_overlay=overlay, **cfg).eval()
    x, expected = tensors["__input__"], tensors["__logits__"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
    assert_file_converts(tmp_path, "vl_test_crossformer", path, checkpoint_filter_fn, x, expected, **cfg)


def test_in_chans_1_adapts_rgb_weights(tmp_path):
    rgb = vitlab.create_model("vl_test_crossformer")
    path = tmp_path / "rgb.safetensors"
    save_file(rgb.state_dict(), str(path))
    gray = vitlab.create_model("vl_test_crossformer", in_chans=1, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    for gray_proj, rgb_proj in zip(gray.patch_embed.projs, rgb.patch_embed.projs):  # every CEL conv sees the image
        torch.testing.assert_close(gray_proj.weight, rgb_proj.weight.sum(dim=1, keepdim=True))
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_grouping_follows_the_official_rules():
    block = CrossFormerBlock(32, 2, group_size=7, interval=8, lsda_flag=1)
    assert block._grouping(56, 56) == (7, 8, 0, 0, 0, 0)  # LDA: 7x7 tokens every 8 pixels
    assert block._grouping(60, 50) == (7, 8, 0, 52, 0, 6)  # padded bottom/right to multiples of 7 * 8
    assert block._grouping(7, 9) == (7, 0, 0, 0, 0, 5)  # map no larger than the group: one SDA group of min(H, W)
    block.pad_type = 1
    assert block._grouping(60, 50) == (7, 8, 26, 26, 3, 3)  # pad_type 1 splits the padding


@pytest.mark.parametrize("name, params", [("vl_crossformer_tiny", 27_776_794), ("vl_crossformer_small", 30_657_394)])
def test_param_count_equals_official(name, params):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_tiny_macs_match_readme():
    with torch.device("meta"):  # shapes are all the counter needs
        model = timm.create_model("vl_crossformer_tiny").eval()
        macs = count_flops(model, torch.randn(1, 3, 224, 224)).macs
    assert abs(macs / 2.9e9 - 1) < 0.05, macs


def test_features_only_and_intermediates():
    with torch.device("meta"):
        model = timm.create_model("vl_crossformer_tiny", features_only=True, out_indices=(1, 2, 3))
    assert model.feature_info.channels() == [128, 256, 512]
    assert model.feature_info.reduction() == [8, 16, 32]
    small = timm.create_model("vl_test_crossformer", features_only=True)
    outs = small(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 24), (2, 64, 8, 12)]
    full = timm.create_model("vl_test_crossformer").eval()
    x = torch.randn(1, 3, 64, 64)
    final, inter = full.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [32, 64]
    torch.testing.assert_close(final, full.forward_features(x))


def test_other_input_sizes_and_in_chans():
    model = timm.create_model("vl_test_crossformer", in_chans=1, num_classes=4).eval()
    for size in ((32, 32), (56, 80), (100, 36)):
        assert model(torch.randn(1, 1, *size)).shape == (1, 4)
    assert model.patch_embed.projs[0].in_channels == 1
