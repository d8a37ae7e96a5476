"""Q-HyViT (vitlab.quant.qhyvit): scheme / granularity choice, bridge blocks, bridge-block reconstruction, refusal.

Independent checks: the scores of `choose_scheme` against hand-written uniform and log2 quantizers; the bridge blocks
of the four hybrid seed backbones against their architectures (where each turns from conv to attention); the
bridge block's output error measured with forward hooks, outside the code under test.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.quant import PTQ, CalibrationError
from vitlab.quant.qhyvit import (Candidate, QHyViT, bridge_blocks, build_quantizer, choose_scheme,
                                 zero_point_overflow)
from vitlab.techniques import TechniqueNotApplicable

sys.path.insert(0, str(Path(__file__).parents[1]))
from seed_models import build  # noqa: E402


def _uniform_mse(x: torch.Tensor, bits: int) -> float:
    """Asymmetric min-max uniform quantization error, written out (range widened to include 0)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / (2 ** bits - 1)
    z = min(max(-round(lo / s), 0), 2 ** bits - 1)
    q = (torch.clamp(torch.round(x / s) + z, 0, 2 ** bits - 1) - z) * s
    return float((q - x).pow(2).mean())


def _log2_mse(x: torch.Tensor, bits: int, scale: float) -> float:
    """log2 quantization of x >= 0, written out: scale * 2**-k, k = round(-log2(x / scale)), 0 past k = 2**bits - 2."""
    k = torch.round(-torch.log2((x / scale).clamp(min=1e-30, max=1.0)))
    q = torch.where(k > 2 ** bits - 2, torch.zeros_like(x), scale * torch.exp2(-k))
    return float((q - x).pow(2).mean())


def _softmax_rows(std: float, seed: int = 0) -> torch.Tensor:
    """Post-softmax probabilities with a log-normal (heavy right) tail: softmax of N(0, std^2) logits, 196 keys."""
    return (torch.randn(2, 2, 64, 196, generator=torch.Generator().manual_seed(seed)) * std).softmax(-1)


def test_scheme_choice_picks_log2_on_heavy_tailed_softmax_at_4_bits():
    p = _softmax_rows(1.5)
    scored = choose_scheme(p, 4)
    best_err, best = scored[0]
    assert best.scheme == "log2" and best.axis is None
    errors = {c: e for e, c in scored}
    # the scores are the quantizers' errors, computed here by hand
    assert errors[Candidate("uniform", None, 1.0)] == pytest.approx(_uniform_mse(p, 4), rel=1e-4)
    assert best_err == pytest.approx(_log2_mse(p, 4, float(p.max()) * best.ratio), rel=1e-4)
    assert min(e for e, c in scored if c.scheme != "log2") > 1.5 * best_err
    # the same choice when scored on the attention output softmax·V (a consumer), and uniform at 8 bits
    v = torch.randn(2, 2, 196, 16, generator=torch.Generator().manual_seed(1))
    assert choose_scheme(p, 4, consumer=lambda t: t @ v)[0][1].scheme == "log2"
    assert choose_scheme(p, 8)[0][1].scheme.startswith("uniform")


def test_scheme_choice_picks_uniform_on_gaussian():
    x = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0))
    for bits in (4, 8):
        scored = choose_scheme(x, bits)
        assert scored[0][1].scheme in ("uniform", "uniform_sym")
        assert min(e for e, c in scored if c.scheme == "log2") > 10 * scored[0][0]


def test_granularity_follows_the_channel_ranges():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, 3, 3, generator=g)
    conv = lambda t: F.conv2d(t, w, padding=1)                                     # noqa: E731
    spread = torch.randn(4, 16, 8, 8, generator=g) * torch.logspace(-2, 1, 16).view(1, -1, 1, 1)
    scored = choose_scheme(spread, 6, axis=1, consumer=conv)
    assert scored[0][1].axis == 1                                                  # per channel
    assert min(e for e, c in scored if c.axis is None) > 3 * scored[0][0]


