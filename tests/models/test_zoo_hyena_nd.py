"""Hyena N-D (paper only, no public code): the FFT long convolution against direct convolution, the implicit filter as
a function of position (any grid), the operator against its formula, exact parameter counts, FFT MACs, loaders.

The paper's parameter tables were not readable (see vitlab/models/hyena_nd.py): counts are asserted as literals and as
the closed-form formula of the documented block."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import Block

import vitlab
from vitlab.checkpoint import load_weights
from vitlab.models.hyena_nd import (HyenaBlock, HyenaND, ImplicitFilter2d, checkpoint_filter_fn, direct_conv2d,
                                    fft_conv2d)
from vitlab.profiling import count_flops

PARAMS = {"vl_hyena_nd_tiny": 6_063_400, "vl_hyena_nd_hybrid_tiny": 5_890_216, "vl_hyena_nd_small": 22_615_144,
          "vl_hyena_nd_hybrid_small": 22_332_520}
ARCH = {"vl_hyena_nd_tiny": (192, 12), "vl_hyena_nd_hybrid_tiny": (192, 6), "vl_hyena_nd_small": (384, 12),
        "vl_hyena_nd_hybrid_small": (384, 6)}


def _hyena_block_params(C, F_=64, bands=8, mlp_ratio=4.0):
    emb, hidden = 2 * (1 + 2 * bands), int(C * mlp_ratio)
    filt = emb * F_ + F_ + 2 * (F_ * F_ + F_) + F_ * C + F_  # FFN (last layer without bias) + Sin frequencies
    hyena = 3 * C * C + 3 * C + 3 * C * 9 + 3 * C + filt + C + C * C + C  # in_proj, short conv, filter, bias, out
    return 2 * C + hyena + 2 * C + C * hidden + hidden + hidden * C + C


def _attention_block_params(C, mlp_ratio=4.0):
    hidden = int(C * mlp_ratio)
    return 2 * C + 3 * C * C + 3 * C + C * C + C + 2 * C + C * hidden + hidden + hidden * C + C


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    C, hyena = ARCH[name]
    formula = (3 * 256 * C + C + 196 * C + hyena * _hyena_block_params(C) + (12 - hyena) * _attention_block_params(C)
               + 2 * C + C * 1000 + 1000)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[name] == formula


@pytest.mark.parametrize("name", ["vl_hyena_nd_tiny", "vl_hyena_nd_hybrid_tiny"])
def test_fft_macs(name):
    """Per Hyena block and channel: rfft2 of the value and of the filter, one irfft2, each over the (2H-1) x (2W-1)
    grid (the filter's support), at 2.5 n log2 n."""
    C, hyena = ARCH[name]
    with torch.device("meta"):
        count = count_flops(timm.create_model(name).eval(), torch.empty(1, 3, 224, 224))
    n = 27 * 27
    fft = sum(v for op, v in count.by_op.items() if "fft" in op)
    assert fft == pytest.approx(hyena * 3 * C * 2.5 * n * math.log2(n), rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 3, 5, 9), (2, 2, 3, 1)])
