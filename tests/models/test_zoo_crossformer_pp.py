"""CrossFormer++: parity with the official code (fixture), published sizes, PGS and ACL as released, timm contract."""
import json
from functools import lru_cache
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.contract import describe
from vitlab.models.crossformer import CrossFormer, CrossFormerBlock
from vitlab.models.crossformer_pp import CooledCrossFormerBlock, acl_positions, checkpoint_filter_fn
from vitlab.profiling import count_flops

from _zoo_common import assert_file_converts

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo" / "crossformer_pp"


@lru_cache(maxsize=None)
def _meta(name: str) -> torch.nn.Module:
    """A released variant built on the meta device (shapes only), once per test session."""
    with torch.device("meta"):
        return timm.create_model(name)


def _fixture():
    """(official state dict, {"__input__": ..., "__logits__": ..., ...}, vitlab kwargs of the tiny config)."""
    meta = json.loads((FIXTURES / "official_tiny.json").read_text())
    tensors = load_file(FIXTURES / "official_tiny.safetensors")
    cfg = dict(meta["config"])
    cfg.pop("drop_path_rate")  # training only
    weights = {k: v for k, v in tensors.items() if not k.startswith("__")}
    return weights, {k: v for k, v in tensors.items() if k.startswith("__")}, cfg


def test_official_tiny_fixture_parity():
    weights, tensors, cfg = _fixture()
    model = timm.create_model("vl_test_crossformer_pp", **cfg).eval()
    assert any(k.endswith("ex_conv.weight") for k in weights)  # the fixture has an ACL to convert
    model.load_state_dict(checkpoint_filter_fn(weights, model))
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["__input__"]), tensors["__logits__"], atol=1e-4, rtol=0)
        # 40 px: 10x10 and 5x5 maps, so LDA (both stages) and SDA (stage 2) pad and mask
        torch.testing.assert_close(model(tensors["__input_40__"]), tensors["__logits_40__"], atol=1e-4, rtol=0)
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()  # identity on vitlab


