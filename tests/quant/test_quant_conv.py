"""Quantization everywhere: Conv2d layers per output channel, Swin's window attention, the stem and head left
float, the int8 engines running the convolutions in int8, and `quant_mac_fraction`."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitlab
from vitlab.errors import UserError
from vitlab.quant import (PTQ, W8, W8A8, QuantConv2d, QuantLinear, QuantAttentionOps, QuantWindowAttention,
                          QuantWindowAttentionV2, calibrate, quant_layers, prepare_, quant_mac_fraction_of)
from vitlab.quant.base import make_quantizer


def _x(n, size=32, seed=0, chans=3):
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _convnext():
    """A tiny ConvNeXt (stem conv, depthwise 7x7 convs, 1x1-conv MLPs, strided downsample convs, Linear head)."""
    torch.manual_seed(0)
    return vitlab.create_model("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 32, 64), num_classes=10).eval()


@pytest.mark.parametrize("groups", [1, 2, 8])    # plain, grouped, depthwise
def test_quant_conv2d_off_is_float_exactly_and_quant_is_close(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, stride=2, groups=groups)
    ref = copy.deepcopy(conv)
    x = _x(4, 12, chans=8)
    QuantConv2d.wrap_(conv, make_quantizer("weight", PTQ()), make_quantizer("input", PTQ()))
    assert torch.equal(conv(x), ref(x))                                  # mode off: the float layer, bit for bit
    assert conv.state_dict().keys() >= ref.state_dict().keys()           # weights keep their names
    conv.input_quant.set_mode("observe")
    conv(x)
    conv.weight_quant.observe(conv.weight)
    for q in (conv.weight_quant, conv.input_quant):
        q.finalize()
        q.set_mode("quant")
    assert conv.weight_quant.scale.shape == (16,)                        # one scale per output channel
    codes = conv.weight_quant.quantize(conv.weight.detach())
    assert codes.abs().amax(dim=(1, 2, 3)).eq(127).all()                 # symmetric: every channel uses its range
    out, want = conv(x), ref(x)
    assert not torch.equal(out, want)
    assert ((out - want).norm() / want.norm()).item() < 0.02


def test_quant_conv2d_refuses_per_token_inputs_and_subclasses():
    conv = nn.Conv2d(4, 4, 1)
    per_token = make_quantizer("input", PTQ(per_token=True))
    with pytest.raises(UserError, match="per tensor"):
        QuantConv2d.wrap_(conv, make_quantizer("weight", PTQ()), per_token)

    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(UserError, match="plain Conv2d"):
        QuantConv2d.wrap_(MyConv(4, 4, 1), make_quantizer("weight", PTQ()), make_quantizer("input", PTQ()))


def test_ptq_quantizes_every_conv_and_linear_but_stem_and_head():
    model = _convnext()
    ref = copy.deepcopy(model)
    vitlab.apply_(model, PTQ(per_token=True), calib=[_x(16, seed=1)])   # per_token: Linear inputs only
    assert type(model.stem[0]) is nn.Conv2d and type(model.head.fc) is nn.Linear
    layers = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert len(layers) == 1 + 4 * 3 + 3 + 1         # stem, 4 blocks x (dw, fc1, fc2), 3 downsamples, head
    assert {t for n, t in layers.items() if n not in ("stem.0", "head.fc")} == {QuantConv2d}
    dw = model.stages[0].blocks[0].conv_dw
    assert dw.groups == dw.in_channels and dw.weight_quant.scale.shape == (dw.out_channels,)
    assert model.quant_mac_fraction == 1.0
    x = _x(32, seed=2)
    with torch.no_grad():
        out, want = model(x), ref(x)
    assert 0 < ((out - want).norm() / want.norm()).item() < 0.1


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                             num_classes=10, **kw).eval()


def test_quant_mac_fraction_is_exact_on_a_known_low_case():
    # Linear MACs of a ViT block: 12 N D^2; attention matmuls: 2 N^2 D (QK^T and softmax·V). Stem (patch_embed.proj)
    # and head excluded from both sides, so without the attention matmuls the fraction is 12 D / (12 D + 2 N).
    n_tokens, dim = 17, 64
    low = 12 * dim / (12 * dim + 2 * n_tokens)
    assert prepare_(_vit(), PTQ(attn=False)).quant_mac_fraction == pytest.approx(low, rel=1e-12)
    assert prepare_(_vit(), PTQ()).quant_mac_fraction == 1.0


@pytest.mark.slow
def test_w8_fraction_leaves_attention_matmuls_out():
    low = 12 * 64 / (12 * 64 + 2 * 17)            # as above: weight-only int8 runs no attention matmul in int8
    runner = vitlab.deploy(_vit(), W8(threads=1))
    assert quant_mac_fraction_of(runner) == pytest.approx(low, rel=1e-12)


def test_swin_window_attention_is_quantized_and_off_mode_matches_float():
    torch.manual_seed(0)
    kw = dict(img_size=32, embed_dim=32, depths=(1, 2), num_heads=(2, 4), window_size=4, num_classes=10)
    for name, cls in (("swin_tiny_patch4_window7_224", QuantWindowAttention),
                      ("swinv2_tiny_window8_256", QuantWindowAttentionV2)):
        model = timm.create_model(name, **kw).eval()
        ref, x = copy.deepcopy(model), _x(8, seed=3)
        prepare_(model, PTQ())
        attns = [m for m in model.modules() if isinstance(m, cls)]
        assert len(attns) == 3 and model.quant_mac_fraction >= 0.95
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)   # explicit matmuls vs fused SDPA
        calibrate(model, [x])
        with torch.no_grad():
            assert ((model(x) - ref(x)).norm() / ref(x).norm()).item() < 0.1


def test_layer_the_forward_never_calls_stays_float():
    # timm's Swin V2 attention reads qkv.weight through F.linear: with attn=false (its own forward) qkv never runs
    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window8_256", img_size=32, embed_dim=32, depths=(1, 1), num_heads=(2, 4),
                              window_size=4, num_classes=10).eval()
    vitlab.apply_(model, PTQ(attn=False), calib=[_x(8, seed=4)])        # calibrates: nothing left unobserved
    assert all(type(b.attn.qkv) is nn.Linear for s in model.layers for b in s.blocks)
    assert all(type(b.mlp.fc1) is QuantLinear for s in model.layers for b in s.blocks)
    assert 0.5 < model.quant_mac_fraction < 0.95


@pytest.mark.parametrize("name, kw", [("pvt_v2_b0", dict(depths=(1, 1, 1, 1))),
                                      ("efficientformer_l1", dict(depths=(1, 1, 1, 2), num_vit=1))])
def test_quant_mac_fraction_of_hierarchical_models(name, kw):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kw).eval()
    prepare_(model, PTQ(), example=_x(1, 224 if name == "efficientformer_l1" else 64))   # its attention bias: 224
    assert any(isinstance(m, QuantConv2d) for m in model.modules())
    assert model.quant_mac_fraction >= 0.95


def test_hand_written_attention_matmuls_are_quantized_too():
    # TNT's attention runs q @ k^T and attn @ v itself (no SDPA, no dedicated adapter): both matmuls get operand
    # quantizers; with attn=false they stay float and the fraction is exactly what the matmuls leave
    torch.manual_seed(0)
    model = timm.create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10).eval()
    # its pretrained_cfg still says 224 px, which this instance refuses: without an example there is no count
    assert prepare_(copy.deepcopy(model), PTQ()).quant_mac_fraction is None
    prepare_(model, PTQ(), example=_x(1, 32))
    ops = [m for m in model.modules() if isinstance(m, QuantAttentionOps)]
    assert len(ops) == 4 and all(len(m.matmul_quants) == 2 and not len(m.sdpa_quants) for m in ops)
    assert model.quant_mac_fraction == 1.0 and model.quant_input_size == (3, 32, 32)
    calibrate(model, [_x(8, 32, seed=9)])

    from vitlab.quant.coverage import _own_macs, module_macs

    model = prepare_(timm.create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10).eval(),
                      PTQ(attn=False), example=_x(1, 32))
    total, macs = module_macs(model, _x(1, 32))
    counted = total - macs["pixel_embed.proj"] - macs["head"]
    matmuls = sum(_own_macs(n, m, macs) for n, m in model.named_modules() if type(m).__name__ == "Attention")
    assert matmuls > 0 and model.quant_mac_fraction == pytest.approx(1 - matmuls / counted, rel=1e-12)


def test_sdpa_adapter_matches_sdpa_in_off_mode_and_counts_call_sites():
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", depths=(1, 1, 1, 1), num_classes=10).eval()
    ref, x = copy.deepcopy(model), _x(4, 64, seed=8)
    prepare_(model, PTQ(), example=x[:1])
    attns = [m for m in model.modules() if isinstance(m, QuantAttentionOps)]
    assert len(attns) == 4 and all(len(m.sdpa_quants) == 1 and not len(m.matmul_quants) for m in attns)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)
    calibrate(model, [x])
    with torch.no_grad():
        out, want = model(x), ref(x)
    assert 0 < ((out - want).norm() / want.norm()).item() < 0.1


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_mask", "causal", "scale", "gqa"])
def test_quant_sdpa_math_is_sdpa(case):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 3)
    kw = {"bool_mask": dict(attn_mask=torch.rand(6, 5) > 0.3), "float_mask": dict(attn_mask=torch.randn(6, 5)),
          "scale": dict(scale=0.3), "plain": {}}.get(case, {})
    if case == "causal":
        k, v, kw = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 3), dict(is_causal=True)
    if case == "gqa":
        k, v, kw = k[:, :2], v[:, :2], dict(enable_gqa=True)
    if case == "bool_mask":
        kw["attn_mask"][:, 0] = True                                      # no fully masked row
    module = QuantAttentionOps.wrap_(nn.Identity(), PTQ())
    torch.testing.assert_close(module.quant_sdpa(0, q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw),
                               atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def deployed():
    model = _convnext()
    runner = vitlab.deploy(copy.deepcopy(model), W8A8(engine="openvino", threads=1), calib=[_x(16, seed=1)])
    return model, runner


def test_openvino_graph_has_quantized_convolutions(deployed):
    _, runner = deployed
    convs = [op for op in runner.ov_model.get_ordered_ops()
             if op.get_type_name() in ("Convolution", "GroupConvolution")]
    sim_convs = [n for n, m in quant_layers(runner.sim_module) if isinstance(m, QuantConv2d)]
    fed = [op for op in convs if "FakeQuantize" in _producers(op.input_value(0).get_node())]
    # every quantized conv reads a FakeQuantize (through a layout op at most) and int8 weight codes; the stem reads
    # the image in f32
    assert len(fed) == len(sim_convs) == len(convs) - 1 == 4 * 3 + 3
    weights = [op for op in fed if "i8" in _weight_types(op.input_value(1).get_node())]
    assert len(weights) == len(fed)
    assert runner.quant_mac_fraction == 1.0
    from vitlab.profiling import has_amx, has_vnni

    precisions = {op.get_rt_info()["originalLayersNames"].astype(str): op.get_rt_info()["runtimePrecision"].astype(str)
                  for op in runner.compiled.get_runtime_model().get_ops()
                  if op.get_rt_info()["layerType"].astype(str) == "Convolution"}
    stem = [p for n, p in precisions.items() if n.startswith("__module.stem.0/")]
    assert stem == ["f32"]
    if has_vnni() or has_amx():
        assert sum(p in ("u8", "i8") for p in precisions.values()) == len(precisions) - 1, precisions


def _producers(node, depth=3) -> set[str]:
    """Type names of `node` and what feeds it through up to `depth` layout ops."""
    out = {node.get_type_name()}
    if depth and node.get_type_name() in ("Transpose", "Reshape", "Convert"):
        out |= _producers(node.input_value(0).get_node(), depth - 1)
    return out


def _weight_types(node, depth=4) -> set[str]:
    """Element types of the constants behind a weight input (Multiply(Convert(i8), scale), maybe Reshape'd)."""
    if node.get_type_name() == "Constant":
        return {node.get_element_type().get_type_name()}
    if not depth:
        return set()
    inputs = (node.input_value(i).get_node() for i in range(node.get_input_size()))
    return set().union(*(_weight_types(n, depth - 1) for n in inputs))


def test_deployed_conv_model_agrees_with_simulated_twin(deployed):
    model, runner = deployed
    x = _x(256, seed=5)
    with torch.no_grad():
        sim, flt = runner.sim_module(x), model(x)
    out = runner(x)
    assert (out.argmax(1) == sim.argmax(1)).float().mean().item() >= 0.99
    assert (out - sim).abs().max() <= 4 * (sim - flt).abs().max()


@pytest.mark.slow
def test_onnx_graph_feeds_convolutions_from_dequantize(deployed):
    import onnx

    model, _ = deployed
    runner = vitlab.deploy(copy.deepcopy(model), W8A8(engine="onnxruntime", threads=1), calib=[_x(16, seed=1)])
    graph = onnx.load_model_from_string(runner.onnx_model).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    convs = [[producer.get(i, "initializer") for i in n.input[:2]] for n in graph.node if n.op_type == "Conv"]
    assert convs[0] == ["initializer", "initializer"]                      # the stem: float
    assert convs[1:] and all(c == ["DequantizeLinear", "DequantizeLinear"] for c in convs[1:])
    x = _x(64, seed=6)
    with torch.no_grad():
        sim, flt = runner.sim_module(x), model(x)
    assert (runner(x) - sim).abs().max() <= 4 * (sim - flt).abs().max()


def test_quantized_conv_model_saves_and_reloads(tmp_path):
    from vitlab.quant import load_quantized, save_quantized

    model = _convnext()
    vitlab.apply_(model, PTQ(w=6, a=6, quantizer="percentile"), calib=[_x(16, seed=1)])
    save_quantized(model, tmp_path / "q")
    again = load_quantized(tmp_path / "q")
    layers = dict(quant_layers(again))
    assert {n for n, _ in quant_layers(model)} == set(layers)
    dw = layers["stages.0.blocks.0.conv_dw"]
    assert isinstance(dw, QuantConv2d) and dw.weight_quant.bits == 6 and dw.weight_quant.scale.shape == (16,)
    x = _x(8, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    assert again.quant_mac_fraction == model.quant_mac_fraction == 1.0
