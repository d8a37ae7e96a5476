"""DualToken-ViT (paper only, abstract only; see vitlab/models/dualtoken_vit.py): exact parameter counts against the
closed form of the documented layers, MACs against the abstract's 0.5G / 1.0G, the abstract's stated properties
(the global branch sees the whole image; position-aware global tokens are carried across stages and change the
output), any input size, the converter and in_chans=1 loading."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.checkpoint import load_weights
from vitlab.models.dualtoken_vit import DualTokenBlock, GlobalTokens, StepDown, checkpoint_filter_fn, down_steps
from vitlab.models.listing import count_params_meta
from vitlab.profiling import count_flops

PARAMS = {"vl_dualtoken_vit_small": 5_999_752, "vl_dualtoken_vit_tiny": 10_979_304}
ARCH = {"vl_dualtoken_vit_small": ((48, 96, 192), (1, 5, 6), (8, 4, 4)),
        "vl_dualtoken_vit_tiny": ((64, 128, 256), (2, 6, 6), (8, 4, 4))}
ABSTRACT_GMACS = {"vl_dualtoken_vit_small": 0.5, "vl_dualtoken_vit_tiny": 1.0}


def _block_params(C: int, mlp_ratio: float, steps: int, local_ratio: float = 2.0, k: int = 7) -> int:
    local = C * k * k + C + 2 * C + 2 * C * int(C * local_ratio) + int(C * local_ratio) + C  # dwconv, LN, fc1, fc2
    down = steps * (9 * C + C)
    token_attn = 3 * C * C + 3 * C + C * C + C
    broadcast = C * C + C + 2 * C * C + 2 * C + C * C + C  # q, kv, proj
    hidden = int(C * mlp_ratio)
    mlp = C * hidden + hidden + hidden * C + C
    return local + 2 * C + down + 2 * C + token_attn + broadcast + 2 * C + mlp  # + norm1, token_norm, norm2


def _formula(dims, depths, ratios, num_classes=1000, token_grid=7) -> int:
    half = dims[0] // 2
    stem = 27 * half + half + 2 * half + 9 * half * dims[0] + dims[0] + 2 * dims[0] + 9 * dims[0] ** 2 + 3 * dims[0]
    total = stem + token_grid ** 2 * dims[0]
    for i, (C, depth, ratio) in enumerate(zip(dims, depths, ratios)):
        if i:
            prev = dims[i - 1]
            total += 9 * prev * C + C + 2 * C + 2 * prev + prev * C + C  # conv + BN, then LN + Linear for the tokens
        total += depth * _block_params(C, ratio, down_steps(28 // 2 ** i, token_grid))
    return total + 2 * dims[-1] + dims[-1] * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count(name):
    assert count_params_meta(name) == PARAMS[name] == _formula(*ARCH[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_macs_match_the_abstract(name):
    model = timm.create_model(name).eval()
    macs = count_flops(model, torch.randn(1, 3, 224, 224)).macs
    assert macs == pytest.approx(ABSTRACT_GMACS[name] * 1e9, rel=0.02)


def test_step_wise_downsampling_reaches_the_token_grid():
    assert [down_steps(g, 7) for g in (28, 14, 7, 4)] == [2, 1, 0, 0]
    with torch.device("meta"):
        model = vitlab.create_model("vl_dualtoken_vit_tiny")
    assert [len(s.blocks[0].down.convs) for s in model.stages] == [2, 1, 0]
    down = StepDown(8, 2, 7)
    for size in ((28, 28), (30, 20), (5, 9)):  # any map lands on the 7 x 7 token grid
        assert down(torch.randn(2, *size, 8)).shape == (2, 49, 8)


def _block(seed: int = 0) -> DualTokenBlock:
    torch.manual_seed(seed)
    return DualTokenBlock(16, 2, token_grid=2, steps=2, mlp_ratio=2, kernel_size=3).eval()


def test_global_branch_sees_the_whole_map_in_one_block():
    """A change in one corner reaches the opposite corner within one block, and only through the global branch."""
    block = _block()
    x = torch.randn(1, 16, 16, 16)
    x2 = x.clone()
    x2[:, 0, 0] += 1.0
    token = GlobalTokens(torch.randn(1, 4, 16))

    def far_corner_change() -> float:
        with torch.no_grad():
            a = block(x, GlobalTokens(token.tokens.clone()))
            b = block(x2, GlobalTokens(token.tokens.clone()))
        return (a[:, -1, -1] - b[:, -1, -1]).abs().max().item()

    assert far_corner_change() > 1e-4
    torch.nn.init.zeros_(block.attn.proj.weight)  # cut the global branch: only the 3x3 conv's reach is left
    assert far_corner_change() == 0.0


def test_each_global_token_follows_its_own_region():
    """Position-aware: the token of the top-left cell takes a top-left change; the bottom-right token does not."""
    torch.manual_seed(0)
    down = StepDown(8, 2, 2).eval()
    x = torch.randn(1, 16, 16, 8)
    x2 = x.clone()
    x2[:, :4, :4] += 1.0
    with torch.no_grad():
        change = (down(x2) - down(x)).abs().amax(-1)[0]  # (4,) per token, raster order
    assert change[0] > 1e-3 and change[3] == 0.0


def test_blocks_update_the_global_tokens():
    block = _block()
    start = torch.randn(2, 4, 16)
    tokens = GlobalTokens(start.clone())
    with torch.no_grad():
        block(torch.randn(2, 8, 8, 16), tokens)
    assert tokens.tokens.shape == start.shape and not torch.allclose(tokens.tokens, start)


def test_global_tokens_are_carried_across_stages_and_change_the_output():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_dualtoken_vit").eval()
    entering = {}
    model.stages[2].blocks[0].register_forward_pre_hook(
        lambda m, args: entering.update(tokens=args[1].tokens.clone()))
    with torch.no_grad():
        x, tokens = model._start(torch.randn(2, 3, 64, 64))
        x = model.stages[1](model.stages[0](x, tokens), tokens)
        leaving = tokens.tokens.clone()  # what stages 0 and 1 made of the global tokens
        out = model.stages[2](x, tokens)
        torch.testing.assert_close(entering["tokens"], model.stages[2].token_proj(leaving))
        fresh = model.stages[2](x, GlobalTokens(torch.zeros_like(leaving)))  # the same map, tokens not carried
    assert (out - fresh).abs().max() > 1e-3
    with torch.no_grad():  # and the position embedding they start from reaches the logits
        img = torch.randn(2, 3, 64, 64)
        before = model(img)
        model.global_pos.add_(1.0)
        assert (model(img) - before).abs().max() > 1e-4


def test_any_input_size_keeps_the_token_grid():
    model = vitlab.create_model("vl_test_dualtoken_vit").eval()
    shapes = []
    model.stages[2].blocks[0].register_forward_hook(lambda m, args, out: shapes.append(args[1].tokens.shape))
    with torch.no_grad():
        for h, w in ((64, 64), (96, 64), (40, 56)):
            assert model(torch.randn(1, 3, h, w)).shape == (1, 10)
    assert shapes == [(1, 4, 64)] * 3


def test_intermediates_and_features_only():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_dualtoken_vit").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 8, 12), (2, 48, 4, 6), (2, 64, 2, 3)]
    assert model.feature_info[-1]["reduction"] == 32


def test_round_trip_and_filter(tmp_path):
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_dualtoken_vit").eval()
    state = model.state_dict()
    assert checkpoint_filter_fn({"model": state}, model) is state
    path = tmp_path / "dualtoken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(1)
    fresh = load_weights(vitlab.create_model("vl_test_dualtoken_vit").eval(), path, filter_fn=checkpoint_filter_fn)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_in_chans_1_adapts_rgb_weights(tmp_path):
    torch.manual_seed(0)
    rgb = vitlab.create_model("vl_test_dualtoken_vit").eval()
    path = tmp_path / "rgb.safetensors"
    save_file(rgb.state_dict(), str(path))
    gray = vitlab.create_model("vl_test_dualtoken_vit", in_chans=1, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    torch.testing.assert_close(gray.patch_embed.proj[0].weight,
                               rgb.patch_embed.proj[0].weight.sum(dim=1, keepdim=True))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=0)
