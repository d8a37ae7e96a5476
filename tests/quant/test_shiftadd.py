"""ShiftAddViT (`--apply shiftadd`): shift layers hold exact powers of two, the binary attention is the official
LinAngularAttention_binary formula, the mult / shift router and its latency-aware balance loss, the technique on
the model contract (works on timm attention, refused by name elsewhere) and a fine-tuned checkpoint round trip."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitlab
from vitlab.quant.shiftadd import (ShiftAdd, ShiftAddMoE, ShiftLinear, balance_loss, moe_layers, round_to_fixed,
                                   shift_fraction)
from vitlab.techniques import TechniqueNotApplicable


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_shift_layer_holds_powers_of_two_and_computes_with_them():
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[0, 0] = 0.0                              # a zero weight stays zero (sign 0)
        linear.weight[0, 1] = 3.0                              # above the range: clamped to 2**0
    layer = ShiftLinear.from_linear(linear, weight_bits=5)
    w = layer.weight_q().detach()
    assert layer.shift_range == (-14, 0)
    nz = w[w != 0]
    exponents = torch.log2(nz.abs())
    assert torch.equal(exponents, exponents.round()) and exponents.min() >= -14 and exponents.max() <= 0
    assert w[0, 0] == 0 and w[0, 1] == 1.0
    # DeepShift's conversion: sign(w) * 2**round(log2|w|), the shift clamped to the range
    want = linear.weight.sign() * 2.0 ** torch.log2(linear.weight.abs()).round().clamp(-14, 0)
    assert torch.equal(w, want.detach())
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), F.linear(round_to_fixed(x), w, round_to_fixed(linear.bias)),
                               rtol=0, atol=0)
    # straight-through: the shift and sign parameters get gradients; a step keeps the weights powers of two
    layer(x).square().sum().backward()
    assert layer.shift.grad.abs().sum() > 0 and layer.sign.grad.abs().sum() > 0
    with torch.no_grad():
        layer.shift -= 3.7 * layer.shift.grad.sign()
    w2 = layer.weight_q().detach()
    e2 = torch.log2(w2[w2 != 0].abs())
    assert torch.equal(e2, e2.round()) and e2.min() >= -14 and e2.max() <= 0


def test_round_to_fixed_is_the_official_floor():
    x = torch.tensor([0.3, -0.3, 40000.0, -40000.0])
    got = round_to_fixed(x, 16, 16)
    delta = 2.0 ** -16
    assert got[0] == math.floor(0.3 / delta) * delta and got[1] == math.floor(-0.3 / delta) * delta
    assert got[2] == 2 ** 15 - 1 and got[3] == -(2 ** 15)


def _official_binary_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """LinAngularAttention_binary.forward (ShiftAddViT@47671cf, pvt/pvt_v2.py), transcribed for timm's weights."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    binary_q_no_grad = torch.gt(q - q.mean(), 0).type(torch.float32)
    cliped_q = torch.clamp(q, 0, 1.0)
    q = binary_q_no_grad.detach() - cliped_q.detach() + cliped_q
    binary_k_no_grad = torch.gt(k - k.mean(), 0).type(torch.float32)
    cliped_k = torch.clamp(k, 0, 1.0)
    k = binary_k_no_grad.detach() - cliped_k.detach() + cliped_k
    dconv_v = attn.dconv(v)
    a = k.transpose(-2, -1) @ v
    x = 0.5 * v + 1.0 / math.pi * (q @ a)
    x = x / x.norm(dim=-1, keepdim=True)
    x += dconv_v
    x = x.transpose(1, 2).reshape(B, N, C)
    return attn.proj_drop(attn.proj(x))


