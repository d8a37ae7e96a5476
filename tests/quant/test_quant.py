"""Simulated PTQ: uniform quantizer math, sites, calibration, configs, SQNR floors, save/reload."""
import pytest
import torch

import vitlab
from vitlab.quant import (PTQ, QUANTIZERS, CalibrationError, QuantAttention, QuantizerError, QuantLinear,
                          UniformQuantizer, calibrate, make_quantizer, prepare_, quantizers)
from vitlab.techniques import TechniqueError, parse_apply


def _calibrated(q, x):
    q.observe(x)
    q.finalize()
    q.set_mode("quant")
    return q


# ----------------------------------------------------------------------------------------------- quantizer math

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_uniform_round_trip_error_is_at_most_half_a_step_inside_the_range(bits, signed):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 3 + 1
    q = _calibrated(QUANTIZERS["minmax"](bits, signed=signed), x)
    err = (q(x) - x).abs()
    assert err.max() <= q.scale / 2 * (1 + 1e-4)
    assert q.qmax - q.qmin == 2 ** bits - 1
    assert q.qmin == (-(2 ** (bits - 1)) if signed else 0)
    # min and max map to the ends of the grid, zero is exact
    assert torch.equal(q.quantize(x.min().reshape(1)), torch.tensor([float(q.qmin)]))
    assert q(torch.zeros(1)).item() == 0.0


def test_zero_point_is_clamped_to_the_grid():
    # all-positive data: the range is widened to include 0, so the zero-point sits at qmin, never below
    q = _calibrated(QUANTIZERS["minmax"](8, signed=False), torch.rand(1000) + 5.0)
    assert q.zero_point.item() == q.qmin == 0
    params = q.params_for_range(torch.tensor(3.0), torch.tensor(4.0))  # a range that excludes 0 (lo > 0)
    assert params[1].item() == 0
    # all-negative data: the zero-point sits at qmax
    q = _calibrated(QUANTIZERS["minmax"](8, signed=True), -torch.rand(1000) - 5.0)
    assert q.zero_point.item() == q.qmax
    # a tiny range far from 0 whose unclamped zero-point would be far outside the grid
    scale, zp = q.params_for_range(torch.tensor(-1e-9), torch.tensor(-1e-10))
    assert q.qmin <= zp.item() <= q.qmax


def test_per_channel_scales_follow_each_channel():
    w = torch.randn(6, 40) * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])[:, None]
    q = _calibrated(UniformQuantizer(8, signed=True, channel_axis=0, symmetric=True), w)
    assert q.scale.shape == (6,)
    torch.testing.assert_close(q.scale, w.abs().amax(dim=1) / 127)
    assert torch.all(q.zero_point == 0)
    rel = ((q(w) - w).abs().amax(dim=1) / w.abs().amax(dim=1))
    assert rel.max() < 1 / 254 + 1e-6  # each channel's error is relative to its own range
    per_tensor = _calibrated(UniformQuantizer(8, signed=True, symmetric=True), w)
    assert (per_tensor(w) - w)[0].abs().max() > (q(w) - w)[0].abs().max() * 100


def test_mse_and_percentile_clip_outliers_and_beat_minmax_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[0] = 40.0  # one outlier
    err = {}
    for name in ("minmax", "percentile", "mse"):
        q = _calibrated(QUANTIZERS[name](4, signed=False), x)
        err[name] = (q(x) - x).pow(2).mean().item()
    assert err["mse"] < err["minmax"] / 2
    assert err["percentile"] < err["minmax"] / 2


def test_subsample_is_bounded_seeded_and_minmax_is_exact():
    a = QUANTIZERS["minmax"](8, max_samples=1000)
    b = QUANTIZERS["minmax"](8, max_samples=1000)
    for i in range(5):
        x = torch.randn(3000, generator=torch.Generator().manual_seed(i)) * (i + 1)
        a.observe(x)
        b.observe(x)
    assert a.samples().numel() == 1000 and torch.equal(a.samples(), b.samples())
    assert a.num_observed == 15000
    assert a.max_val == max(torch.randn(3000, generator=torch.Generator().manual_seed(i)).max() * (i + 1)
                            for i in range(5))


