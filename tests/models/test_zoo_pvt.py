"""PVT v1 (vitlab/models/pvt.py): official parameter counts and MACs, parity with HF transformers and with the official
code (fixture, also at another input size), the official-checkpoint loaders, and the backbone interface."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoint import load_weights
from vitlab.models import from_transformers
from vitlab.models.listing import count_params_meta
from vitlab.models.pvt import checkpoint_filter_fn
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_setting_keeps_output

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zoo" / "pvt"


def _official_fixture():
    tensors = load_file(str(FIXTURE / "official_tiny.safetensors"))
    io = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("__")]}
    info = json.loads((FIXTURE / "official_tiny.json").read_text())
    return tensors, io, info


def _hf_pvt(**overrides):
    from transformers import PvtConfig, PvtForImageClassification

    torch.manual_seed(0)
    model = PvtForImageClassification(PvtConfig(**overrides))
    with torch.no_grad():  # random norms and a head giving O(1) logits, so that every tensor shows in the output
        for name, t in model.state_dict().items():
            if name.endswith("bias"):
                t.normal_(0, 0.1)
            elif t.ndim == 1:
                t.normal_(1.0, 0.1)
        model.classifier.weight.normal_(0, 1.0)
    return model.eval()


SMALL_HF = dict(image_size=64, hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4], depths=[1, 1, 2, 1],
                mlp_ratios=[2, 2, 2, 2], num_labels=10)


@pytest.mark.parametrize("name, official", [("vl_pvt_tiny", 13_229_288), ("vl_pvt_small", 24_485_864)])
def test_param_count_equals_official(name, official):
    # counts of the official classification/pvt.py pvt_tiny / pvt_small with 1000 classes
    assert count_params_meta(name) == official


def test_macs_at_224_match_paper():
    with torch.device("meta"):  # skip the random init: the count depends on shapes only
        model = timm.create_model("vl_pvt_tiny")
    model = model.to_empty(device="cpu").eval()
    count = count_flops(model, torch.randn(1, 3, 224, 224))
    assert count.macs == pytest.approx(1.9e9, rel=0.05)  # paper Table 2: 1.9 "GFLOPs" (multiply-adds)
    assert count.attention_macs > 0


def test_parity_with_hf_small():
    hf = _hf_pvt(**SMALL_HF)
    model = from_transformers(hf)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    # HF uses layer_norm_eps for every LayerNorm; the official patch-embed / reduction norms keep torch's 1e-5
    assert model.stages[0].patch_embed.norm.eps == 1e-6 and model.stages[0].blocks[0].attn.norm.eps == 1e-6
    x = torch.randn(2, 3, 64, 64)  # HF's PVT is only correct at its configured image_size
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
    assert expected.abs().max() > 1.0  # logits large enough for 1e-4 to mean something


@pytest.mark.slow
def test_parity_with_hf_default_config_pvt_tiny():
    hf = _hf_pvt(num_labels=1000)  # PvtConfig() defaults = PVT-Tiny
    assert sum(p.numel() for p in hf.parameters()) == 13_229_288
    model = from_transformers(hf)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_from_transformers_reads_a_save_pretrained_folder(tmp_path):
    hf = _hf_pvt(**SMALL_HF)
    hf.save_pretrained(tmp_path / "hf")
    model = from_transformers(tmp_path / "hf")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_hf_converted_model_survives_a_checkpoint(tmp_path):
    model = from_transformers(_hf_pvt(**SMALL_HF))
    vitlab.save_checkpoint(model, tmp_path / "ckpt")
    again = vitlab.create_model(tmp_path / "ckpt")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_parity_with_official_code_fixture_at_two_sizes():
    state, io, info = _official_fixture()
    model = timm.create_model("vl_pvt_tiny", **info["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model))
    with torch.no_grad():
        torch.testing.assert_close(model(io["__input__"]), io["__logits__"], atol=1e-4, rtol=0)
        # another input size: position embeddings resized bilinearly, as the official code does
        torch.testing.assert_close(model(io["__input_resized__"]), io["__logits_resized__"], atol=1e-4, rtol=0)
    timm_style = timm.create_model("vl_pvt_tiny", pos_embed_interp="bicubic", pos_embed_antialias=True,
                                   **info["vitlab_kwargs"]).eval()
    timm_style.load_state_dict(checkpoint_filter_fn(state, timm_style))
    with torch.no_grad():
        assert not torch.allclose(timm_style(io["__input_resized__"]), io["__logits_resized__"], atol=1e-4)


def test_checkpoint_filter_resizes_pos_embed_to_the_model_img_size():
    state, io, info = _official_fixture()
    size = tuple(io["__input_resized__"].shape[-2:])
    model = timm.create_model("vl_pvt_tiny", **dict(info["vitlab_kwargs"], img_size=size)).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model))  # resized at load time, not at run time
    assert model.stages[0].pos_embed.shape[1] == (size[0] // 4) * (size[1] // 4)
    with torch.no_grad():
        torch.testing.assert_close(model(io["__input_resized__"]), io["__logits_resized__"], atol=1e-4, rtol=0)


def test_checkpoint_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(timm.create_model("vl_test_pvt"), checkpoint_filter_fn)


def test_official_pth_converts_to_a_vitlab_checkpoint(tmp_path):
    # what `vitlab convert vl_pvt_tiny official.pth --out DIR --allow-pickle` does
    state, io, info = _official_fixture()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "official.pth")  # DDP-wrapped
    model = vitlab.create_model("vl_pvt_tiny", **info["vitlab_kwargs"])
    load_weights(model, tmp_path / "official.pth", allow_pickle=True, filter_fn=checkpoint_filter_fn)
    vitlab.save_checkpoint(model, tmp_path / "ckpt")
    model = vitlab.create_model(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(model(io["__input__"]), io["__logits__"], atol=1e-4, rtol=0)


def test_pretrained_file_adapts_rgb_weights_to_in_chans_1(tmp_path):
    state, io, info = _official_fixture()
    torch.save(state, tmp_path / "official.pth")
    overlay = dict(file=str(tmp_path / "official.pth"), num_classes=10)  # keep the 10-class head
    rgb = timm.create_model("vl_pvt_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **info["vitlab_kwargs"])
    with torch.no_grad():
        torch.testing.assert_close(rgb.eval()(io["__input__"]), io["__logits__"], atol=1e-4, rtol=0)
    gray = timm.create_model("vl_pvt_tiny", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1,
                             **info["vitlab_kwargs"]).eval()
    w = state["patch_embed1.proj.weight"]
    torch.testing.assert_close(gray.stages[0].patch_embed.proj.weight, w.sum(dim=1, keepdim=True))
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def _blocks(model):
    return [b for stage in model.stages for b in stage.blocks]


def test_fused_and_manual_attention_agree():
    torch.manual_seed(0)
    model = timm.create_model("vl_test_pvt").eval()
    assert_setting_keeps_output(model, torch.randn(2, 3, 64, 64),
                                [b.attn for b in _blocks(model)], "fused_attn", False)


def test_chunked_mlp_inference_equals_the_plain_mlp():
    torch.manual_seed(0)
    model = timm.create_model("vl_test_pvt").eval()
    # mlp_chunk_elems=1000 forces several chunks in every stage
    assert_setting_keeps_output(model, torch.randn(3, 3, 64, 64),
                                _blocks(model), "mlp_chunk_elems", 1000)


def test_any_input_size_and_in_chans_1():
    model = timm.create_model("vl_test_pvt", in_chans=1, num_classes=4).eval()
    for size in [(64, 64), (96, 64), (40, 72)]:
        assert model(torch.randn(1, 1, *size)).shape == (1, 4)


def test_forward_intermediates_and_features_only():
    model = timm.create_model("vl_test_pvt").eval()
    x = torch.randn(2, 3, 96, 64)
    final, feats = model.forward_intermediates(x)
    assert [f.shape for f in feats] == [(2, 32, 24, 16), (2, 32, 12, 8), (2, 64, 6, 4), (2, 64, 3, 2)]
    torch.testing.assert_close(final, model.forward_features(x))
    assert model.forward_head(final).shape == (2, 10)
    last_normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    torch.testing.assert_close(last_normed.flatten(2).transpose(1, 2), final[:, 1:])  # final LN, class token dropped
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], feats[0])

    backbone = timm.create_model("vl_test_pvt", features_only=True, out_indices=(0, 2, 3))
    assert backbone.feature_info.channels() == [32, 64, 64] and backbone.feature_info.reduction() == [4, 16, 32]
    assert [f.shape for f in backbone(x)] == [(2, 32, 24, 16), (2, 64, 6, 4), (2, 64, 3, 2)]


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("vl_test_pvt")
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_global_pool_and_classifier_reset():
    model = timm.create_model("vl_test_pvt").eval()
    x = torch.randn(2, 3, 64, 64)
    tokens = model.forward_features(x)  # (B, 1 + H*W, C)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    model.reset_classifier(5, global_pool="avg")
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))
    assert model(x).shape == (2, 5)
    no_cls = timm.create_model("vl_test_pvt", cls_token=False)
    assert no_cls.global_pool == "avg" and no_cls(x).shape == (2, 10)
    with pytest.raises(ValueError, match="class token"):
        no_cls.reset_classifier(3, global_pool="token")


def test_module_docstring_example_runs():
    import doctest

    import vitlab.models.pvt as module

    result = doctest.testmod(module)
    assert result.attempted and not result.failed
