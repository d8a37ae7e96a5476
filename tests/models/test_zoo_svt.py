"""SVT (vitlab/models/svt.py) against the official code and pytorch_wavelets: fixtures, parameter counts, MACs,
the DTCWT and its perfect reconstruction, the complex gating, interfaces."""
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.models.listing import count_params_meta
from vitlab.models.svt import (SVT, SpectralScattering, _filter_matrices, _filter_pair, _one_node,
                               checkpoint_filter_fn, complex_block_mlp, dtcwt_forward, dtcwt_inverse,
                               near_sym_b_filters)
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_official_file_converts, official_fixture

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo" / "svt"

# exact counts of the official constructors (svt.py at fcbc9b3, 1000 classes, token-labelling head included)
OFFICIAL_PARAMS = {
    "vl_svt_small": 22_052_592,
    "vl_svt_base": 32_878_544,
    "vl_svt_large": 54_594_000,
}


def _fixture():
    return official_fixture("svt")


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


def test_logits_match_official_code():
    meta, x, logits, official_state = _fixture()
    assert meta["commit"] == "fcbc9b325f5d54f0a2e0fef8f35533240faa03c9" and x.shape[-2:] == (32, 48)
    model = SVT(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))  # strict: every tensor mapped
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_svt"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    meta, x, logits, official_state = _fixture()
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    overlay = dict(file=str(path))
    kwargs = meta["vitlab_kwargs"]
    model = vitlab.create_model("vl_test_svt", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_svt", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay,
                               **kwargs).eval()
    torch.testing.assert_close(gray.stages[0].patch_embed.conv[0].weight,
                               official_state["patch_embed1.conv.0.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(gray(x[:, :1]), model(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_file_converts_to_a_vitlab_checkpoint(tmp_path):
    meta, x, logits, official_state = _fixture()
    assert_official_file_converts(tmp_path, "vl_test_svt", {"model": official_state},
                                  checkpoint_filter_fn, x, logits, **meta["vitlab_kwargs"])


def test_converter_resizes_the_low_pass_filter_to_another_grid():
    meta, x, logits, official_state = _fixture()
    model = SVT(**dict(meta["vitlab_kwargs"], img_size=(64, 96))).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))
    weight = model.stages[0].blocks[0].attn.complex_weight_ll
    assert weight.shape == (64, 16, 24)
    official = official_state["block1.0.attn.complex_weight_ll"]  # (64, 8, 12); align_corners keeps the corners
    torch.testing.assert_close(weight[:, ::15, ::23], official[:, ::7, ::11])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 10)


@pytest.mark.parametrize("case", ["small", "grid"])
def test_dtcwt_equals_pytorch_wavelets(case):
    # pytorch_wavelets 1.3.0 DTCWTForward(J=1, biort='near_sym_b', qshift='qshift_b') / DTCWTInverse, float64;
    # "small" is a 6 x 8 grid, narrower than the 19-tap filters: the symmetric extension reflects twice
    ref = {k.split(".", 1)[1]: v for k, v in load_file(str(FIXTURES / "dtcwt.safetensors")).items()
           if k.startswith(case + ".")}
    h0, h1, g0, g1 = near_sym_b_filters(torch.float64)
    low, highs = dtcwt_forward(ref["x"], h0, h1)
    # pytorch_wavelets keeps its filters in float32, so it differs from the exact filters by ~1e-7
    torch.testing.assert_close(low, ref["low"], atol=1e-6, rtol=0)
    torch.testing.assert_close(highs, ref["highs"], atol=1e-6, rtol=0)
    torch.testing.assert_close(dtcwt_inverse(ref["coeff_low"], ref["coeff_highs"], g0, g1), ref["inverse"],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 56, 56), (1, 4, 8, 12), (1, 1, 2, 4)])
