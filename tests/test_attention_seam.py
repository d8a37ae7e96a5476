"""The attention seam (vitlab.attention): with no hook set it equals the class it replaces (timm Attention, ConViT
MHSA, PVT v1 attention, VOLO attention; masks and is_causal on the fused and the explicit path); token reduction
followed by PTQ keeps both effects and equals a hand-composed reference; an attention outside the seam is refused
by name."""
import copy

import pytest
import torch
from timm.layers import Attention
from timm.models import volo
from timm.models.convit import MHSA

import vitlab
from vitlab.attention import ATTN_SITES, SeamAttention, in_seam, to_seam_
from vitlab.models.pvt import SpatialReductionAttention
from vitlab.quant import PTQ, is_quantized, make_quantizer
from vitlab.runner import example_shape
from vitlab.techniques import TechniqueError, TechniqueNotApplicable, parse_apply
from vitlab.tokens import EViT, ToMe

# minmax everywhere: uniform per-tensor grids whose scale / zero point the reference reads back
QUANT = PTQ(w=8, a=6, quantizer="minmax", act_quantizer="minmax")


def _seamed(module: torch.nn.Module) -> torch.nn.Module:
    return to_seam_(copy.deepcopy(module))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("options", [{}, {"qk_norm": True, "scale_norm": True, "norm_layer": torch.nn.LayerNorm},
                                     {"gated": True, "qkv_bias": True}])
def test_seam_without_hooks_equals_timm_attention(options, fused):
    torch.manual_seed(0)
    base = Attention(32, num_heads=4, **options).eval()
    base.fused_attn = fused
    seam = _seamed(base)
    assert type(seam) is SeamAttention and in_seam(seam)
    x = torch.randn(2, 7, 32)
    float_mask = torch.randn(2, 1, 7, 7)
    bool_mask = torch.rand(2, 1, 7, 7) > 0.3
    bool_mask[..., 0] = True                                     # every query keeps a key
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": float_mask}, {"attn_mask": bool_mask}, {"is_causal": True}):
            torch.testing.assert_close(seam(x, **kwargs), base(x, **kwargs), atol=1e-6, rtol=1e-5)


def test_is_causal_with_a_bias_on_every_path():
    """A bias hook and is_causal together: SDPA takes one of them, so the seam folds causality into the mask; the
    fused path, the explicit path and a hand computation agree."""
    torch.manual_seed(1)
    base = Attention(32, num_heads=4).eval()
    x = torch.randn(2, 6, 32)
    bias = torch.randn(2, 1, 1, 6)
    q, k, v = base.qkv(x).reshape(2, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)          # (B, H, N, d) each
    logits = (q * base.scale) @ k.transpose(-2, -1) + bias
    logits = logits.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    ref = base.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32))
    for fused in (True, False):
        seam = _seamed(base)
        seam.fused_attn = fused
        seam.bias_hook = lambda mask: bias if mask is None else mask + bias
        with torch.no_grad():
            torch.testing.assert_close(seam(x, is_causal=True), ref, atol=1e-5, rtol=1e-5)


def _mhsa():
    return MHSA(32, num_heads=4, qkv_bias=True), (torch.randn(2, 9, 32),)


def _sra():
    return SpatialReductionAttention(32, num_heads=4, sr_ratio=1), (torch.randn(2, 9, 32), (3, 3))


def _volo():
    return volo.Attention(32, num_heads=4, qkv_bias=True), (torch.randn(2, 3, 3, 32),)


@pytest.mark.parametrize("make", [_mhsa, _sra, _volo], ids=["convit_mhsa", "pvt_sra", "volo_attention"])
def test_seam_without_hooks_equals_the_other_families(make):
    torch.manual_seed(2)
    base, args = make()
    base.eval()
    seam = _seamed(base)
    assert in_seam(seam) and isinstance(seam, type(base))
    with torch.no_grad():
        torch.testing.assert_close(seam(*args), base(*args), atol=1e-6, rtol=1e-5)


def test_hooks_see_the_float_heads_and_bias_the_logits():
    torch.manual_seed(3)
    base = Attention(32, num_heads=4).eval()
    seam = _seamed(base)
    x, bias = torch.randn(2, 5, 32), torch.randn(2, 1, 1, 5)
    seen = {}
    seam.bias_hook = lambda mask: bias
    seam.observe_hook = lambda q, k, v, scale, mask: seen.update(q=q, k=k, v=v, scale=scale, mask=mask)
    with torch.no_grad():
        out = seam(x)
        torch.testing.assert_close(out, base(x, attn_mask=bias), atol=1e-6, rtol=1e-5)
        q, k, v = base.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    for name, ref in (("q", q), ("k", k), ("v", v)):
        torch.testing.assert_close(seen[name], ref)
    assert seen["scale"] == base.scale and seen["mask"] is bias


# ----------------------------------------------------------------------------------------------- composition

def _fq(x: torch.Tensor, quantizer) -> torch.Tensor:
    """torch's own per-tensor fake quantization with the calibrated quantizer's scale and zero point."""
    assert quantizer.mode == "quant" and quantizer.channel_axis is None
    return torch.fake_quantize_per_tensor_affine(x, float(quantizer.scale), int(quantizer.zero_point.round()),
                                                 quantizer.qmin, quantizer.qmax)