def test_quantizer_refuses_bad_use():
    q = QUANTIZERS["minmax"](8)
    with pytest.raises(QuantizerError, match="observed nothing"):
        q.finalize()
    with pytest.raises(QuantizerError, match="no parameters yet"):
        q.set_mode("quant")
    with pytest.raises(QuantizerError, match="bits"):
        QUANTIZERS["minmax"](1)
    with pytest.raises(QuantizerError, match="unknown quantizer 'nope'; available: .*minmax"):
        vitlab.quant.base.get_quantizer_class("nope")


def test_set_bits_then_finalize_changes_the_grid():
    x = torch.randn(4000)
    q = _calibrated(QUANTIZERS["minmax"](8), x)
    e8 = (q(x) - x).abs().max()
    q.set_bits(4)
    q.finalize()
    assert q.qmax == 7 and (q(x) - x).abs().max() > e8 * 8


def test_make_quantizer_sites():
    cfg = PTQ(w=6, a=5, quantizer="mse", per_token=True)
    w = make_quantizer("weight", cfg)
    assert w.bits == 6 and w.channel_axis == 0 and w.symmetric and w.signed
    i = make_quantizer("input", cfg)
    assert i.bits == 5 and i.channel_axis == 1 and i.method == "mse" and not i.signed
    assert make_quantizer("attn_prob", cfg).channel_axis is None
    with pytest.raises(QuantizerError, match="unknown quantization site"):
        make_quantizer("softmax", cfg)


# ----------------------------------------------------------------------------------------------- configs

def test_ptq_parses_and_validates():
    (cfg,) = parse_apply(["ptq:w=6,a=6,quantizer=percentile"])
    assert cfg == PTQ(w=6, a=6, quantizer="percentile")
    with pytest.raises(TechniqueError, match="quantizer='nope' is not a quantizer; available: .*minmax"):
        parse_apply(["ptq:quantizer=nope"])
    with pytest.raises(TechniqueError, match="w=1 must be a bit width"):
        parse_apply(["ptq:w=1"])


def test_ptq_without_calibration_images_says_pass_data(tiny_model):
    with pytest.raises(TechniqueError, match="--data"):
        vitlab.apply_(tiny_model, PTQ())


# ----------------------------------------------------------------------------------------------- model