def test_dtcwt_reconstructs_perfectly(shape):
    h0, h1, g0, g1 = near_sym_b_filters(torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    low, highs = dtcwt_forward(x, h0, h1)
    assert low.shape == x.shape and highs.shape == (*shape[:2], 6, shape[2] // 2, shape[3] // 2, 2)
    torch.testing.assert_close(dtcwt_inverse(low, highs, g0, g1), x, atol=1e-12, rtol=0)
    # the high band carries the detail: without it the image does not come back
    assert (dtcwt_inverse(low, torch.zeros_like(highs), g0, g1) - x).abs().max() > 0.1


@pytest.mark.parametrize("length", [3, 8, 56])
def test_filter_matrices_are_numpy_convolution_with_symmetric_extension(length):
    # the DTCWT's banded matrices against numpy: np.pad(mode="symmetric") repeats the edge sample (half-sample
    # symmetric, reflecting again when the pad exceeds the signal), then a 'valid' convolution; 3 < 19 taps
    import numpy as np

    generator = torch.Generator().manual_seed(length)
    taps = [torch.randn(19, generator=generator, dtype=torch.float64),
            torch.randn(13, generator=generator, dtype=torch.float64)]
    matrices = _filter_matrices(_filter_pair(*taps), length)
    x = np.random.default_rng(length).standard_normal(length)
    for f, m in zip(taps, matrices):
        pad = (19 - 1) // 2
        want = np.convolve(np.pad(x, pad, mode="symmetric"), np.pad(f.numpy(), (19 - f.numel()) // 2), "valid")
        np.testing.assert_allclose(x @ m.numpy(), want, atol=1e-12)


def test_transforms_as_one_autograd_node_give_the_same_gradients():
    # the mixer runs the DTCWT as one autograd node (for torch-pruning's graph); its gradients must be autograd's own
    h0, h1, g0, g1 = near_sym_b_filters(torch.float64)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(2, 3, 6, 8, dtype=torch.float64), torch.randn(2, 3, 6, 3, 4, 2, dtype=torch.float64)]

    def loss(forward, inverse):
        low, highs = forward(x)
        low, highs = low * weights[0], highs * weights[1]
        return (inverse(low, highs) ** 2).sum()

    want = torch.autograd.grad(loss(lambda t: dtcwt_forward(t, h0, h1), lambda a, b: dtcwt_inverse(a, b, g0, g1)), x)
    got = torch.autograd.grad(loss(lambda t: _one_node(dtcwt_forward, 1, t, h0, h1),
                                   lambda a, b: _one_node(dtcwt_inverse, 2, a, b, g0, g1)), x)
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda t: _one_node(dtcwt_forward, 1, t, h0, h1), (x[:1, :1],))


def test_dtcwt_filters_are_a_perfect_reconstruction_pair():
    # undecimated level 1: h0 * g0 + h1 * g1 must be a unit impulse; h0 and g0 pass DC, h1 and g1 block it
    h0, h1, g0, g1 = near_sym_b_filters(torch.float64)
    torch.testing.assert_close(torch.stack([h0.sum(), h1.sum(), g0.sum(), g1.sum()]),
                               torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))

    def full_conv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv1d(a.view(1, 1, -1), b.flip(0).view(1, 1, -1), padding=b.numel() - 1).flatten()

    total = full_conv(h0, g0) + full_conv(h1, g1)  # 31 taps
    delta = torch.zeros_like(total)
    delta[total.numel() // 2] = 1
    torch.testing.assert_close(total, delta, atol=1e-15, rtol=0)


def test_complex_block_mlp_is_complex_arithmetic_per_block():
    torch.manual_seed(0)
    n, d = 3, 4
    x = torch.randn(5, n, 2, d, dtype=torch.float64)
    w1, w2 = torch.randn(2, 2, n, d, d, dtype=torch.float64)
    b1, b2 = torch.randn(2, 2, n, d, dtype=torch.float64)
    z = torch.complex(x[:, :, 0], x[:, :, 1])  # (5, n, d)
    hidden = torch.einsum("bnd,ndk->bnk", z, torch.complex(w1[0], w1[1])) + torch.complex(b1[0], b1[1])
    hidden = torch.complex(hidden.real.relu(), hidden.imag.relu())
    want = torch.einsum("bnd,ndk->bnk", hidden, torch.complex(w2[0], w2[1])) + torch.complex(b2[0], b2[1])
    got = complex_block_mlp(x, w1, b1, w2, b2)
    torch.testing.assert_close(torch.complex(got[:, :, 0], got[:, :, 1]), want)
    moved = x.clone()
    moved[:, 0] += 1.0  # block 0 only: the other blocks' outputs do not change
    torch.testing.assert_close(complex_block_mlp(moved, w1, b1, w2, b2)[:, 1:], got[:, 1:])


def test_scattering_with_a_unit_low_pass_and_no_high_band_is_the_low_pass_filter():
    torch.manual_seed(0)
    mixer = SpectralScattering(8, (6, 4), num_blocks=2)
    with torch.no_grad():
        mixer.complex_weight_ll.fill_(1.0)
        mixer.complex_weight_lh_2.zero_()
        mixer.complex_weight_lh_b2.zero_()
    x = torch.randn(2, 24, 8)
    grid = x.transpose(1, 2).reshape(2, 8, 6, 4)  # (B, C, H, W)
    low, highs = dtcwt_forward(grid, mixer.h0, mixer.h1)  # reconstruction from the low band alone
    want = dtcwt_inverse(low, torch.zeros_like(highs), mixer.g0, mixer.g1).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x, (6, 4)), want)
    with pytest.raises(ValueError, match="img_size"):
        mixer(torch.randn(1, 16, 8), (4, 4))


