"""TurboViT (vitlab/models/turbovit.py): no official code or spec exists, so the architecture family (Hiera's
mask-unit attention and Q-pooling) is checked against timm's Hiera, and the proxy against the abstract's bounds."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoint import load_weights
from vitlab.models.listing import count_params_meta
from vitlab.models.turbovit import TurboViT, checkpoint_filter_fn, grid_order, mask_unit_order
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo" / "turbovit"
# a tiny Hiera: 16-32-64-128 channels (Hiera doubles width and heads per stage), depths 1-2-2-2, a non-square
# 64 x 96 input (16 x 24 tokens: 2 x 3 mask units of 8 x 8), layer scale
HIERA_TINY = dict(img_size=(64, 96), embed_dim=16, num_heads=1, stages=(1, 2, 2, 2), init_values=0.1, num_classes=10)
TURBO_TINY = dict(img_size=(64, 96), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 2, 2, 2),
                  init_values=0.1, num_classes=10)
PROXY_PARAMS = 12_659_752  # = timm hiera_tiny_224(embed_dim=64), counted on the meta device
FASTERVIT_0_PARAMS = 31.4e6  # NVlabs/FasterViT README
MOBILEVITV2_200_GFLOPS = 7.5  # MobileViTv2 paper (the abstract's ">3.4x fewer FLOPs" baseline)


def _hiera(**overrides) -> torch.nn.Module:
    """timm's Hiera with weights spread out (std 0.02 inits would hide an ordering error in tiny logits)."""
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", **{**HIERA_TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _official_names(state: dict) -> dict:
    """timm's Hiera keys -> facebookresearch/hiera's (`norm.`, `head.projection.`)."""
    rename = {"head.norm.": "norm.", "head.fc.": "head.projection."}
    return {next((new + k[len(old):] for old, new in rename.items() if k.startswith(old)), k): v
            for k, v in state.items()}


def test_logits_match_official_hiera_fixture():
    meta = json.loads((FIXTURES / "official_tiny.json").read_text())
    state = load_file(str(FIXTURES / "official_tiny.safetensors"))
    x, logits = state.pop("__input__"), state.pop("__logits__")
    assert meta["commit"] == "b12b842542ee5c757fcfec8c41f6b56fcbe89b65" and x.shape[-2:] == (64, 96)
    assert "head.projection.weight" in state and "norm.weight" in state   # the official names
    model = TurboViT(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model))   # strict: every tensor mapped
    assert logits.std() > 0.5
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_logits_equal_timm_hiera():
    hiera = _hiera()
    model = TurboViT(**TURBO_TINY).eval()
    model.load_state_dict(checkpoint_filter_fn(hiera.state_dict(), model))  # strict: every tensor mapped
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = hiera(x)
        assert want.std() > 0.1   # logits that an ordering mistake would move
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_proxy_equals_hiera_t_at_width_64():
    hiera = _hiera(img_size=224, embed_dim=64, num_heads=1, stages=(1, 2, 7, 2), init_values=None, num_classes=1000)
    model = vitlab.create_model("vl_turbovit_proxy").eval()
    model.load_state_dict(checkpoint_filter_fn(hiera.state_dict(), model))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hiera(x), atol=1e-4, rtol=0)


def test_proxy_params_exact_and_within_the_implied_bound():
    assert count_params_meta("vl_turbovit_proxy") == PROXY_PARAMS
    with torch.device("meta"):
        hiera = timm.create_model("hiera_tiny_224", embed_dim=64)
    assert sum(p.numel() for p in hiera.parameters()) == PROXY_PARAMS
    assert PROXY_PARAMS < FASTERVIT_0_PARAMS / 2.47   # ">2.47x smaller than FasterViT-0"


@pytest.mark.slow
def test_proxy_macs_within_2_percent_of_the_implied_bound():
    model = vitlab.create_model("vl_turbovit_proxy").eval()
    macs = count_flops(model, torch.randn(1, 3, 224, 224)).macs
    assert macs == 2_246_038_528
    assert abs(macs / (MOBILEVITV2_200_GFLOPS * 1e9 / 3.4) - 1) < 0.02   # ">3.4x fewer FLOPs than MobileViTv2-2.0"


