"""FcaFormer (vitlab/models/fcaformer.py) against the official code: fixture, parameter counts, MACs, cross tokens."""
import itertools

import pytest
import timm
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.models.fcaformer import FcaBlock, FcaFormer, FcaStage, checkpoint_filter_fn, position_bias_index
from vitlab.models.listing import count_params_meta
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_official_file_converts, official_fixture

# exact counts of the official constructors (image_classification/models/fcaformer.py at 7dcd8e0, 1000 classes)
OFFICIAL_PARAMS = {
    "vl_fcaformer_l1": 6_187_560,
    "vl_fcaformer_l2": 16_275_870,
    "vl_fcaformer_l3": 27_894_484,
    "vl_fcaformer_l4": 65_638_204,
}


def _fixture():
    meta, x, logits, state = official_fixture("fcaformer")
    return meta, x.float(), logits, state


def _fixture_model(meta, state) -> FcaFormer:
    model = FcaFormer(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model))  # strict: every tensor mapped
    return model


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


def test_logits_match_official_code():
    meta, x, logits, official_state = _fixture()
    assert meta["commit"] == "7dcd8e0ed207a6c74708ab10553dcd6a6d4ea2bd" and x.shape[-2:] == (64, 96)
    model = _fixture_model(meta, official_state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
        # the fixture sees the cross tokens: taking their attention away moves the logits
        for block in model.modules():
            if isinstance(block, FcaBlock) and block.attn.cross_bias is not None:
                block.attn.cross_bias.fill_(float("-inf"))
        assert (model(x) - logits).abs().max() > 1e-2


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_fcaformer"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    meta, x, logits, official_state = _fixture()
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    overlay = dict(file=str(path))
    model = vitlab.create_model("vl_test_fcaformer", pretrained=True, pretrained_cfg_overlay=overlay,
                                **meta["vitlab_kwargs"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_fcaformer", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay,
                               **meta["vitlab_kwargs"]).eval()
    stem = official_state["patch_embed.seq.0.c.weight"]  # float16: timm sums in float32, then casts back
    torch.testing.assert_close(gray.patch_embed.conv1.conv.weight, stem.float().sum(1, keepdim=True).half().float())
    with torch.no_grad():
        torch.testing.assert_close(gray(x[:, :1]), model(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_file_converts_to_a_vitlab_checkpoint(tmp_path):
    meta, x, logits, official_state = _fixture()
    assert_official_file_converts(tmp_path, "vl_test_fcaformer", {"model": official_state},
                                  checkpoint_filter_fn, x, logits, **meta["vitlab_kwargs"])


def test_l1_params_match_the_paper():
    assert abs(count_params_meta("vl_fcaformer_l1") / 6.2e6 - 1) < 0.02


@pytest.mark.slow
def test_l1_macs_match_the_paper():
    with torch.device("meta"):
        model = vitlab.create_model("vl_fcaformer_l1")
    model = model.to_empty(device="cpu").eval()  # uninitialised weights: enough to count
    macs = count_flops(model, torch.randn(1, 3, 224, 224)).macs
    assert abs(macs / 1.37e9 - 1) < 0.02, macs  # 1.374G, as the official modules count


def test_position_bias_index_is_the_official_enumeration():
    # the official table: offsets (|dy|, |dx|) numbered in order of first appearance over all raster-ordered pairs
    H, W = 3, 5
    points = list(itertools.product(range(H), range(W)))
    numbers, index = {}, []
    for p1 in points:
        for p2 in points:
            index.append(numbers.setdefault((abs(p1[0] - p2[0]), abs(p1[1] - p2[1])), len(numbers)))
    assert torch.equal(position_bias_index(H, W), torch.tensor(index).view(H * W, H * W))


def _block_and_inputs(num_cross=4):
    torch.manual_seed(0)
    block = FcaBlock(32, 4, (4, 6), num_cross=num_cross).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn(p.shape))  # layer scales of order 0.2, non-zero biases
    return block, torch.randn(2, 24, 32), torch.randn(2, num_cross, 32)


def test_cross_bias_minus_inf_is_the_block_without_cross_tokens():
    block, x, cross = _block_and_inputs()
    with torch.no_grad():
        plain, plain_made = block(x)
        assert (block(x, cross)[0] - plain).abs().max() > 1e-3  # the cross tokens do change the output
        block.attn.cross_bias.fill_(float("-inf"))
        out, made = block(x, cross)
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(made, plain_made)
    assert made.shape == (2, 2, 32)  # ceil(4/4) * ceil(6/4) merged tokens


def test_scale_factors_act_before_a_layernorm():
    # Official order: cross tokens * LSF, then LayerNorm. A factor of 0 makes every cross token the norm's bias (the
    # same whatever the earlier blocks gave: not the plain block), and a positive factor changes only the eps.
    block, x, cross = _block_and_inputs()
    with torch.no_grad():
        plain = block(x)[0]
        block.cross_scale.mul_(10)
        scaled = block(x, cross)[0]
        block.cross_scale.div_(10)
        torch.testing.assert_close(scaled, block(x, cross)[0], atol=1e-5, rtol=0)
        block.cross_scale.zero_()
        zero = block(x, cross)[0]
        torch.testing.assert_close(block(x, torch.randn_like(cross))[0], zero)
        assert (zero - plain).abs().max() > 1e-3


def test_stage_feeds_each_block_the_earlier_blocks_tokens_oldest_first():
    torch.manual_seed(0)
    stage = FcaStage(32, 32, 4, 4, (4, 6), downsample=False, drop_path=[0.0] * 4, max_cross_depth=2).eval()
    assert [b.attn.cross_bias is not None and b.attn.cross_bias.shape[1] for b in stage.blocks] == [False, 2, 4, 4]
    assert [b.cross_conv is not None for b in stage.blocks] == [True, True, True, False]
    made, seen = [], []
    hooks = [b.register_forward_hook(lambda m, args, out: made.append(out[1])) for b in stage.blocks]
    hooks += [b.register_forward_pre_hook(lambda m, args: seen.append(args[1])) for b in stage.blocks]
    with torch.no_grad():
        stage(torch.randn(2, 32, 4, 6))
    for h in hooks:
        h.remove()
    assert seen[0] is None and made[-1] is None
    torch.testing.assert_close(seen[1], made[0])
    torch.testing.assert_close(seen[2], torch.cat(made[:2], 1))
    torch.testing.assert_close(seen[3], torch.cat(made[1:3], 1))  # at most max_cross_depth earlier blocks
    with pytest.raises(ValueError, match="img_size"):
        stage(torch.randn(1, 32, 6, 4))


def test_checkpoint_resizes_to_another_input_size():
    small = vitlab.create_model("vl_test_fcaformer")  # 64 px: 4 x 4 and 2 x 2 grids, one cross token per block
    state = small.state_dict()
    with torch.no_grad():
        state["stages.2.blocks.0.attn.attention_biases"].copy_(torch.arange(4.0).repeat(4))  # varies along dx only
        state["stages.2.blocks.2.attn.cross_bias"].copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # (heads, depth)
    large = vitlab.create_model("vl_test_fcaformer", img_size=(128, 96)).eval()  # 8 x 6 grid, 2 x 2 cross tokens
    out = checkpoint_filter_fn(dict(state), large)
    large.load_state_dict(out)
    table = out["stages.2.blocks.0.attn.attention_biases"].view(2, 8, 6)
    torch.testing.assert_close(table, table[:, :1].expand(-1, 8, -1))  # still constant along dy
    cross_bias = out["stages.2.blocks.2.attn.cross_bias"].view(2, 2, 4)  # (heads, depth, 2 * 2 tokens)
    torch.testing.assert_close(cross_bias, torch.tensor([[1.0, 2.0], [3.0, 4.0]])[..., None].expand(-1, -1, 4))
    assert out["stages.2.blocks.2.cross_scale"].shape == (8, 1)
    with torch.no_grad():
        assert large(torch.randn(1, 3, 128, 96)).shape == (1, 10)


def test_features_only_and_intermediates():
    x = torch.randn(2, 3, 64, 96)
    features = timm.create_model("vl_test_fcaformer", features_only=True, img_size=(64, 96))
    assert features.feature_info.channels() == [32, 32, 48, 64]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in features(x)] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 48, 4, 6), (2, 64, 2, 3)]
    model = vitlab.create_model("vl_test_fcaformer", img_size=(64, 96)).eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(inter[-1], final)
        nhwc = model.forward_intermediates(x, indices=[2], output_fmt="NHWC", intermediates_only=True)
    torch.testing.assert_close(nhwc[0], inter[2].permute(0, 2, 3, 1))