def _x(n=16, seed=0):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_quantize_wraps_every_site_and_starts_off(tiny_model):
    tiny_model.eval()
    x = _x()
    ref = tiny_model(x)
    prepare_(tiny_model, PTQ())
    names = dict(quantizers(tiny_model))
    linears = [m for m in tiny_model.blocks.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 4 * len(tiny_model.blocks)
    assert all(isinstance(b.attn, QuantAttention) for b in tiny_model.blocks)
    assert names["blocks.0.mlp.fc2.input_quant"].options["site"] == "post_gelu"
    assert names["blocks.0.attn.attn_prob_quant"].options["site"] == "attn_prob"
    assert type(tiny_model.head) is torch.nn.Linear  # first / last layers stay float
    torch.testing.assert_close(tiny_model(x), ref, atol=1e-5, rtol=0)  # mode "off": same model
    with pytest.raises(QuantizerError, match="already quantized"):
        prepare_(tiny_model, PTQ())


def test_calibrate_refuses_nothing_observed(tiny_model):
    with pytest.raises(CalibrationError, match="no quantizers"):
        calibrate(tiny_model, [_x()])
    prepare_(tiny_model, PTQ())
    with pytest.raises(CalibrationError, match="no images"):
        calibrate(tiny_model, [])
    with pytest.raises(CalibrationError, match="needs images"):
        calibrate(tiny_model, None)
    # a quantizer on a path that never runs observes nothing: refused, by name
    orig = tiny_model.blocks[1].attn.forward
    tiny_model.blocks[1].attn.forward = lambda x, **kw: torch.zeros_like(x)
    with pytest.raises(CalibrationError, match=r"blocks\.1\.attn\..*observed nothing"):
        calibrate(tiny_model, [_x()])
    tiny_model.blocks[1].attn.forward = orig


def test_sixteen_bit_is_identity():
    torch.manual_seed(0)   # own weights: the shared fixture's depend on the tests that ran before (RNG state)
    tiny_model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    x = _x()
    ref = tiny_model(x)
    for quantizer in ("minmax", "percentile", "mse"):
        m = vitlab.create_model("vl_test_vit", num_classes=10).eval()
        m.load_state_dict(tiny_model.state_dict())
        vitlab.apply_(m, PTQ(w=16, a=16, quantizer=quantizer, weight_quantizer="minmax"), calib=[x])
        torch.testing.assert_close(m(x), ref, atol=1e-3, rtol=0)


# SQNR floors (dB) on vl_test_vit (seed 0) with 32 random calibration images; measured values ~3-6 dB above.
SQNR_FLOORS = [
    (PTQ(w=8, a=8), 38.0),
    (PTQ(w=8, a=8, quantizer="percentile"), 30.0),
    (PTQ(w=8, a=8, quantizer="mse", per_token=True), 36.0),
    (PTQ(w=6, a=6, quantizer="mse"), 27.0),
    (PTQ(w=4, a=4, quantizer="mse"), 14.0),
    (PTQ(w=4, a=4), 14.0),
    (PTQ(w=8, a=8, attn=False, post_gelu=False), 38.0),
]


@pytest.mark.parametrize("cfg,floor", SQNR_FLOORS, ids=[vitlab.format_technique(c) for c, _ in SQNR_FLOORS])
def test_sqnr_floor(cfg, floor):
    torch.manual_seed(0)
    m = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    x, calib = _x(32, seed=1), [_x(16, seed=2), _x(16, seed=3)]
    with torch.no_grad():
        ref = m(x)
        vitlab.apply_(m, cfg, calib=calib)
        out = m(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()).item()
    assert sqnr >= floor, f"{vitlab.format_technique(cfg)}: SQNR {sqnr:.1f} dB < floor {floor}"
    assert sqnr < 80  # and it does quantize


def test_lower_bits_lose_more():
    torch.manual_seed(0)
    x, calib = _x(32, seed=1), [_x(16, seed=2)]
    errs = []
    for bits in (8, 6, 4):
        torch.manual_seed(0)
        m = vitlab.create_model("vl_test_vit", num_classes=10).eval()
        with torch.no_grad():
            ref = m(x)
            vitlab.apply_(m, PTQ(w=bits, a=bits), calib=calib)
            errs.append((m(x) - ref).pow(2).mean().item())
    assert errs[0] < errs[1] < errs[2]


def test_quantize_quantizes_in_one_call(tiny_model):
    """`vitlab.quantize_` = `prepare_` + `calibrate`: afterwards every quantizer is on and the output moves; without
    images it refuses, naming the two-step form."""
    tiny_model.eval()
    x = _x()
    ref = tiny_model(x)
    with pytest.raises(CalibrationError, match="prepare_"):
        vitlab.quantize_(tiny_model, PTQ(w=4, a=4), calib=None)
    assert not list(quantizers(tiny_model))                      # refused before anything changed
    assert vitlab.quantize_(tiny_model, PTQ(w=4, a=4), calib=[x]) is tiny_model
    assert {q.mode for _, q in quantizers(tiny_model)} == {"quant"}
    assert tiny_model.vitlab.calibration == {"images": len(x)}
    assert not torch.allclose(tiny_model(x), ref, atol=1e-3)    # 4-bit: the output changes
