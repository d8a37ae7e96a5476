"""TiC / MSA-Conv (vitlab/models/tic.py) against the official MSA-Conv layer: fixture, parameter counts, MACs, and
the mechanism's properties (whole-image window = global attention, any resolution, cyclic shift, Inter-Pooling)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.models.listing import count_params_meta
from vitlab.models.tic import (MSAConv2d, TiC, checkpoint_filter_fn, cyclic_shift, mdcs_shifts, msa_conv_attention,
                               window_validity)
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_official_file_converts

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo" / "tic"

# vitlab's configurations (the paper's variants are not public), 1000 classes
PARAMS = {"vl_tic_tiny": 47_446_984, "vl_tic_small": 82_891_720}


def _fixture():
    meta = json.loads((FIXTURES / "official_tiny.json").read_text())
    state = load_file(str(FIXTURES / "official_tiny.safetensors"))
    arrays = {k: state.pop(k) for k in ("__input__", "__logits__", "__layer_input__", "__layer_output__")}
    layer = {k[len("layer."):]: state.pop(k) for k in list(state) if k.startswith("layer.")}
    return meta, arrays, layer, state


def _official_layer(meta) -> MSAConv2d:
    kw = meta["layer_kwargs"]
    return MSAConv2d(kw["input_channel"], kw["output_channel"], 1, kw["kernel_size"], kw["dilation"],
                     kw["stride"]).eval()


@pytest.mark.parametrize("name", ["vl_tic_tiny", "vl_tic_small"])
def test_param_counts(name):
    assert count_params_meta(name) == PARAMS[name]


def test_layer_params_equal_official_layer():
    # official MSA_Conv_2d(8, 12, 3): qkv_conv 8 * 24 + 24, mlp conv 3 * 3 * 8 * 12 (no bias)
    assert sum(p.numel() for p in MSAConv2d(8, 12, kernel_size=3).parameters()) == 1_080


def test_layer_matches_official_code():
    meta, arrays, layer_state, _ = _fixture()
    assert meta["commit"] == "2d96f54799aab37d92e7400061d3d04ec27b40b5"
    layer = _official_layer(meta)
    layer.load_state_dict(checkpoint_filter_fn(layer_state, layer))  # strict: every tensor mapped
    x = arrays["__layer_input__"]  # (2, 8, 9, 11): dilation 2, stride 2, 8 -> 12 channels
    with torch.no_grad():
        out = layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert out.shape == arrays["__layer_output__"].shape == (2, 12, 5, 6)
    torch.testing.assert_close(out, arrays["__layer_output__"], atol=1e-5, rtol=0)


def test_logits_match_official_code():
    meta, arrays, _, official_state = _fixture()
    assert arrays["__input__"].shape[-2:] == (64, 96)
    model = TiC(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))  # strict: every tensor mapped
    with torch.no_grad():
        torch.testing.assert_close(model(arrays["__input__"]), arrays["__logits__"], atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_tic"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    meta, arrays, _, official_state = _fixture()
    x, logits = arrays["__input__"], arrays["__logits__"]
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    overlay = dict(file=str(path))
    model = vitlab.create_model("vl_test_tic", pretrained=True, pretrained_cfg_overlay=overlay,
                                **meta["vitlab_kwargs"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_tic", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay,
                               **meta["vitlab_kwargs"]).eval()
    torch.testing.assert_close(gray.patch_embed.proj.weight,
                               official_state["patch_embed.proj.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(gray(x[:, :1]), model(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_file_converts_to_a_vitlab_checkpoint(tmp_path):
    meta, arrays, _, official_state = _fixture()
    assert_official_file_converts(tmp_path, "vl_test_tic", {"model": official_state}, checkpoint_filter_fn,
                                  arrays["__input__"], arrays["__logits__"], **meta["vitlab_kwargs"])


@pytest.mark.slow
def test_macs_at_224():
    with torch.device("meta"):
        model = vitlab.create_model("vl_tic_tiny")
    macs = count_flops(model.to_empty(device="cpu").eval(), torch.randn(1, 3, 224, 224)).macs
    assert macs == 7_367_457_792  # every conv, linear and window matmul, counted here (no published figure)


def _qkv(B=2, C=8, H=5, W=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, H, W, generator=g) for _ in range(3)]


def test_whole_image_window_is_global_attention():
    q, k, v = _qkv()
    B, C, H, W = q.shape
    heads = 2
    window = (2 * H - 1, 2 * W - 1)  # every query's window covers the whole image
    out = msa_conv_attention(q, k, v, heads, window, masked=True)
    split = [t.reshape(B, heads, C // heads, H * W).transpose(2, 3) for t in (q, k, v)]  # (B, n, HW, d)
    want = F.scaled_dot_product_attention(*split).transpose(2, 3).reshape(B, C, H, W)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # the official zero padding keeps the outside positions in the softmax (logit 0, value 0): not global attention
    assert not torch.allclose(msa_conv_attention(q, k, v, heads, window), want, atol=1e-3)


def test_window_attention_attends_to_the_conv_window_only():
    q, k, v = _qkv(C=4)
    out = msa_conv_attention(q, k, v, 1, (3, 3), dilation=(2, 2))
    k2, v2 = k.clone(), v.clone()
    k2[..., 2, 2] += 5.0  # (2, 2) is outside the dilated window of (3, 3) (offsets 0, +-2), inside that of (4, 4)
    v2[..., 2, 2] -= 5.0
    out2 = msa_conv_attention(q, k2, v2, 1, (3, 3), dilation=(2, 2))
    assert torch.equal(out[..., 3, 3], out2[..., 3, 3])
    assert not torch.allclose(out[..., 4, 4], out2[..., 4, 4])
    assert window_validity(5, 6, (3, 3), (2, 2)).sum(0)[0] == 4  # corner (0, 0): offsets 0, +2 on each axis


def test_heads_attend_independently():
    q, k, v = _qkv(C=8)
    out = msa_conv_attention(q, k, v, 4, (3, 3))
    for h in range(4):
        part = slice(2 * h, 2 * h + 2)
        torch.testing.assert_close(out[:, part], msa_conv_attention(q[:, part], k[:, part], v[:, part], 1, (3, 3)))


def test_same_weights_at_two_resolutions():
    torch.manual_seed(0)
    layer = MSAConv2d(8, 8, num_heads=2, kernel_size=3, dilation=2, pool=3).eval()
    x = torch.randn(1, 20, 22, 8)  # NHWC
    margin = 2 + 1 + 1  # attention window radius (dilation 2), pooling radius, conv radius
    with torch.no_grad():
        big = layer(x)
        crop = layer(x[:, 3:15, 5:19])  # another resolution, same weights
    assert big.shape == (1, 20, 22, 8) and crop.shape == (1, 12, 14, 8)
    torch.testing.assert_close(crop[:, margin:-margin, margin:-margin],
                               big[:, 3 + margin:15 - margin, 5 + margin:19 - margin], atol=1e-5, rtol=0)
    model = vitlab.create_model("vl_test_tic").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == model(torch.randn(1, 3, 96, 160)).shape == (1, 10)


def test_cyclic_shift_is_a_permutation_undone_by_the_opposite_shift():
    x = torch.randn(2, 8, 5, 7)
    shifts = mdcs_shifts(4, 3)
    assert shifts == ((3, 0), (-3, 0), (0, 3), (0, -3))
    y = cyclic_shift(x, shifts)
    assert not torch.equal(y, x)
    assert torch.equal(y.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values)  # each channel permuted
    assert torch.equal(cyclic_shift(y, [(-dy, -dx) for dy, dx in shifts]), x)
    assert torch.equal(cyclic_shift(x, mdcs_shifts(4, 35)), x)  # 35 = 5 * 7 turns: every roll wraps to itself


def test_mdcs_reaches_across_the_border():
    torch.manual_seed(0)
    plain = MSAConv2d(8, 8, num_heads=4, kernel_size=3).eval()
    shifted = MSAConv2d(8, 8, num_heads=4, kernel_size=3, shift=3).eval()
    shifted.load_state_dict(plain.state_dict())
    x = torch.randn(1, 9, 9, 8, requires_grad=True)
    for layer, reaches in ((plain, False), (shifted, True)):
        grad, = torch.autograd.grad(layer(x)[0, 0, 0].sum(), x)
        assert bool(grad[0, 6:, :, :].abs().sum() > 0) == reaches  # rows 6-8: far from row 0 but for the wrap


def test_inter_pooling_enlarges_the_receptive_field():
    def support(pool: int) -> int:
        torch.manual_seed(0)
        layer = MSAConv2d(4, 4, num_heads=1, kernel_size=3, pool=pool)
        x = torch.randn(1, 15, 15, 4, requires_grad=True)
        grad, = torch.autograd.grad(layer(x)[0, 7, 7].sum(), x)
        rows = grad.abs().sum((0, 2, 3)).nonzero()
        return int(rows.max() - rows.min() + 1)

    assert support(1) == 5 and support(3) == 7  # window 3 + conv 3; pooling 3 adds its radius on each side