def test_zero_point_overflow_is_counted_and_avoided():
    assert zero_point_overflow(torch.tensor([0.5, -1.0, -3.0]), torch.tensor([2.0, 1.0, -1.0]), 8) == 2
    x = torch.rand(4, 3, 5, 5) + 0.5                                               # one-sided: min 0.5 > 0
    q = build_quantizer(Candidate("uniform", 1, 1.0), x, 8)
    assert bool(((q.zero_point >= 0) & (q.zero_point <= 255)).all())               # inside the grid
    assert float(q.fake_quant(torch.zeros(1, 3, 1, 1)).abs().max()) == 0.0         # 0 stays exact
    assert float((q.fake_quant(x) - x).abs().max()) <= float(q.scale.max()) / 2 + 1e-6


@pytest.mark.parametrize("name, expected", [
    ("efficientformer_l1", ["stages.3.blocks.2"]),                      # first Meta3D after the Meta4D blocks
    ("tiny_vit_5m_224", ["stages.1.blocks.0"]),                         # first window attention after MBConv
    ("nextvit_small", ["stages.1.blocks.0", "stages.2.blocks.4", "stages.3.blocks.0"]),   # the NTBs
    ("efficientvit_m0", ["stages.0.blocks.0", "stages.1.blocks.0", "stages.1.blocks.1", "stages.2.blocks.0",
                         "stages.2.blocks.1", "stages.2.blocks.2"]),    # attention on NCHW maps
])
def test_bridge_blocks_of_hybrid_seeds(name, expected):
    assert [b.name for b in bridge_blocks(build(name))] == expected


@pytest.mark.parametrize("name", ["vl_test_vit", "swin_tiny_patch4_window7_224", "convnext_atto"])
def test_refuses_models_without_a_bridge(name):
    model = build(name)
    with pytest.raises(TechniqueNotApplicable, match="supports hybrid") as info:
        vitlab.apply_(model, QHyViT(bits=8), calib=[torch.zeros(1, 3, 64, 64)])
    assert "qhyvit" in str(info.value) and "ptq" in str(info.value)


def test_config_grammar_and_calibration_contract():
    cfg = vitlab.parse_apply(["qhyvit:bits=6"])[0]
    assert cfg == QHyViT(bits=6) and (cfg.w, cfg.a) == (6, 6)
    cfg = vitlab.parse_apply(["qhyvit:w_bits=8,a_bits=6"])[0]
    assert (cfg.w, cfg.a) == (8, 6)
    with pytest.raises(ValueError, match="bits=1"):
        QHyViT(bits=1)
    with pytest.raises(CalibrationError, match="calib"):
        vitlab.apply_(build("tiny_vit_5m_224"), QHyViT())


def _tiny_hybrid() -> torch.nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("tiny_vit_5m_224", num_classes=10, embed_dims=(16, 32, 48), depths=(1, 1, 1),
                               num_heads=(1, 2, 2), window_sizes=(4, 4, 4),
                               pretrained_cfg_overlay=dict(input_size=(3, 32, 32))).eval()


def _block_mse(reference: torch.nn.Module, model: torch.nn.Module, block: str, x: torch.Tensor) -> float:
    """MSE of `block`'s output in `model` against the float `reference`'s, both on image batch x (forward hooks)."""
    outs = []
    for m in (reference, model):
        h = m.get_submodule(block).register_forward_hook(lambda mod, i, o: outs.append(o.detach()))
        with torch.no_grad():
            m(x)
        h.remove()
    return float((outs[1] - outs[0]).pow(2).mean())


def test_bridge_reconstruction_lowers_block_error_vs_min_max():
    model = _tiny_hybrid()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calib = [x]
    block = bridge_blocks(model)[0].name
    ptq = vitlab.apply_(copy.deepcopy(model), PTQ(w=4, a=4), calib=calib)
    plain = vitlab.apply_(copy.deepcopy(model), QHyViT(bits=4, reconstruct=False), calib=calib)
    recon = vitlab.apply_(copy.deepcopy(model), QHyViT(bits=4), calib=calib)
    err_ptq, err_plain, err_recon = (_block_mse(model, m, block, x) for m in (ptq, plain, recon))
    assert err_recon < err_ptq
    assert err_recon <= err_plain
    before, after = recon.qhyvit_report["block_mse"][block]
    assert after <= before and after == pytest.approx(err_recon, rel=1e-4)
    assert recon.quant_mac_fraction >= 0.95
