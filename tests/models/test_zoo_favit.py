"""FaViT (vitlab/models/favit.py) against the official code: fixture, parameter counts, MACs, FaSA's pieces."""
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.swin_transformer import WindowAttention

import vitlab
from vitlab.models.favit import (FactorizationAttention, FaViT, checkpoint_filter_fn, dilated_windows, group_dims,
                                 mirror_pad, pool_windows)
from vitlab.models.listing import count_params_meta
from vitlab.profiling import count_flops

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo" / "favit"
sys.path.insert(0, str(FIXTURES))
from make_fixture import enlarge  # noqa: E402  (the stored input is enlarged 4x, as when the fixture was made)

from _zoo_common import assert_filter_is_identity, assert_official_file_converts, official_fixture

# exact counts of the official constructors (FaViT/classification/favit.py at 529b46b, 1000 classes)
OFFICIAL_PARAMS = {
    "vl_favit_b0": 3_427_704,
    "vl_favit_b1": 12_958_568,
    "vl_favit_b2": 24_919_896,
    "vl_favit_b3": 48_746_440,
}
B0_STAGES_AT_224 = [(56, 32, 1, 8), (28, 64, 2, 4), (14, 128, 4, 2), (7, 256, 8, 1)]  # grid, dim, heads, sr_ratio


def _fixture():
    meta, x, logits, state = official_fixture("favit")
    return meta, enlarge(x), logits, state


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


