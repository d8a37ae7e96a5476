"""STViT (vitlab/models/stvit.py) against the official code: fixture, parameter counts, MACs, super token attention."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import Attention

import vitlab
from vitlab.models.listing import count_params_meta
from vitlab.models.stvit import (STViT, SuperTokenAttention, association, checkpoint_filter_fn, fold_neighbours,
                                 neighbour_super_tokens, sample_super_tokens)
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_official_file_converts, official_fixture

# exact trainable-parameter counts of the official constructors (models/stvit.py at c9ed9a4, 1000 classes)
OFFICIAL_PARAMS = {
    "vl_stvit_small": 25_495_624,
    "vl_stvit_base": 51_691_288,
    "vl_stvit_large": 94_971_096,
}


def _fixture():
    return official_fixture("stvit")


def _test_kwargs(meta: dict) -> dict:
    """The fixture's architecture as overrides of vl_test_stvit's."""
    return {k: v for k, v in meta["vitlab_kwargs"].items() if k != "num_classes"}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


def test_logits_match_official_code():
    meta, x, logits, official_state = _fixture()
    assert meta["commit"] == "c9ed9a4a3d2f258a1626dff4330032a714e3fa92" and x.shape[-2:] == (48, 64)
    assert any(k.endswith("attn.unfold.weights") for k in official_state)  # the official layout, frozen kernels too
    model = STViT(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))  # strict: every tensor mapped
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_stvit"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    meta, x, logits, official_state = _fixture()
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    overlay = dict(file=str(path))
    model = vitlab.create_model("vl_test_stvit", pretrained=True, pretrained_cfg_overlay=overlay,
                                **_test_kwargs(meta)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_stvit", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay,
                               **_test_kwargs(meta)).eval()
    torch.testing.assert_close(gray.patch_embed.proj[0].weight,
                               official_state["patch_embed.proj.0.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(gray(x[:, :1]), model(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_file_converts_to_a_vitlab_checkpoint(tmp_path):
    meta, x, logits, official_state = _fixture()
    assert_official_file_converts(tmp_path, "vl_test_stvit", {"model": official_state},
                                  checkpoint_filter_fn, x, logits, **_test_kwargs(meta))


@pytest.mark.slow
@pytest.mark.parametrize("name, counted, readme", [("vl_stvit_small", 4.340e9, 4.4e9),
                                                   ("vl_stvit_base", 9.824e9, 9.9e9),
                                                   ("vl_stvit_large", 15.541e9, 15.6e9)])
def test_macs_at_224(name, counted, readme):
    with torch.device("meta"):
        model = vitlab.create_model(name)
    model = model.to_empty(device="cpu").eval()  # uninitialised weights: enough to count MACs
    macs = count_flops(model, torch.randn(1, 3, 224, 224)).macs
    assert abs(macs / counted - 1) < 1e-3, macs
    assert abs(macs / readme - 1) < 0.02, macs


def test_association_rows_sum_to_one_over_the_nine_neighbours():
    torch.manual_seed(0)
    pixels, stokens = torch.randn(2, 12, 6, 8), torch.randn(2, 8, 3, 4)  # 3 x 4 cells of 6 tokens
    affinity = association(pixels, stokens, 8 ** -0.5)
    assert affinity.shape == (2, 12, 6, 9) and (affinity > 0).all()
    torch.testing.assert_close(affinity.sum(-1), torch.ones(2, 12, 6))
    # the logits are scaled dot products with the neighbouring super tokens: cell (1, 2), neighbour (dy, dx) = (1, -1)
    cell, token = 1 * 4 + 2, 3
    logits = torch.stack([pixels[0, cell, token] @ stokens[0, :, 1 + dy, 2 + dx] * 8 ** -0.5
                          for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    torch.testing.assert_close(affinity[0, cell, token], logits.softmax(0))


def test_neighbours_gather_the_three_by_three_cells_and_fold_is_their_adjoint():
    torch.manual_seed(0)
    stokens = torch.randn(2, 5, 3, 4)
    nb = neighbour_super_tokens(stokens)  # (B, M, C, 9)
    assert nb.shape == (2, 12, 5, 9)
    torch.testing.assert_close(nb[:, 1 * 4 + 2, :, 0], stokens[:, :, 0, 1])  # cell (1, 2), neighbour (-1, -1)
    torch.testing.assert_close(nb[:, 0, :, 0], torch.zeros(2, 5))  # outside the grid: zeros
    values = torch.randn(2, 12, 5, 9)
    lhs = (nb * values).sum()
    rhs = (stokens * fold_neighbours(values, (3, 4))).sum()
    torch.testing.assert_close(lhs, rhs)


def test_super_tokens_are_association_weighted_means():
    torch.manual_seed(0)
    pixels = torch.randn(1, 6, 4, 3)  # 2 x 3 cells of 2 x 2 tokens
    centre = F.one_hot(torch.full((1, 6, 4), 4), 9).float()  # every token wholly with its own cell's super token
    torch.testing.assert_close(sample_super_tokens(pixels, centre, (2, 3)),
                               pixels.mean(2).transpose(1, 2).reshape(1, 3, 2, 3))
    affinity = torch.rand(1, 6, 4, 9).softmax(-1)
    stokens = sample_super_tokens(pixels, affinity, (2, 3))
    # super token of cell (0, 1): every token of the cells around it, weighted by its affinity to (0, 1)
    weights, tokens = [], []
    for cell in range(6):
        dy, dx = 0 - cell // 3, 1 - cell % 3
        if abs(dy) <= 1 and abs(dx) <= 1:
            weights.append(affinity[0, cell, :, (dy + 1) * 3 + dx + 1])
            tokens.append(pixels[0, cell])
    weights, tokens = torch.cat(weights), torch.cat(tokens)
    torch.testing.assert_close(stokens[0, :, 0, 1], (weights[:, None] * tokens).sum(0) / weights.sum())


@pytest.mark.parametrize("size, cell", [((8, 12), (4, 4)), ((7, 10), (3, 4)), ((5, 5), (2, 2))])
def test_sta_output_shape_and_gradient(size, cell):
    torch.manual_seed(0)
    sta = SuperTokenAttention(16, 2, cell, n_iter=2)
    x = torch.randn(2, *size, 16, requires_grad=True)  # NHWC, padded when not a multiple of the cell
    out = sta(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and sta.qkv.weight.grad is not None and sta.proj.weight.grad.abs().sum() > 0


def test_sta_with_one_token_cells_is_timm_attention():
    torch.manual_seed(0)
    sta = SuperTokenAttention(16, 4, (1, 1)).eval()
    timm_attn = Attention(16, 4, qkv_bias=True).eval()
    timm_attn.load_state_dict(sta.state_dict())
    x = torch.randn(2, 3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(sta(x), timm_attn(x.reshape(2, 15, 16)).reshape(2, 3, 5, 16))


def test_sta_maps_a_constant_map_to_one_vector_scaled_by_the_in_grid_association():
    # a constant map: every super token is that constant whatever the association, MHSA of identical tokens gives one
    # vector v, and mapping it back gives v times the token's association mass on super tokens inside the grid: 1 in
    # the interior cells, less at the border (the zero neighbours outside the grid take a share, as in the official
    # code)
    torch.manual_seed(0)
    sta = SuperTokenAttention(8, 2, (2, 2)).eval()
    x = torch.randn(8).expand(1, 6, 8, 8)  # 3 x 4 cells of 2 x 2 tokens
    with torch.no_grad():
        out = sta(x)[0]
        v = sta.mhsa(x[:, :1, :1].reshape(1, 1, 8)).reshape(8)
    torch.testing.assert_close(out[2:4, 2:6], v.expand(2, 4, 8))  # the two interior cells
    share = (out @ v) / (v @ v)  # (H, W)
    torch.testing.assert_close(out, share[..., None] * v)
    border = torch.ones(6, 8, dtype=torch.bool)
    border[2:4, 2:6] = False
    assert (share[border] < 1 - 1e-3).all() and (share[border] > 0).all()


def test_sta_cost_falls_with_fewer_super_tokens():
    x = torch.randn(1, 16, 16, 32)
    macs = {}
    for cell in (1, 2, 4, 8):
        torch.manual_seed(0)
        macs[cell] = count_flops(SuperTokenAttention(32, 2, (cell, cell)).eval(), x).macs
    assert macs[1] > macs[2] > macs[4] > macs[8]
    # beyond the 4 linear projections on the super tokens and 3 association matmuls of 9 C MACs per token, the
    # attention among M super tokens costs 2 M^2 C
    tokens, C = 16 * 16, 32
    for cell in (2, 4, 8):
        M = tokens // cell ** 2
        assert macs[cell] == 4 * M * C * C + 3 * 9 * tokens * C + 2 * M * M * C, (cell, macs[cell])


def test_features_only_and_intermediates():
    x = torch.randn(2, 3, 64, 96)
    features = timm.create_model("vl_test_stvit", features_only=True)
    assert features.feature_info.channels() == [16, 32, 48, 64]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in features(x)] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 48, 4, 6), (2, 64, 2, 3)]
    some = timm.create_model("vl_test_stvit", features_only=True, out_indices=(0, 2))
    assert [f.shape[1] for f in some(x)] == [16, 48]

    model = vitlab.create_model("vl_test_stvit").eval()
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(inter[-1], final)
    nhwc = model.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
    torch.testing.assert_close(nhwc[0], inter[0].permute(0, 2, 3, 1))


def test_other_input_size_and_one_channel():
    model = vitlab.create_model("vl_test_stvit", num_classes=5).eval()
    assert model(torch.randn(1, 3, 100, 72)).shape == (1, 5)
    assert model.forward_features(torch.randn(1, 3, 100, 72)).shape == (1, 64, 4, 3)
    gray = vitlab.create_model("vl_test_stvit", in_chans=1)
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_pre_logits_reset_classifier_and_grad_checkpointing():
    model = vitlab.create_model("vl_test_stvit").eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
    with torch.no_grad():
        want = model(x)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), want)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)