def test_fft_conv_equals_direct_conv(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    kernel = torch.randn(shape[1], 2 * shape[2] - 1, 2 * shape[3] - 1)
    out = fft_conv2d(x, kernel)
    torch.testing.assert_close(out, direct_conv2d(x, kernel), atol=1e-5, rtol=1e-5)   # float32 FFT rounding
    # linear, not circular: a filter that shifts down one row brings nothing from the last row into the first
    shift = torch.zeros_like(kernel)
    shift[:, shape[2], shape[3] - 1] = 1.0  # offset (dy, dx) = (+1, 0)
    shifted = fft_conv2d(x, shift)
    assert shifted[..., 0, :].abs().max() < 1e-5
    torch.testing.assert_close(shifted[..., 1:, :], x[..., :-1, :], atol=1e-5, rtol=0)


def test_fft_conv_with_the_implicit_filter():
    torch.manual_seed(0)
    kernel = ImplicitFilter2d(6, filter_order=16, num_bands=4)(7, 5)
    assert kernel.shape == (6, 13, 9)
    x = torch.randn(2, 6, 7, 5)
    torch.testing.assert_close(fft_conv2d(x, kernel), direct_conv2d(x, kernel), atol=1e-5, rtol=0)


def test_implicit_filter_is_a_function_of_position():
    """Offsets are normalised to [-1, 1]: a 5-token axis samples every second point of a 9-token one, so the filter
    of the 5x3 grid is the filter of the 9x5 grid at every second offset; the weights do not depend on the grid."""
    torch.manual_seed(0)
    filt = ImplicitFilter2d(4, filter_order=16, num_bands=4)
    small, large = filt(3, 2), filt(5, 3)
    assert small.shape == (4, 5, 3) and large.shape == (4, 9, 5)
    torch.testing.assert_close(large[:, ::2, ::2], small, atol=1e-6, rtol=0)
    assert [tuple(w.shape) for w in filt.weights] == [(16, 18), (16, 16), (16, 16), (4, 16)]  # no grid size in them


def test_any_input_size_works():
    model = vitlab.create_model("vl_test_hyena_nd", num_classes=5).eval()
    with torch.no_grad():
        for size in ((32, 32), (48, 64), (16, 40)):
            assert model(torch.randn(1, 3, *size)).shape == (1, 5)


def test_operator_equals_its_formula():
    torch.manual_seed(0)
    op = HyenaND(8, filter_order=16, num_bands=4).eval()
    H, W = 4, 6
    u = torch.randn(2, H * W, 8)
    with torch.no_grad():
        z = op.short_filter(op.in_proj(u).transpose(1, 2).reshape(2, 24, H, W))
        x0, x1, v = z[:, :8], z[:, 8:16], z[:, 16:]
        gated = v * x1
        y = (direct_conv2d(gated, op.filter(H, W)) + gated * op.bias.view(1, 8, 1, 1)) * x0
        expected = op.out_proj(y.flatten(2).transpose(1, 2))
        torch.testing.assert_close(op(u, (H, W)), expected, atol=1e-5, rtol=0)


def test_one_layer_reaches_the_whole_grid():
    """The long convolution spans the grid: changing the top-left token changes the bottom-right output of one
    Hyena operator; with the long filter zeroed (only the 3x3 short filter left) it cannot."""
    torch.manual_seed(0)
    op = HyenaND(8, filter_order=16, num_bands=4).double().eval()
    u = torch.randn(1, 36, 8, dtype=torch.float64)
    w = u.clone()
    w[:, 0] += torch.randn(8, dtype=torch.float64)
    with torch.no_grad():
        assert (op(w, (6, 6))[:, -1] - op(u, (6, 6))[:, -1]).abs().max() > 1e-12
        op.filter.weights[-1].zero_()
        assert (op(w, (6, 6))[:, -1] - op(u, (6, 6))[:, -1]).abs().max() == 0


def test_hybrid_layout():
    with torch.device("meta"):
        hybrid, pure = timm.create_model("vl_hyena_nd_hybrid_tiny"), timm.create_model("vl_hyena_nd_tiny")
    assert [type(b) for b in hybrid.blocks] == [HyenaBlock] * 6 + [Block] * 6
    assert all(type(b) is HyenaBlock for b in pure.blocks)


def test_round_trip_and_filter(tmp_path):
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_hyena_nd", num_classes=10).eval()
    state = model.state_dict()
    out = checkpoint_filter_fn(state, model)
    assert out.keys() == state.keys() and all(out[k] is state[k] for k in state)
    path = tmp_path / "hyena.safetensors"
    save_file(state, str(path))
    fresh = load_weights(vitlab.create_model("vl_test_hyena_nd", num_classes=10).eval(), path,
                         filter_fn=checkpoint_filter_fn)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
        # built for 48 px from a 32 px file: pos_embed resampled as at run time, the filters need nothing
        big = load_weights(vitlab.create_model("vl_test_hyena_nd", num_classes=10, img_size=48).eval(), path,
                           filter_fn=checkpoint_filter_fn)
        x48 = torch.randn(1, 3, 48, 48)
        torch.testing.assert_close(big(x48), model(x48), atol=1e-5, rtol=0)


def test_in_chans_1_adapts_rgb_weights(tmp_path):
    rgb = vitlab.create_model("vl_test_hyena_nd")
    path = tmp_path / "rgb.safetensors"
    save_file(rgb.state_dict(), str(path))
    gray = vitlab.create_model("vl_test_hyena_nd", in_chans=1, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(gray.patch_embed.proj.weight, rgb.patch_embed.proj.weight.sum(dim=1, keepdim=True))
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 1000)


def test_intermediates_and_features_only():
    x = torch.randn(2, 3, 32, 48)
    model = vitlab.create_model("vl_test_hyena_nd").eval()
    final, inter = model.forward_intermediates(x, indices=[1, 3])
    assert [tuple(m.shape) for m in inter] == [(2, 48, 8, 12), (2, 48, 8, 12)]
    torch.testing.assert_close(final, model.forward_features(x))
    features = vitlab.create_model("vl_test_hyena_nd", features_only=True, out_indices=(1, 3))
    assert [tuple(m.shape) for m in features(x)] == [(2, 48, 8, 12), (2, 48, 8, 12)]


def test_gradients_reach_the_filter():
    model = vitlab.create_model("vl_test_hyena_nd", num_classes=3)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
    filt = model.blocks[0].hyena.filter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in filt.parameters())
