"""RepQ-ViT (vitlab/quant/repq.py): post-LayerNorm scale reparameterization and the log-sqrt(2) quantizer."""
import math

import pytest
import torch

import vitlab
from vitlab.quant import PTQ, RepQ, prepare_
from vitlab.techniques import TechniqueNotApplicable, parse_technique
from vitlab.quant.base import QuantizerError, get_quantizer_class
from vitlab.quant.logquant import LogSqrt2Quantizer, log2_quantize
from vitlab.quant.repq import reparameterize_layernorm_, repq_factors


def _per_channel_minmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric per-channel (last axis) min-max fake quantization, range widened to include 0 (by hand)."""
    lo, hi = x.amin(dim=0).clamp(max=0), x.amax(dim=0).clamp(min=0)
    step = (hi - lo) / (2 ** bits - 1)
    zero = torch.round(-lo / step)
    return (torch.clamp(torch.round(x / step) + zero, 0, 2 ** bits - 1) - zero) * step


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_per_tensor_grid_on_reparameterized_values_is_the_per_channel_grid(bits):
    g = torch.Generator().manual_seed(0)
    # post-LayerNorm-like: channels with very different ranges and offsets (RepQ-ViT's figure 1)
    x = torch.randn(500, 16, generator=g) * torch.logspace(-1, 1, 16) + torch.linspace(-2, 3, 16)
    shift, scale, step, zero = repq_factors(x.amin(dim=0), x.amax(dim=0), bits)
    assert scale.min() < 0.5 < 2 < scale.max()               # the channels' steps really differed
    xr = (x - shift) / scale
    codes = torch.clamp(torch.round(xr / step + zero), 0, 2 ** bits - 1)       # one grid for the whole tensor
    back = (codes - zero) * step * scale + shift                                  # in the original units
    torch.testing.assert_close(back, _per_channel_minmax(x, bits), atol=1e-4, rtol=1e-4)
    # and the per-tensor grid spans the reparameterized values: no channel is clipped (beyond the half step the
    # rounding of each channel's zero point moves its ends)
    assert xr.min() >= -(zero + 0.5) * step - 1e-4 and xr.max() <= (2 ** bits - 0.5 - zero) * step + 1e-4


def test_empty_channels_are_left_alone():
    shift, scale, _, _ = repq_factors(torch.tensor([0.0, -1.0]), torch.tensor([0.0, 2.0]), 4)
    assert shift[0] == 0 and scale[0] == 1 and scale[1] == 1     # one live channel: its step is the mean


def test_reparameterization_keeps_the_float_function_and_equalizes_channel_ranges(tiny_model):
    torch.manual_seed(0)
    model = tiny_model.eval()
    for block in model.blocks:                                   # make LayerNorm outputs unequal across channels
        torch.nn.init.normal_(block.norm1.weight, 1.0, 2.0)
        torch.nn.init.normal_(block.norm2.bias, -0.5, 1.0)
    cfg = PTQ(w=4, a=4, repq=True)
    prepare_(model, cfg)
    calib = [torch.randn(8, *model.pretrained_cfg["input_size"]) for _ in range(2)]
    x = torch.randn(4, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        before = model(x)
    seen = []
    hook = model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(calib[0])
    reparameterize_layernorm_(model, calib, cfg)
    with torch.no_grad():
        after = model(x)
        model(calib[0])
    hook.remove()
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    width = lambda t: t.amax(dim=0).clamp(min=0) - t.amin(dim=0).clamp(max=0)   # noqa: E731
    old, new = width(seen[0]), width(seen[-1])     # seen[1:3]: the reparameterization's own calibration pass
    assert new.std() / new.mean() < 0.5 * old.std() / old.mean()   # channel ranges much more equal afterwards
    assert set(model.vitlab.repq) == {f"blocks.{i}.{p}" for i in range(len(model.blocks))
                                      for p in ("attn.qkv", "mlp.fc1")}


def test_repq_end_to_end_and_refusals(tiny_model):
    model = tiny_model.eval()
    calib = [torch.randn(8, *model.pretrained_cfg["input_size"]) for _ in range(2)]
    x = calib[0][:2]
    with torch.no_grad():
        ref = model(x)
    assert RepQ(w=8, a=8).ptq() == PTQ(w=8, a=8, repq=True, quantizer="logsqrt2", post_gelu=False)
    q = vitlab.apply_(model, parse_technique("repq:w=8,a=8"), calib=calib)
    with torch.no_grad():
        out = q(x)
    assert out.shape == ref.shape and (out - ref).abs().max() < 0.1 * ref.abs().max()
    prob = q.blocks[0].attn.attn_prob_quant
    assert isinstance(prob, LogSqrt2Quantizer) and float(prob.scale) == 1.0
    assert type(q.blocks[0].mlp.fc2.input_quant).__name__ != "LogSqrt2Quantizer"   # post_gelu=false: uniform
    with pytest.raises(ValueError, match="choose one"):
        PTQ(repq=True, smooth=True)
    convnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    convnet(torch.randn(1, 3, 8, 8))
    with pytest.raises(TechniqueNotApplicable, match="repq.*no LayerNorm -> Linear pair"):
        reparameterize_layernorm_(convnet, [torch.randn(1, 3, 8, 8)], PTQ(repq=True))
    with pytest.raises(ValueError, match="bit width"):
        RepQ(w=1)


def test_logsqrt2_levels_are_powers_of_sqrt2_and_finer_than_log2():
    bits = 4
    x = torch.tensor([1.0, 2 ** -0.5, 0.5, 2 ** -1.5, 2 ** -7])
    torch.testing.assert_close(log2_quantize(x, 1.0, bits, step=0.5), x)                   # exact on sqrt(2) powers
    levels = log2_quantize(torch.logspace(-6, 0, 2000, base=2), 1.0, bits, step=0.5).unique()
    expected = {round(2 ** (-k / 2), 6) for k in range(2 ** bits - 1)} | {0.0}
    assert {round(v, 6) for v in levels.tolist()} <= expected
    assert log2_quantize(torch.tensor([2 ** -7.6]), 1.0, bits, step=0.5).item() == 0.0      # below 2 ** -7: zero
    # on softmax-like values its error is below log2's (finer near 1, where the mass of the attention is)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(400, 50, generator=g) * 2, dim=-1)
    err = lambda q: float((q - p).pow(2).mean())                                            # noqa: E731
    assert err(log2_quantize(p, 1.0, bits, step=0.5)) < err(log2_quantize(p, 1.0, bits))
    assert get_quantizer_class("logsqrt2") is LogSqrt2Quantizer and math.isclose(LogSqrt2Quantizer.step, 0.5)


def test_only_pairs_whose_rescaling_keeps_the_model_are_used():
    """Swin V2 is post-norm (x + norm1(attn(x))): its norm1 / attn.qkv names match a pre-norm block's, but folding a
    rescaling into them changes the model, so neither RepQ nor MPTQ's smoothing may touch them; Swin's pre-norm
    pairs (norm1 -> window partition -> qkv) are kept."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from seed_models import build, input_shape
    from vitlab.quant.mptq import _candidate_pairs, _pairs, smooth_

    for name, expect_all in (("swin_tiny_patch4_window7_224", True), ("swinv2_tiny_window8_256", False)):
        model = build(name)
        x = torch.randn(2, *input_shape(name, model), generator=torch.Generator().manual_seed(0))
        candidates, kept = _candidate_pairs(model), _pairs(model, x)
        assert candidates and [n for n, _, _ in kept] == ([n for n, _, _ in candidates] if expect_all else [])
    with torch.no_grad():
        before = model(x)
    with pytest.raises(TechniqueNotApplicable, match="repq"):
        reparameterize_layernorm_(model, [x], PTQ(repq=True))
    with pytest.raises(QuantizerError, match="no LayerNorm -> Linear pairs"):
        smooth_(model, [x], PTQ(w=4, a=4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)          # refused without changing a weight