def test_binary_attention_is_the_official_formula_and_batch_independent():
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    vitlab.apply_(model, [ShiftAdd(linears="none")])
    attn = model.blocks[0].attn
    assert type(attn).__name__ == "ShiftAddAttention" and attn.dconv.weight.shape == (2, 1, 9, 1)
    x = torch.randn(3, 17, 32)
    with torch.no_grad():
        for i in range(3):           # the official threshold is the batch tensor's mean: equal for a batch of one
            torch.testing.assert_close(attn(x[i:i + 1]), _official_binary_attention(attn, x[i:i + 1]))
        batch = attn(x)
        alone = torch.cat([attn(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, alone)       # ours thresholds per image: no image depends on its batch
    # the q and k codes really are binary: q (k^T v) is additions only
    from vitlab.quant.shiftadd import _binarize

    codes = _binarize(torch.randn(2, 2, 5, 16))
    assert set(codes.unique().tolist()) <= {0.0, 1.0}


def test_router_sends_each_token_to_one_expert_with_the_official_forward():
    linear = nn.Linear(12, 6)
    moe = ShiftAddMoE(linear)
    x = torch.randn(2, 7, 12)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.bias.copy_(torch.tensor([5.0, -5.0]))       # every token to the multiplication expert
        torch.testing.assert_close(moe(x), linear(x), rtol=0, atol=0)
        assert moe.last_shift_fraction == 0.0
        moe.gate.bias.copy_(torch.tensor([-5.0, 5.0]))       # every token to the shift expert
        torch.testing.assert_close(moe(x), moe.experts[1](x), rtol=0, atol=0)
        assert moe.last_shift_fraction == 1.0
    # training: the value is unchanged (weight 1) while the router gets a gradient, and the balance loss is kept
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)
    out = moe(x)
    with torch.no_grad():
        choice = moe.gate(x.reshape(-1, 12)).argmax(-1)
        want = torch.where(choice[:, None] == 0, linear(x.reshape(-1, 12)), moe.experts[1](x.reshape(-1, 12)))
    torch.testing.assert_close(out.reshape(-1, 6), want)
    out.sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0 and moe.last_balance_loss is not None


def test_latency_aware_balance_loss_by_hand():
    # 4 tokens, equal logits: importance (2, 2) x latency (6, 4) = (12, 8); all routed to expert 0: load (24, 0)
    logits = torch.zeros(4, 2)
    choice = torch.zeros(4, dtype=torch.long)
    latency = torch.tensor([6.0, 4.0])
    cv2 = lambda a, b: ((a - b) ** 2 / 2) / ((a + b) / 2) ** 2   # unbiased variance of two values / mean^2
    want = cv2(12.0, 8.0) + cv2(24.0, 0.0)
    assert balance_loss(logits, choice, latency).item() == pytest.approx(want, rel=1e-6)


def test_technique_through_the_contract():
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    linears = sum(isinstance(m, nn.Linear) and type(m) is nn.Linear for b in model.blocks for m in b.modules())
    vitlab.apply_(model, vitlab.parse_apply(["shiftadd"]))
    assert len(moe_layers(model)) == linears == 4 * len(model.blocks)
    assert isinstance(model.head, nn.Linear) and type(model.head) is nn.Linear   # the classifier stays
    with torch.no_grad():
        model(torch.randn(2, *model.pretrained_cfg["input_size"]))
    assert 0 <= shift_fraction(model) <= 1

    swin = vitlab.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1),
                               num_heads=(1, 1, 1, 1), num_classes=4)
    with pytest.raises(TechniqueNotApplicable, match="shiftadd:attention=false"):
        vitlab.apply_(swin, vitlab.parse_apply(["shiftadd"]))
    vitlab.apply_(swin, vitlab.parse_apply(["shiftadd:attention=false,linears=shift"]))
    assert sum(isinstance(m, ShiftLinear) for m in swin.modules()) > 0
    with pytest.raises(ValueError, match="changes nothing"):
        vitlab.parse_apply(["shiftadd:attention=false,linears=none"])


def test_fine_tuned_checkpoint_round_trip(tmp_path):
    """`vitlab train --apply shiftadd --recipe shiftadd` writes a checkpoint that rebuilds the same model."""
    from safetensors.torch import load_file

    from vitlab.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", "vl_test_vit", "--data", "synthetic:n=64,classes=4", "--epochs", "1",
                 "--batch-size", "16", "--apply", "shiftadd", "--recipe", "shiftadd:weight=0.1", "--out", str(run),
                 "--no-progress", "--threads", "1", "--warmup-epochs", "0"]) == 0
    model = vitlab.create_model(str(run))
    assert moe_layers(model) and type(model.blocks[0].attn).__name__ == "ShiftAddAttention"
    saved = load_file(str(run / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    w = model.blocks[0].mlp.fc1.experts[1].weight_q().detach()
    e = torch.log2(w[w != 0].abs())
    assert torch.equal(e, e.round())
