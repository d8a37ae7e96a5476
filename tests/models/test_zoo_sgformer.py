"""SG-Former (vitlab/models/sgformer.py) against the official code: fixtures, parameter counts, MACs, the token
reallocation and the significance map, interfaces."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.checkpoint import load_weights, save_checkpoint
from vitlab.models.listing import count_params_meta
from vitlab.models.sgformer import (TOKEN_GROUPS, HybridScaleAttention, SGFormer, SignificanceGuidedAttention,
                                    allocation, checkpoint_filter_fn, reallocate_tokens, sincos_pos_embed,
                                    token_assignment)
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo" / "sgformer"
COMMIT = "b982803ceb0af70ff20f42784ddac51212ef954e"

# exact counts of the official constructors (sgformer.py at b982803, 1000 classes)
OFFICIAL_PARAMS = {
    "vl_sgformer_small": 22_545_981,
    "vl_sgformer_medium": 38_689_316,
    "vl_sgformer_base": 77_950_293,
}


def _fixture(name: str):
    meta = json.loads((FIXTURES / "official_tiny.json").read_text())
    state = {k: v.float() for k, v in load_file(str(FIXTURES / f"{name}.safetensors")).items()}
    return meta, state.pop("__input__"), state.pop("__logits__"), state


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", ["official_tiny", "official_test"])
def test_logits_match_official_code(name):
    # official_tiny: sr 8 and 4 stages (three-tier allocation); official_test: sr 2 (pairs / singles), 2 images
    meta, x, logits, official_state = _fixture(name)
    assert meta["commit"] == COMMIT
    model = SGFormer(**meta["configs"][name]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))  # strict: every tensor mapped
    kinds = [type(b.attn).__name__ for s in model.stages[:2] for b in s.blocks]
    assert kinds.count("SignificanceGuidedAttention") == (2 if name == "official_tiny" else 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_sgformer"), checkpoint_filter_fn)


def _narrow(meta) -> dict:
    """vl_test_sgformer at the fixture's widths (the fixture is vl_test's layout at width 16)."""
    config = meta["configs"]["official_test"]
    return {k: config[k] for k in ("embed_dims", "num_heads")}


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    meta, x, logits, official_state = _fixture("official_test")
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    overlay = dict(file=str(path))
    model = vitlab.create_model("vl_test_sgformer", pretrained=True, pretrained_cfg_overlay=overlay,
                                **_narrow(meta)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_sgformer", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay,
                               **_narrow(meta)).eval()
    torch.testing.assert_close(gray.stages[0].patch_embed.proj[0].conv.weight,
                               official_state["patch_embed1.conv.0.c.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(gray(x[:, :1]), model(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_training_checkpoint_converts_to_a_vitlab_checkpoint(tmp_path):
    # the official main.py saves timm CheckpointSaver files: {"state_dict": ..., "epoch": ...}, DDP "module." keys
    meta, x, logits, official_state = _fixture("official_test")
    path = tmp_path / "official.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in official_state.items()}, "epoch": 299}, path)
    model = vitlab.create_model("vl_test_sgformer", **_narrow(meta))
    load_weights(model, path, allow_pickle=True, filter_fn=checkpoint_filter_fn)
    save_checkpoint(model, tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(vitlab.create_model(str(tmp_path / "ckpt"))(x), logits, atol=1e-4, rtol=0)


def test_position_embedding_resamples_for_another_img_size():
    meta, x, logits, official_state = _fixture("official_test")
    model = vitlab.create_model("vl_test_sgformer", img_size=112, **_narrow(meta))
    state = checkpoint_filter_fn(official_state, model)
    assert state["stages.0.pos_embed"].shape == (1, 28 * 28, 16)
    model.load_state_dict(state)


@pytest.mark.slow
def test_macs_of_small_at_224_match_the_paper():
    with torch.device("meta"):
        model = vitlab.create_model("vl_sgformer_small")
    macs = count_flops(model.to_empty(device="cpu").eval(), torch.randn(1, 3, 224, 224)).macs
    assert abs(macs / 4.8e9 - 1) < 0.02, macs  # paper: 4.8G "FLOPs"; counted here: 4.784G


def test_position_embedding_init_is_the_mae_sincos():
    # MAE's get_2d_sincos_pos_embed (the official pos_embed.py): [sin x, cos x, sin y, cos y], x = column index
    H, W, dim = 3, 5, 16
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    want = torch.stack([torch.cat([(j * omega).sin(), (j * omega).cos(), (i * omega).sin(), (i * omega).cos()])
                        for i in range(H) for j in range(W)]).float()
    torch.testing.assert_close(sincos_pos_embed((H, W), dim)[0], want)
    model = vitlab.create_model("vl_test_sgformer")
    torch.testing.assert_close(model.stages[0].pos_embed, sincos_pos_embed((14, 14), 32))


# --- the mechanism ------------------------------------------------------------------------------------------

def _salient_map() -> torch.Tensor:
    """A 14 x 14 significance map: a salient 7 x 7 square (top left), a 7 x 14 band of medium significance (the
    bottom half), the rest low; tiny distinct offsets break ties. Sorted: low 49, medium 98, salient 49."""
    significance = torch.zeros(14, 14)
    significance[7:, :] = 1.0
    significance[:7, :7] = 2.0
    return (significance + torch.arange(196.0).view(14, 14) * 1e-4).view(1, 196)


def test_allocation_follows_the_official_token_counts():
    # official sr 4 (H = W = 14 here): token1, token2, token3 = HW // 49 // 4, HW // 14 // 2, HW // 7 // 4 keys
    # from the chunks [:HW // 4], [HW // 4: HW // 4 * 3], [HW // 4 * 3:]
    N = 196
    assert allocation(N, TOKEN_GROUPS[4]) == [(N // 4, 49), (N // 4 * 3 - N // 4, 14), (N - N // 4 * 3, 7)]
    assert [size // merge for size, merge in allocation(N, TOKEN_GROUPS[4])] == [N // 49 // 4, N // 14 // 2,
                                                                               N // 7 // 4]
    assert [size // merge for size, merge in allocation(3136, TOKEN_GROUPS[8])] == [4, 28, 28]  # 224 px, stage 1
    assert [size // merge for size, merge in allocation(196, TOKEN_GROUPS[2])] == [49, 98]  # 224 px, stage 3
    with pytest.raises(ValueError, match="do not split"):
        allocation(64, TOKEN_GROUPS[4])


def test_salient_regions_get_more_tokens():
    significance = _salient_map()
    sizes = allocation(196, TOKEN_GROUPS[4])
    slot = token_assignment(significance, sizes).view(14, 14)  # key/value token of each input token
    counts = torch.bincount(slot.flatten())
    assert counts.tolist() == [49] + [14] * 7 + [7] * 7
    salient, medium, low = slot[:7, :7], slot[7:, :], slot[:7, 7:]
    assert (low == 0).all()  # the 49 least significant tokens share one key
    assert set(medium.unique().tolist()) == set(range(1, 8))  # 98 tokens, 7 keys
    assert set(salient.unique().tolist()) == set(range(8, 15))  # 49 tokens, 7 keys
    # keys per token: salient 1/7, medium 1/14, low 1/49
    ratios = [region.unique().numel() / region.numel() for region in (salient, medium, low)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] == 7 * ratios[2]


def test_reallocate_tokens_merges_the_assigned_tokens():
    torch.manual_seed(0)
    significance = _salient_map().expand(2, -1).clone()
    significance[1] = significance[1].flip(0)  # the second image ranks its tokens the other way round
    x = torch.randn(2, 196, 5)
    sizes = allocation(196, TOKEN_GROUPS[4])
    ones = [torch.ones(1, merge) for _, merge in sizes]
    zeros = [torch.zeros(1) for _ in sizes]
    merged = reallocate_tokens(x, significance.sort(dim=1).indices, sizes, ones, zeros)  # (B, 15, 5)
    slot = token_assignment(significance, sizes)
    want = torch.zeros(2, 15, 5).scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, 5), x)
    torch.testing.assert_close(merged, want)
    assert not torch.allclose(merged[0], merged[1])


def test_guided_attention_depends_only_on_the_significance_order():
    torch.manual_seed(0)
    attn = SignificanceGuidedAttention(32, 4, sr_ratio=4).eval()
    x = torch.randn(2, 196, 32)
    significance = torch.rand(2, 14, 14)
    with torch.no_grad():
        out, _ = attn(x, (14, 14), significance)
        same, _ = attn(x, (14, 14), 3 * significance.exp() + 1)  # monotone: same order
        other, _ = attn(x, (14, 14), -significance)
    torch.testing.assert_close(same, out)
    assert (other - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs the map"):
        attn(x, (14, 14), None)


def test_significance_map_is_the_mean_attention_each_token_receives():
    # each query's probabilities sum to 1: the local part sums to 1 per 7 x 7 window, the global part (each reduced
    # key repeated sr x sr times on the grid) to sr^2
    torch.manual_seed(0)
    attn = HybridScaleAttention(32, 4, sr_ratio=2)
    x = torch.randn(2, 14 * 28, 32, requires_grad=True)
    out, significance = attn(x, (14, 28))
    assert out.shape == x.shape and significance.shape == (2, 14, 28) and not significance.requires_grad
    torch.testing.assert_close(significance.sum((1, 2)), torch.full((2,), 2 * 4 + 2 ** 2.0))
    with pytest.raises(ValueError, match="7 x 7 attention windows"):
        attn(torch.randn(1, 64, 32), (8, 8))


def test_stage_hands_the_hybrid_map_to_the_guided_block():
    model = vitlab.create_model("vl_test_sgformer").eval()
    hybrid, guided = model.stages[0].blocks
    assert isinstance(hybrid.attn, HybridScaleAttention) and isinstance(guided.attn, SignificanceGuidedAttention)
    seen = {}
    hybrid.attn.register_forward_hook(lambda m, args, out: seen.update(made=out[1]))
    guided.attn.register_forward_pre_hook(lambda m, args: seen.update(used=args[2]))
    with torch.no_grad():
        model(torch.randn(1, 3, 56, 56))
    assert seen["used"] is seen["made"]


# --- interfaces ---------------------------------------------------------------------------------------------

def test_features_only_and_intermediates():
    x = torch.randn(2, 3, 112, 56)
    features = timm.create_model("vl_test_sgformer", features_only=True)
    assert features.feature_info.channels() == [32, 32, 64, 64]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in features(x)] == [(2, 32, 28, 14), (2, 32, 14, 7), (2, 64, 7, 4), (2, 64, 4, 2)]
    model = vitlab.create_model("vl_test_sgformer").eval()
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert inter[-1].shape == (2, 64, 4, 2)


def test_input_sizes_the_windows_cannot_take_are_refused():
    model = vitlab.create_model("vl_test_sgformer").eval()
    with pytest.raises(ValueError, match="multiples of 7"):
        model(torch.randn(1, 3, 64, 64))


def test_grad_checkpointing_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_sgformer", embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2))
    x = torch.randn(1, 3, 56, 56)
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for got, expected in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(got, expected)
