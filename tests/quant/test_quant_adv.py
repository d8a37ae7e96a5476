"""Advanced quantizers (AdaLog, log2, twin-uniform) and MPTQ-ViT (SQ-b smoothing, greedy mixed precision)."""
import pytest
import torch
import torch.nn.functional as F

from vitlab.quant.base import get_quantizer_class, make_quantizer
from vitlab.quant.logquant import (
    ADALOG_R, GELU_SHIFT, AdaLogQuantizer, Log2Quantizer, adalog_quantize, adalog_table, fpcs_search,
    log2_quantize, quantization_mse, reparameterize_bias_, search_adalog_base,
)
from vitlab.quant.twin import (
    TwinUniformQuantizer, search_twin_softmax, twin_gelu_quantize, twin_softmax_quantize,
)


def _softmax_data(n_rows=400, keys=50, sigma=2.0, seed=0):
    """Post-softmax-like power-law data: softmax of scaled Gaussian logits over `keys` keys."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n_rows, keys, generator=g) * sigma, dim=-1)


def _gelu_data(n=8000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.gelu(torch.randn(n, generator=g) * 1.5 - 0.5)


def _uniform_minmax(x, bits):
    lo, hi = x.min(), x.max()
    step = (hi - lo) / (2 ** bits - 1)
    return ((x - lo) / step).round().clamp(0, 2 ** bits - 1) * step + lo


def _calibrated(name, site, bits, data):
    quantizer = get_quantizer_class(name)(bits, signed=False, site=site)
    quantizer.set_mode("observe")
    quantizer(data)
    quantizer.finalize()
    quantizer.set_mode("quant")
    return quantizer


# ----------------------------------------------------------------------------------------------- log2 / AdaLog math

def test_log2_exact_on_powers_of_two():
    bits = 4
    exps = torch.arange(0, 2 ** bits - 1)                    # codes 0 ... 14 are levels at 4 bits
    x = torch.exp2(-exps.float()) * 0.5
    torch.testing.assert_close(log2_quantize(x, 0.5, bits), x, rtol=0, atol=0)
    # below the last level -> 0; above the scale -> clamped to the scale
    assert log2_quantize(torch.tensor([0.5 * 2.0 ** -(2 ** bits + 1)]), 0.5, bits).item() == 0.0
    assert log2_quantize(torch.tensor([3.0]), 0.5, bits).item() == 0.5


def test_adalog_with_q_37_is_log2_and_table_matches_exact_base():
    x = _softmax_data().flatten()
    # q = r: base 2, the table entries are all T[0] = 1 -> identical to log2
    torch.testing.assert_close(adalog_quantize(x, 1.0, ADALOG_R, 4), log2_quantize(x, 1.0, 4))
    # other q: every level is 2 ** (-k q / r) up to the table's rounding (step 1 / (2**(bits+1) - 2))
    levels = adalog_quantize(torch.exp2(-torch.arange(0, 15) * 20 / ADALOG_R), 1.0, 20, 4)
    exact = torch.exp2(-torch.arange(0, 15) * 20 / ADALOG_R)
    assert torch.all((levels - exact).abs() <= exact * (0.5 / 30) / 0.5 + 1e-7)
    assert adalog_table(4)[0] == 1.0 and torch.all(adalog_table(4) * 30 == (adalog_table(4) * 30).round())


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_log_quantizers_use_at_most_2_pow_bits_values(bits):
    x = torch.rand(5000) ** 4
    for y in (log2_quantize(x, 1.0, bits), adalog_quantize(x, 1.0, 19, bits)):
        assert y.unique().numel() <= 2 ** bits


def test_adalog_search_beats_log2_and_uniform_on_softmax_data_at_4_bits():
    x = _softmax_data().flatten()
    q = int(search_adalog_base(x, 4)[0])
    ada = quantization_mse(x, adalog_quantize(x, 1.0, q, 4))
    assert q != ADALOG_R                                     # the search moved off plain log2
    assert ada < 0.5 * quantization_mse(x, log2_quantize(x, 1.0, 4))
    assert ada < 0.5 * quantization_mse(x, _uniform_minmax(x, 4))
    # the search's choice is the best of its candidates
    for other in (10, 37, 80, 137):
        assert ada <= quantization_mse(x, adalog_quantize(x, 1.0, other, 4)) + 1e-12


def test_fpcs_finds_scale_and_base_no_worse_than_base_search_alone():
    x = _gelu_data() + GELU_SHIFT
    scale, q = fpcs_search(x, 4)
    fpcs = quantization_mse(x, adalog_quantize(x, scale, q, 4))
    q_only = int(search_adalog_base(x, 4, float(x.max()))[0])
    assert fpcs <= quantization_mse(x, adalog_quantize(x, float(x.max()), q_only, 4))
    assert float(x.quantile(0.5)) < scale <= float(x.max()) * 1.01


# ----------------------------------------------------------------------------------------------- quantizer classes

def test_adalog_quantizer_post_softmax_and_bits():
    x = _softmax_data()
    quantizer = make_quantizer("attn_prob", type("Cfg", (), {"quantizer": "adalog", "a": 4})())
    assert isinstance(quantizer, AdaLogQuantizer) and quantizer.bits == 4
    quantizer.set_mode("observe")
    quantizer(x)
    quantizer.finalize()
    quantizer.set_mode("quant")
    assert float(quantizer.scale) == 1.0 and 10 <= int(quantizer.q) <= 137
    y4 = quantizer(x)
    assert y4.unique().numel() <= 16
    quantizer.set_bits(6)
    quantizer.finalize()
    assert quantizer.bits == 6
    y6 = quantizer(x)
    assert quantization_mse(x.flatten(), y6.flatten()) < quantization_mse(x.flatten(), y4.flatten())
    assert 16 < y6.unique().numel() <= 64


def test_adalog_post_gelu_keeps_negative_part_and_bias_reparameterization_is_exact():
    x = _gelu_data().reshape(-1, 40)                          # (tokens, hidden)
    ada = _calibrated("adalog", "post_gelu", 4, x)
    assert float(ada.shift) == pytest.approx(GELU_SHIFT)
    y = ada(x)
    negative = x < -0.05
    assert (y[negative] < 0).float().mean() > 0.9            # negatives survive (unshifted log would zero them)
    unshifted = adalog_quantize(x.clamp(min=0), float(ada.scale), int(ada.q), 4)
    assert quantization_mse(x.flatten(), y.flatten()) < quantization_mse(x.flatten(), unshifted.flatten())
    # bias reparameterization: fold -shift into the next Linear; the quantizer then emits Q(x + shift)
    fc2 = torch.nn.Linear(40, 7)
    expected = fc2(y)
    reparameterize_bias_(fc2, float(ada.shift))
    ada.bias_reparameterized.fill_(True)
    assert ada(x).min() >= 0
    torch.testing.assert_close(fc2(ada(x)), expected, atol=1e-5, rtol=1e-5)


def test_adalog_beats_log2_and_uniform_at_post_gelu_4_bits():
    x = _gelu_data()
    errors = {name: quantization_mse(x, _calibrated(name, "post_gelu", 4, x)(x)) for name in ("adalog", "log2", "mse")}
    assert errors["adalog"] < errors["log2"] and errors["adalog"] < errors["mse"], errors


def test_log2_quantizer_post_softmax_scale_one_and_state_dict_round_trip():
    x = _softmax_data()
    log2 = _calibrated("log2", "attn_prob", 4, x)
    assert isinstance(log2, Log2Quantizer) and float(log2.scale) == 1.0
    ada = _calibrated("adalog", "attn_prob", 4, x)
    fresh = AdaLogQuantizer(4, signed=False, site="attn_prob")
    fresh.load_state_dict(ada.state_dict())
    fresh.set_mode("quant")
    torch.testing.assert_close(fresh(x), ada(x))


# ----------------------------------------------------------------------------------------------- twin-uniform

def test_twin_softmax_two_ranges():
    bits, m = 4, 3
    top = 2 ** (bits - 1) - 1                                 # 7 codes above 0 per range
    large, small = 1.0 / top, 1.0 / top / 2 ** m
    levels_small = torch.arange(0, top + 1) * small
    levels_large = torch.arange(0, top + 1) * large
    torch.testing.assert_close(twin_softmax_quantize(levels_small, bits, m), levels_small)
    torch.testing.assert_close(twin_softmax_quantize(levels_large, bits, m), levels_large)
    # a value inside the small range is coded with the fine step, one beyond it with the coarse step
    assert twin_softmax_quantize(torch.tensor(2.2 * small), bits, m).item() == pytest.approx(2 * small)
    assert twin_softmax_quantize(torch.tensor(0.6), bits, m).item() == pytest.approx(round(0.6 / large) * large)
    assert twin_softmax_quantize(torch.tensor(1.0), bits, m).item() == pytest.approx(1.0)


def test_twin_gelu_two_ranges():
    bits, m = 4, 4
    neg_step = GELU_SHIFT / 2 ** (bits - 1)
    pos_step = neg_step * 2 ** m
    assert twin_gelu_quantize(torch.tensor(-GELU_SHIFT), bits, m).item() == pytest.approx(-GELU_SHIFT)
    assert twin_gelu_quantize(torch.tensor(-0.05), bits, m).item() == pytest.approx(round(-0.05 / neg_step) * neg_step)
    assert twin_gelu_quantize(torch.tensor(1.0), bits, m).item() == pytest.approx(round(1.0 / pos_step) * pos_step)
    assert twin_gelu_quantize(torch.tensor(100.0), bits, m).item() == pytest.approx(7 * pos_step)
    y = twin_gelu_quantize(_gelu_data(), bits, m)
    assert y.unique().numel() <= 2 ** bits


def test_twin_quantizer_searches_m_and_beats_uniform_on_softmax():
    x = _softmax_data()
    twin = _calibrated("twin", "attn_prob", 4, x)
    assert isinstance(twin, TwinUniformQuantizer) and not bool(twin.gelu_form)
    assert int(twin.m) == search_twin_softmax(x, 4) and int(twin.m) > 0
    assert quantization_mse(x.flatten(), twin(x).flatten()) < quantization_mse(x.flatten(), _uniform_minmax(x, 4).flatten())
    gelu = _calibrated("twin", "post_gelu", 4, _gelu_data())
    assert bool(gelu.gelu_form)


# ----------------------------------------------------------------------------------------------- MPTQ-ViT

def _tiny_quantized(tiny_model, **kwargs):
    from vitlab.quant import PTQ, prepare_

    torch.manual_seed(0)
    model = tiny_model.eval()
    cfg = PTQ(**kwargs)
    prepare_(model, cfg)
    calib = [torch.randn(8, *model.pretrained_cfg["input_size"]) for _ in range(2)]
    return model, cfg, calib


def test_sqb_smoothing_leaves_float_function_unchanged_and_centres_channels(tiny_model):
    from vitlab.quant.mptq import smooth_

    model, cfg, calib = _tiny_quantized(tiny_model, w=4, a=4)
    for block in model.blocks:                                 # make LayerNorm outputs asymmetric per channel
        torch.nn.init.normal_(block.norm1.bias, 0.5, 1.0)
        torch.nn.init.normal_(block.norm2.bias, -0.5, 1.0)
    x = torch.randn(4, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        before = model(x)
    smooth_(model, calib, cfg)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert set(model.vitlab.smoothing) and all(0.0 <= a <= 1.0 for a in model.vitlab.smoothing.values())
    # the smoothed qkv input is centred per channel on the calibration images (max = -min)
    seen = []
    hook = model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in calib:
            model(batch)
    hook.remove()
    x_cal = torch.cat(seen)
    torch.testing.assert_close(x_cal.amax(0), -x_cal.amin(0), atol=1e-4, rtol=1e-3)


def test_sqb_alpha_search_never_worse_than_no_smoothing():
    from vitlab.quant.mptq import search_alpha

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g) * torch.linspace(0.1, 8, 32) + torch.linspace(-3, 5, 32)
    weight = torch.randn(16, 32, generator=g) * 0.1
    alpha, err, plain = search_alpha(x, weight, 4, 4)
    assert err < plain and 0.0 <= alpha <= 1.0


def test_greedy_allocation_meets_budget_and_protects_sensitive_layers():
    from vitlab.quant.mptq import greedy_allocation

    sizes = {"a": 100, "b": 100, "c": 200, "d": 50}
    sensitivity = {"a": {4: 10.0, 6: 5.0}, "b": {4: 0.1, 6: 0.01}, "c": {4: 0.2, 6: 0.02}, "d": {4: 0.05, 6: 0.0}}
    for budget in (4.0, 5.5, 6.0, 7.0, 8.0):
        bits = greedy_allocation(sizes, sensitivity, budget)
        average = sum(sizes[n] * b for n, b in bits.items()) / sum(sizes.values())
        assert average <= budget + 1e-9 and set(bits.values()) <= {4, 6, 8}
        if budget > 4.0:
            assert bits["a"] >= max(bits[n] for n in "bcd")       # the sensitive layer keeps the most bits
    with pytest.raises(ValueError, match="below the smallest choice"):
        greedy_allocation(sizes, sensitivity, 3.5)


def test_allocate_bits_on_a_calibrated_model(tiny_model):
    from vitlab.quant import calibrate
    from vitlab.quant.mptq import allocate_bits

    model, cfg, calib = _tiny_quantized(tiny_model, w=8, a=8, quantizer="minmax", act_quantizer="minmax", bits=6.0)
    calibrate(model, calib)
    allocation = allocate_bits(model, calib, cfg)
    layers = dict(model.named_modules())
    sizes = {n: layers[n].weight.numel() for n in allocation}
    assert sum(sizes[n] * b for n, b in allocation.items()) / sum(sizes.values()) <= 6.0
    for name, b in allocation.items():
        assert layers[name].weight_quant.bits == b and layers[name].input_quant.bits == b
    assert min(allocation.values()) < 8
    with torch.no_grad():
        assert torch.isfinite(model(calib[0])).all()


def test_post_gelu_bias_reparameterization_on_a_model_keeps_outputs(tiny_model):
    from vitlab.quant import calibrate
    from vitlab.quant.logquant import reparameterize_post_gelu_

    model, cfg, calib = _tiny_quantized(tiny_model, w=6, a=6, quantizer="adalog", act_quantizer="minmax")
    calibrate(model, calib)
    with torch.no_grad():
        before = model(calib[0])
    reparameterize_post_gelu_(model)
    fc2 = model.blocks[0].mlp.fc2
    assert bool(fc2.input_quant.bias_reparameterized)
    with torch.no_grad():
        assert fc2.input_quant(torch.full((3,), -0.1)).min() >= 0    # unsigned codes now
        torch.testing.assert_close(model(calib[0]), before, atol=1e-4, rtol=1e-4)


def test_adalog_matches_the_official_quantizer():
    """Fixture: GoatWu/AdaLog's AdaLogQuantizer.forward run locally (tests/fixtures/quant/adalog_official.json).
    vitlab keeps strictly `bits` bits, so the official extra level (code 2**bits - 1) becomes 0 here."""
    import json
    from pathlib import Path

    fixture = json.loads((Path(__file__).parents[1] / "fixtures" / "quant" / "adalog_official.json").read_text())
    x = torch.tensor(fixture["x"])
    for case in fixture["cases"]:
        ours = adalog_quantize(x, case["scale"], case["q"], case["bits"])
        official, code = torch.tensor(case["y"]), torch.tensor(case["code"])
        kept = code <= 2 ** case["bits"] - 2
        torch.testing.assert_close(ours[kept], official[kept], rtol=1e-6, atol=1e-9)
        assert torch.all(ours[~kept] == 0)


@pytest.mark.slow
def test_reference_model_low_bit_accuracy():
    """Reference checkpoint, calibration on 256 train images, first 2000 test images: AdaLog W4A4 within 3 pt of
    float and W6A6 within 1 pt (the full-test-set table: benchmarks/quant_adv_accuracy.py)."""
    import copy
    from pathlib import Path

    import vitlab
    from vitlab.bench.measure import calibration_batches, dataset_for
    from vitlab.quant import PTQ

    checkpoint = Path(__file__).parents[2] / "checkpoints" / "fashion-mnist-reference"
    base = vitlab.create_model(str(checkpoint)).eval()
    calib = calibration_batches(base, "fashion-mnist", "train", 256)
    test = dataset_for(base, "fashion-mnist", "test")
    images = torch.stack([test[i][0] for i in range(2000)])
    labels = torch.tensor([test[i][1] for i in range(2000)])

    @torch.no_grad()
    def top1(model):
        return 100.0 * sum((model(images[i:i + 500]).argmax(1) == labels[i:i + 500]).sum().item()
                           for i in range(0, len(images), 500)) / len(images)

    float_top1 = top1(base)
    w4a4 = top1(vitlab.apply_(copy.deepcopy(base), PTQ(w=4, a=4, quantizer="adalog"), calib=calib))
    w6a6 = top1(vitlab.apply_(copy.deepcopy(base), PTQ(w=6, a=6, quantizer="adalog"), calib=calib))
    assert w4a4 >= float_top1 - 3.0, (float_top1, w4a4)
    assert w6a6 >= float_top1 - 1.0, (float_top1, w6a6)


def test_smooth_refuses_calibrated_models_and_empty_calibration(tiny_model):
    from vitlab.quant import QuantizerError, calibrate
    from vitlab.quant.mptq import smooth_

    model, cfg, calib = _tiny_quantized(tiny_model, w=4, a=4)
    with pytest.raises(QuantizerError, match="saw no calibration tokens"):
        smooth_(model, [], cfg)
    calibrate(model, calib)
    with pytest.raises(QuantizerError, match="before calibration"):
        smooth_(model, calib, cfg)