def test_logits_match_official_code():
    meta, x, logits, official_state = _fixture()
    assert meta["commit"] == "529b46be9a737537bff2e6f1a00e0455fc0ae802" and x.shape[-2:] == (128, 160)
    model = FaViT(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))  # strict: every tensor mapped
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_favit"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    meta, x, logits, official_state = _fixture()
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    overlay = dict(file=str(path))
    model = vitlab.create_model("vl_test_favit", pretrained=True, pretrained_cfg_overlay=overlay,
                                **meta["vitlab_kwargs"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_favit", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay,
                               **meta["vitlab_kwargs"]).eval()
    torch.testing.assert_close(gray.patch_embed.proj.weight,
                               official_state["patch_embed1.proj.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(gray(x[:, :1]), model(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_file_converts_to_a_vitlab_checkpoint(tmp_path):
    meta, x, logits, official_state = _fixture()
    ddp = {f"module.{k}": v for k, v in official_state.items()}  # as saved under DDP
    assert_official_file_converts(tmp_path, "vl_test_favit", {"model": ddp}, checkpoint_filter_fn, x, logits,
                                  **meta["vitlab_kwargs"])


def test_macs_at_224():
    with torch.device("meta"):
        model = vitlab.create_model("vl_favit_b0")
    count = count_flops(model.to_empty(device="cpu").eval(), torch.randn(1, 3, 224, 224))
    assert abs(count.macs / 0.632e9 - 1) < 0.005, count.macs  # the README's "FLOPs" (MACs): 0.6G
    # every query meets 7 x 7 keys in each of its groups at 224 px: attention = sum over blocks of 2 * HW * 49 * C
    want = sum(depth * 2 * grid ** 2 * 49 * dim for (grid, dim, _, _), depth in zip(B0_STAGES_AT_224, (2, 2, 6, 2)))
    assert count.attention_macs == want


def _fasa_and_window_macs(grid: int, dim: int, heads: int, sr: int) -> tuple:
    """count_flops of one FaSA layer and one Swin window attention (7 x 7 windows) on a grid x grid map."""
    fasa = FactorizationAttention(dim, heads, sr_ratio=sr, window_size=7).eval()
    x = torch.randn(1, grid * grid, dim)
    fasa_count = count_flops(fasa, (x, (grid, grid)))
    window = WindowAttention(dim, heads, window_size=7).eval()
    windows = x.view(1, grid // 7, 7, grid // 7, 7, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, 49, dim)
    return fasa_count, count_flops(window, (windows,))


@pytest.mark.parametrize("grid, dim, heads, sr", B0_STAGES_AT_224)
def test_fasa_attention_costs_what_window_attention_costs(grid, dim, heads, sr):
    fasa, window = _fasa_and_window_macs(grid, dim, heads, sr)
    assert fasa.attention_macs == window.attention_macs == 2 * grid * grid * 49 * dim
    # q + proj + the local key/value convs on the map, against Swin's qkv + proj: FaSA's whole layer costs less
    assert fasa.macs < window.macs


def test_fasa_global_group_grows_above_224():
    # at twice the resolution the global group's shrunk grid is 14 x 14, not 7 x 7: it alone costs more
    grid, dim, heads, sr = 112, 32, 1, 8
    fasa, window = _fasa_and_window_macs(grid, dim, heads, sr)
    global_dim = group_dims(dim, sr)[0]
    extra = 2 * grid * grid * ((grid // sr) ** 2 - 49) * global_dim
    assert fasa.attention_macs - window.attention_macs == extra > 0


def test_every_output_depends_on_every_token():
    # long-range dependency at window cost: one FaSA layer reaches every token (window attention: its 7 x 7 window)
    torch.manual_seed(0)
    fasa = FactorizationAttention(32, 2, sr_ratio=4, window_size=7).eval()
    x = torch.randn(1, 28 * 28, 32, requires_grad=True)
    fasa(x, (28, 28))[0, 0].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("pads", [(0, 0), (3, 1), (4, 5)])
def test_mirror_pad_is_reflection_padding_where_that_is_defined(pads):
    x = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(mirror_pad(x, *pads), nn.ReflectionPad2d((0, pads[1], 0, pads[0]))(x))


def test_mirror_pad_beyond_the_map_reflects_again():
    x = torch.arange(4.0).view(1, 1, 1, 4)  # one row: 0 1 2 3
    assert mirror_pad(x, 0, 9)[0, 0, 0].tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    assert mirror_pad(x, 2, 0)[0, 0, :, 0].tolist() == [0, 0, 0]  # a single row repeats


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_dilated_windows_take_taps_dilation_apart(dilation):
    H, W, K = 11, 9, 3
    positions = torch.arange(H * W, dtype=torch.float32).view(1, 1, H, W)
    taps = dilated_windows(positions, K, dilation)[0, 0]  # (K*K, L)
    span = dilation * (K - 1) + 1
    rows, cols = -(-H // span), -(-W // span)
    assert taps.shape == (K * K, rows * cols)
    padded = mirror_pad(positions, -H % span, -W % span)[0, 0]
    for window in range(rows * cols):
        top, left = span * (window // cols), span * (window % cols)
        want = padded[top:top + span:dilation, left:left + span:dilation].reshape(-1)
        torch.testing.assert_close(taps[:, window], want)


def test_pool_windows_is_the_official_adaptive_pool():
    B, heads, d, K, L = 2, 2, 3, 3, 4
    taps = torch.randn(B, heads * d, K * K, L)
    # the official recipe: (B, h*d*K*K, L) -> (B, h, d, K*K, L) -> (B, h, K*K, L, d) -> (B, h, K*K, L*d) -> pool to d
    official = taps.reshape(B, heads, d, K * K, L).permute(0, 1, 3, 4, 2).reshape(B, heads, K * K, L * d)
    official = nn.AdaptiveAvgPool2d((None, d))(official)
    torch.testing.assert_close(pool_windows(taps, heads), official)
    one = torch.randn(B, heads * d, K * K, 1)  # a single window: its taps, per head
    torch.testing.assert_close(pool_windows(one, heads), one.view(B, heads, d, K * K).transpose(2, 3))


def test_group_dims_follow_the_official_split():
    assert group_dims(32, 8) == (4, 14, 14) and group_dims(256, 1) == (32, 224) and group_dims(96, 2) == (12, 42, 42)
    with pytest.raises(ValueError, match="does not divide"):
        group_dims(40, 2)


def test_small_inputs_run_and_too_small_ones_are_refused():
    model = vitlab.create_model("vl_test_favit", window_size=7).eval()
    with torch.no_grad():  # 7 x 7 windows on 2 x 2 .. 16 x 20 maps: below what the official reflection padding allows
        assert torch.isfinite(model(torch.randn(1, 3, 64, 80))).all()
        with pytest.raises(ValueError, match="smaller than the FaSA spatial reduction 8"):
            model(torch.randn(1, 3, 16, 16))


def test_features_only_and_intermediates():
    x = torch.randn(2, 3, 64, 96)
    features = timm.create_model("vl_test_favit", features_only=True)
    assert features.feature_info.channels() == [32, 32, 64, 64]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in features(x)] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 64, 2, 3)]
    model = vitlab.create_model("vl_test_favit").eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(inter[-1], final)
        nhwc = model.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
    torch.testing.assert_close(nhwc[0], inter[0].permute(0, 2, 3, 1))


def test_pre_logits_reset_classifier_and_pruned_intermediates():
    model = vitlab.create_model("vl_test_favit").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 64, 2, 2)  # unpooled maps
        model.prune_intermediate_layers(indices=[1])
        assert len(model.stages) == 2 and model.num_features == 32 and model(x).shape == (2, 32, 8, 8)