def _uninitialised(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        model = vitlab.create_model(name, **kwargs)
    return model.to_empty(device="cpu").eval()


def test_macs_at_224():
    count = count_flops(_uninitialised("vl_svt_small"), torch.randn(1, 3, 224, 224))
    assert abs(count.macs / 5.4209e9 - 1) < 0.005, count.macs
    # The official repo's counter (util/flops_counter.py, ptflops: convs, linears, norms, activations; no attention
    # matmuls, einsums or functional ops) gives 4.131G on svt_s; the README says 3.9G. Without attention, the
    # gating einsums (2 complex (2d x 2d) maps per block of d = 16 channels, 6 x 28 x 28 positions) and the DTCWT's
    # matrix products (672 MACs per pixel and channel: 336 each way; 3 blocks of 64 x 56 x 56), ours agrees.
    dtcwt = 672 * 64 * 56 * 56 * 3
    gating = 2 * 32 * 32 * 4 * 6 * 28 * 28 * 3
    rest = count.macs - count.attention_macs - dtcwt - gating
    assert abs(rest / 4.131e9 - 1) < 0.01, rest


def test_features_only_and_intermediates():
    x = torch.randn(2, 3, 64, 96)
    features = timm.create_model("vl_test_svt", features_only=True, img_size=(64, 96))
    assert features.feature_info.channels() == [32, 32, 64, 64]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in features(x)] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 64, 2, 3)]
    model = vitlab.create_model("vl_test_svt", img_size=(64, 96)).eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert final.shape == (2, 1 + 6, 64)  # class token first
        some = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(some[0], inter[1])


def test_classifier_heads_and_pooling():
    model = vitlab.create_model("vl_test_svt").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        cls = model.head(features[:, 0])
        aux = model.aux_head(features[:, 1:]).amax(1)
        torch.testing.assert_close(model(x), cls + 0.5 * aux)  # token labelling, as the official evaluation
        model.reset_classifier(0)
        assert model.aux_head is None and model(x).shape == (2, 64)
        model.reset_classifier(5, "avg")
        assert model.aux_head.out_features == 5 and model(x).shape == (2, 5)
    plain = vitlab.create_model("vl_test_svt", token_label=False)
    assert plain.aux_head is None
    with_aux = vitlab.create_model("vl_test_svt")
    assert sum(p.numel() for p in with_aux.parameters()) - sum(p.numel() for p in plain.parameters()) == 64 * 10 + 10


def test_wrong_input_size_is_named():
    model = vitlab.create_model("vl_test_svt")
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match="even token grid"):
        vitlab.create_model("vl_test_svt", img_size=60)