def test_official_file_loads_through_timm_and_convert(tmp_path):
    weights, tensors, cfg = _fixture()
    path = tmp_path / "official.pth"
    torch.save({"model": weights, "epoch": 3}, path)  # the official training checkpoint layout
    overlay = dict(file=str(path), num_classes=cfg["num_classes"])
    model = vitlab.create_model("vl_test_crossformer_pp", pretrained=True, pretrained_cfg_overlay=overlay,
                                **cfg).eval()
    x, expected = tensors["__input__"], tensors["__logits__"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
    reloaded = assert_file_converts(tmp_path, "vl_test_crossformer_pp", path, checkpoint_filter_fn, x, expected, **cfg)
    assert isinstance(reloaded.stages[1].blocks[2], CooledCrossFormerBlock)


def test_in_chans_1_adapts_rgb_weights(tmp_path):
    rgb = vitlab.create_model("vl_test_crossformer_pp")
    path = tmp_path / "rgb.safetensors"
    save_file(rgb.state_dict(), str(path))
    gray = vitlab.create_model("vl_test_crossformer_pp", in_chans=1, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    for gray_proj, rgb_proj in zip(gray.patch_embed.projs, rgb.patch_embed.projs):  # every CEL conv sees the image
        torch.testing.assert_close(gray_proj.weight, rgb_proj.weight.sum(dim=1, keepdim=True))
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 10)


# official constructor + configs/crossformer_pp/*.yaml at 795201075f (README: 23.3M / 52.0M / 92.0M / 96.0M)
@pytest.mark.parametrize("name, params", [
    ("vl_crossformer_pp_s", 23_325_340), ("vl_crossformer_pp_b", 51_994_594),
    ("vl_crossformer_pp_l", 92_001_904), ("vl_crossformer_pp_h", 95_962_944)])
def test_param_count_equals_official(name, params):
    assert sum(p.numel() for p in _meta(name).parameters()) == params


def _cooled(model) -> list[list[int]]:
    return [[j for j, b in enumerate(stage.blocks) if isinstance(b, CooledCrossFormerBlock)] for stage in model.stages]


def test_acl_where_released():
    assert acl_positions(18) == [i in (2, 5, 8, 11, 14) for i in range(18)]  # every third block, never the last
    assert acl_positions(3) == [False] * 3 and acl_positions(2) == [False] * 2
    assert _cooled(timm.create_model("vl_test_crossformer_pp", use_acl=False)) == [[], []]
    small, huge = _meta("vl_crossformer_pp_s"), _meta("vl_crossformer_pp_h")
    assert _cooled(small) == [[], [], [2, 5, 8, 11, 14], []]  # the official S/B/L: 5 ACLs, all in stage 3
    assert _cooled(huge) == [[2], [2], [2, 5, 8, 11, 14], []]  # H's 6-block stages 1-2 get one each: 7
    assert sum(p.numel() for n, p in small.named_parameters() if ".cool." in n) == 5 * 256 * 12
    # depthwise 3x3 conv (9 weights + bias) and LayerNorm (2) per channel of stage 3 (256 wide)


def test_progressive_group_sizes_as_released():
    model = _meta("vl_crossformer_pp_b")
    assert [{b.group_size for b in s.blocks} for s in model.stages] == [{4}, {4}, {14}, {7}]
    assert [{b.interval for b in s.blocks} for s in model.stages] == [{4}, {2}, {1}, {1}]
    # at 224 px (maps 56, 28, 14, 7): 4x4 groups (LDA every 4 / 2 pixels, padded to multiples of 16 / 8) in the
    # shallow stages, one group over the whole map (global attention) in the deep ones
    sda, lda = [[s.blocks[i]._grouping(224 // 4 >> k, 224 // 4 >> k) for k, s in enumerate(model.stages)]
                for i in (0, 1)]
    assert sda == [(4, 0, 0, 0, 0, 0), (4, 0, 0, 0, 0, 0), (14, 0, 0, 0, 0, 0), (7, 0, 0, 0, 0, 0)]
    assert lda == [(4, 4, 0, 8, 0, 8), (4, 2, 0, 4, 0, 4), (14, 0, 0, 0, 0, 0), (7, 0, 0, 0, 0, 0)]


def test_acl_cools_the_residual_stream():
    torch.manual_seed(0)
    cooled = CooledCrossFormerBlock(32, 2, group_size=4, interval=2).eval()
    plain = CrossFormerBlock(32, 2, group_size=4, interval=2).eval()
    plain.load_state_dict(cooled.state_dict(), strict=False)
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        for scale in (1.0, 1000.0):
            out = cooled(scale * x)  # LayerNorm(dwconv(.)) with unit affine: every token has mean 0, std 1
            torch.testing.assert_close(out.mean(-1), torch.zeros(2, 8, 8), atol=1e-4, rtol=0)
            torch.testing.assert_close(out.std(-1, unbiased=False), torch.ones(2, 8, 8), atol=1e-3, rtol=0)
        assert plain(1000.0 * x).abs().amax() > 100  # without the ACL the amplitude carries through
        torch.testing.assert_close(cooled.cool(plain(x)), cooled(x))  # the ACL replaces the stream, no shortcut


def test_without_acl_it_is_crossformer():
    kwargs = dict(embed_dim=32, depths=(1, 4), num_heads=(2, 2), group_size=(4, 8), crs_interval=(2, 1),
                  mlp_ratio=2.0, patch_size=(4, 8), merge_size=((2, 4),), num_classes=10)
    pp = timm.create_model("vl_test_crossformer_pp", use_acl=False).eval()
    v1 = CrossFormer(**kwargs).eval()
    v1.load_state_dict(pp.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pp(x), v1(x))
        assert not torch.allclose(timm.create_model("vl_test_crossformer_pp").eval()(x), pp(x))


@pytest.mark.slow
def test_base_macs_match_readme():
    with torch.device("meta"):  # shapes are all the counter needs
        model = timm.create_model("vl_crossformer_pp_b").eval()
        macs = count_flops(model, torch.randn(1, 3, 224, 224)).macs
    assert abs(macs / 9.5e9 - 1) < 0.02, macs


def test_features_only_and_intermediates():
    small = timm.create_model("vl_test_crossformer_pp", features_only=True)
    outs = small(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 24), (2, 64, 8, 12)]
    full = timm.create_model("vl_test_crossformer_pp").eval()
    x = torch.randn(1, 3, 64, 64)
    final, inter = full.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [32, 64]
    torch.testing.assert_close(final, full.forward_features(x))


def test_other_input_sizes_and_in_chans():
    model = timm.create_model("vl_test_crossformer_pp", in_chans=1, num_classes=4).eval()
    for size in ((56, 80), (100, 36)):
        assert model(torch.randn(1, 1, *size)).shape == (1, 4)
    assert model.patch_embed.projs[0].in_channels == 1


def test_contract_says_cooled_blocks_cannot_be_dropped():
    spec = describe(timm.create_model("vl_test_crossformer_pp"))
    assert spec.family == "vl_crossformer_pp"
    assert [b.residual for b in spec.blocks] == [True, True, True, False, True]  # stage 2's block 2 ends with an ACL