def _hand_attention(block):
    """A forward for `block.attn` written out by hand (no seam): the quantized qkv Linear, fake-quantized q (after
    scaling), k, probabilities and v, the size bias, and the observation its block's reduction reads."""
    attn = block.attn

    def forward(x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)   # (B, H, N, d)
        logits = _fq(q * attn.scale, attn.q_quant) @ _fq(k, attn.k_quant).transpose(-2, -1)            # (B, H, N, N)
        state = getattr(attn, "token_state", None)
        if state is not None and state.size is not None and state.prop_attn:
            logits = logits + state.size.log()[:, None, None, :, 0]
        out = _fq(logits.softmax(-1), attn.attn_prob_quant) @ _fq(v, attn.v_quant)                      # (B, H, N, d)
        reduction = getattr(block, "reduction", None)
        if reduction is not None and reduction.active:
            if hasattr(reduction, "metric"):                     # ToMe: keys averaged over heads
                reduction.metric = k.mean(1)
            else:                                                # EViT: the class token's row, mean over heads
                row = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]
                reduction.cls_attn = row.mean(1)[:, 1:]
        return attn.proj(out.transpose(1, 2).reshape(B, N, C))
    return forward


def _model():
    torch.manual_seed(0)
    return vitlab.create_model("vl_test_vit").eval()          # 16 patches + class token, 2 blocks


@pytest.mark.parametrize("tokens", [None, ToMe(r=2), EViT(keep_rate=0.5, locations=(0.0, 0.5))],
                         ids=["ptq", "tome+ptq", "evit+ptq"])
def test_token_reduction_then_ptq_equals_the_hand_composed_reference(tokens):
    model = _model()
    shape = example_shape(model)
    calib = [torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))]
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    stack = [tokens, QUANT] if tokens is not None else [QUANT]
    with torch.no_grad():
        float_out = model(x)
        reduced = vitlab.apply_(_model(), tokens) if tokens is not None else None
        reduced_out = reduced(x) if reduced is not None else None
        vitlab.apply_(model, stack, calib=calib)
        out = model(x)
        counts = list(model.token_state.counts) if tokens is not None else None
        for blk in model.blocks:
            assert in_seam(blk.attn) and blk.attn.quantized and blk.attn.attn_prob_quant.mode == "quant"
            blk.attn.forward = _hand_attention(blk)               # an instance attribute: the class is untouched
        ref = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - float_out).abs().max() > 1e-3                  # the quantization acts
    if tokens is not None:
        assert counts == list(reduced.token_state.counts) and counts[-1] < 17     # the reduction acts, unchanged
        assert (out - reduced_out).abs().max() > 1e-3             # ... and so does the quantization on top of it


@pytest.mark.parametrize("text", ["mctf:r=2", "ats:keep_rate=0.5"])
def test_mctf_and_ats_keep_their_tokens_under_quantized_attention(text):
    """MCTF fuses the attention map itself (through the seam's logits and mix), ATS masks padding by the bias hook:
    with ptq both reductions still run, every attention site observed calibration values and quantizes."""
    model = _model()
    shape = example_shape(model)
    calib = [torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))]
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    reduced = vitlab.apply_(_model(), parse_apply([text]))
    with torch.no_grad():
        reduced_out = reduced(x)
        vitlab.apply_(model, parse_apply([text, "ptq:a=6"]), calib=calib)
        out = model(x)
    assert model.token_state.counts == reduced.token_state.counts and model.token_state.counts[-1] < 17
    sites = [getattr(b.attn, f"{s}_quant") for b in model.blocks for s in ("q", "k", "attn_prob", "v")]
    assert all(q.calibrated and q.mode == "quant" for q in sites)
    assert torch.isfinite(out).all() and (out - reduced_out).abs().max() > 1e-3


def test_quantization_cannot_come_before_token_reduction():
    model = _model()
    with pytest.raises(TechniqueError, match="cannot come after"):
        vitlab.apply_(model, [QUANT, ToMe(r=2)], calib=[torch.randn(2, *example_shape(model))])


def test_an_attention_outside_the_seam_is_refused_by_name():
    """Sparsifiner replaces the seam's forward with its masked attention: quantized attention matmuls there would be
    skipped, so ptq refuses by name (and leaves the model unquantized); attn=false quantizes the layers only."""
    model = vitlab.apply_(_model(), parse_apply(["sparsifiner:keep_rate=0.5"]))
    calib = [torch.randn(4, *example_shape(model))]
    with pytest.raises(TechniqueNotApplicable, match="ptq.*SparsifinerAttention.*supports") as err:
        vitlab.apply_(model, parse_apply(["ptq"]), calib=calib)
    assert "attn=false" in str(err.value)
    assert not is_quantized(model)
    vitlab.apply_(model, parse_apply(["ptq:attn=false"]), calib=calib)
    assert is_quantized(model) and not hasattr(model.blocks[0].attn, "q_quant")


def test_causal_quantized_attention_masks_the_future():
    """The quantized path keeps is_causal: outputs of the first tokens do not depend on later tokens."""
    torch.manual_seed(4)
    seam = to_seam_(Attention(32, num_heads=4).eval())
    seam.add_quant_sites_({site: make_quantizer(site, QUANT) for site in ATTN_SITES})
    with torch.no_grad():
        for site in ATTN_SITES:
            getattr(seam, f"{site}_quant").mode = "observe"
        seam(torch.randn(4, 6, 32), is_causal=True)
        for site in ATTN_SITES:
            quantizer = getattr(seam, f"{site}_quant")
            quantizer.finalize()
            quantizer.mode = "quant"
        x = torch.randn(1, 6, 32)
        y = torch.cat([x[:, :3], torch.randn(1, 3, 32)], dim=1)     # the same first 3 tokens, other later ones
        torch.testing.assert_close(seam(x, is_causal=True)[:, :3], seam(y, is_causal=True)[:, :3])
        assert not torch.allclose(seam(x)[:, :3], seam(y)[:, :3])