def test_token_order_round_trip_and_pooling():
    x = torch.randn(2, 8, 12, 5)
    torch.testing.assert_close(grid_order(mask_unit_order(x, (4, 4), (1, 1)), (2, 3), (4, 4)), x, atol=0, rtol=0)
    tokens = mask_unit_order(x, (2, 3), (2, 2))   # units of 4 x 6 input tokens, 2 x 3 after pooling
    pooled = grid_order(tokens.view(2, 4, -1, 5).amax(1), (2, 2), (2, 3))   # Hiera's pooling: a max over dim 1
    torch.testing.assert_close(pooled, F.max_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not split into 8x8 mask units"):
        mask_unit_order(torch.randn(1, 12, 16, 5), (8, 8), (1, 1))


def _tiny() -> TurboViT:
    torch.manual_seed(0)
    return vitlab.create_model("vl_test_turbovit").eval()


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(-1) > 1e-6   # (B, H, W): which output tokens moved


def test_mask_unit_attention_is_local_to_units():
    model = _tiny()
    block = model.stages[0].blocks[0]           # 8 x 8 mask units on the 16 x 16 grid
    assert block.attn.use_mask_unit_attn and block.unit == (8, 8)
    x = torch.randn(1, 16, 16, 32)
    y = x.clone()
    y[:, 9, 2] += torch.randn(32)               # a token of unit (1, 0) (not a constant shift: LayerNorm drops it)
    with torch.no_grad():
        moved = _changed(block(x), block(y))[0]
    assert moved[8:, :8].all() and not moved[:8].any() and not moved[:, 8:].any()

    pooling = model.stages[1].downsample        # Q-pooling block, still unit attention (Hiera's lag): 4 x 4 units
    assert pooling.attn.use_mask_unit_attn and pooling.attn.q_stride == 4
    with torch.no_grad():
        moved = _changed(pooling(x), pooling(y))[0]   # 8 x 8 output
    assert moved[4:, :4].any() and not moved[:4].any() and not moved[:, 4:].any()


def test_global_blocks_spread_a_change_everywhere():
    model = _tiny()
    block = model.stages[2].blocks[0]
    assert not block.attn.use_mask_unit_attn
    x = torch.randn(1, 4, 4, 48)
    y = x.clone()
    y[:, 0, 0] += torch.randn(48)
    with torch.no_grad():
        assert _changed(block(x), block(y)).all()


def test_q_pooling_is_a_2x2_max_pool_of_the_widened_residual():
    block = _tiny().stages[1].downsample
    with torch.no_grad():
        for layer in (block.attn.proj, block.mlp.fc2):   # silence both branches: the residual is left
            layer.weight.zero_()
            layer.bias.zero_()
        x = torch.randn(2, 16, 16, 32)
        want = F.max_pool2d(block.proj(block.norm1(x)).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        torch.testing.assert_close(block(x), want, atol=0, rtol=0)


def test_pooling_stage_must_change_width():
    with pytest.raises(ValueError, match="must change the width"):
        TurboViT(embed_dims=(32, 32, 64, 64))


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(_tiny(), checkpoint_filter_fn)


def test_official_hiera_file_loads_through_timm_builder_and_in_gray(tmp_path):
    hiera = _hiera(img_size=64)
    official = _official_names(hiera.state_dict())
    path = tmp_path / "hiera.pth"
    torch.save(official, path)
    arch = {k: v for k, v in TURBO_TINY.items() if k != "img_size"}
    x = torch.randn(2, 3, 64, 64)
    model = vitlab.create_model("vl_test_turbovit", **arch)
    load_weights(model.eval(), path, allow_pickle=True, filter_fn=checkpoint_filter_fn)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hiera(x), atol=1e-5, rtol=0)

    wrapped = tmp_path / "hiera_wrapped.pth"
    torch.save({"model_state": official}, wrapped)   # facebookresearch/hiera's checkpoint wrapper
    overlay = dict(file=str(wrapped))
    gray = vitlab.create_model("vl_test_turbovit", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay,
                               **arch).eval()
    torch.testing.assert_close(gray.patch_embed.proj.weight,
                               official["patch_embed.proj.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(gray(x[:, :1]), hiera(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-5, rtol=0)


def test_other_input_size_resamples_the_position_embedding():
    model = _tiny()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 64)).shape == (1, 10)
        maps = model.forward_intermediates(torch.randn(1, 3, 96, 64), intermediates_only=True)
    assert [m.shape[-2:] for m in maps] == [(24, 16), (12, 8), (6, 4), (3, 2)]
