"""CvT (vitlab/models/cvt.py): official parameter counts and MACs, parity with HF transformers and with the official
code (fixture), the official-checkpoint loaders, and the backbone interface."""
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import GELU, QuickGELU

import vitlab
from vitlab.checkpoint import load_weights
from vitlab.models import from_transformers
from vitlab.models.cvt import checkpoint_filter_fn
from vitlab.models.listing import count_params_meta
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_setting_keeps_output, official_fixture

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zoo" / "cvt"


def _official_fixture():
    info, x, logits, tensors = official_fixture("cvt")
    return tensors, x, logits, info


def _randomize_(model: torch.nn.Module, head: str) -> torch.nn.Module:
    """Random norms, BatchNorm statistics and a head giving O(1) logits, so that every tensor shows in the output."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "num_batches_tracked" in name:
                continue
            if "running_var" in name:
                t.uniform_(0.5, 2.0)
            elif name.endswith("bias") or "running_mean" in name:
                t.normal_(0, 0.1)
            elif t.ndim == 1:
                t.normal_(1.0, 0.1)
        model.get_submodule(head).weight.normal_(0, 1.0)
    return model.eval()


def _hf_cvt(**overrides):
    from transformers import CvtConfig, CvtForImageClassification

    torch.manual_seed(0)
    return _randomize_(CvtForImageClassification(CvtConfig(**overrides)), "classifier")


SMALL_HF = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=10)  # HF needs depth[i] > i


@pytest.mark.parametrize("name, official", [("vl_cvt_13", 19_997_480), ("vl_cvt_21", 31_622_696)])
def test_param_count_equals_official(name, official):
    # counts of the official ConvolutionalVisionTransformer built from experiments/imagenet/cvt/*-224x224.yaml
    assert count_params_meta(name) == official


def test_macs_at_224_match_paper():
    with torch.device("meta"):  # skip the random init: the count depends on shapes only
        model = timm.create_model("vl_cvt_13")
    model = model.to_empty(device="cpu").eval()
    count = count_flops(model, torch.randn(1, 3, 224, 224))
    assert count.macs == pytest.approx(4.5e9, rel=0.05)  # README / paper: 4.5 "GFLOPs" (multiply-adds)
    assert count.attention_macs > 0


def test_official_act_is_quick_gelu_and_hf_converter_sets_gelu():
    assert isinstance(timm.create_model("vl_test_cvt").stages[0].blocks[0].mlp.act, QuickGELU)
    model = from_transformers(_hf_cvt(**SMALL_HF))
    assert isinstance(model.stages[0].blocks[0].mlp.act, GELU)  # timm's exact GELU, as HF's nn.GELU()


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_parity_with_hf_small(size):
    hf = _hf_cvt(**SMALL_HF)
    model = vitlab.models.from_transformers(hf)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
    assert expected.abs().max() > 1.0  # logits large enough for 1e-4 to mean something


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 160])
def test_parity_with_hf_default_config_cvt_13(size):
    hf = _hf_cvt(num_labels=1000)  # CvtConfig() defaults = CvT-13
    assert sum(p.numel() for p in hf.parameters()) == 19_997_480
    model = from_transformers(hf)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_from_transformers_reads_a_save_pretrained_folder(tmp_path):
    hf = _hf_cvt(**SMALL_HF)
    hf.save_pretrained(tmp_path / "hf")
    model = from_transformers(tmp_path / "hf")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_hf_converted_model_survives_a_checkpoint(tmp_path):
    model = from_transformers(_hf_cvt(**SMALL_HF))
    vitlab.save_checkpoint(model, tmp_path / "ckpt")
    again = vitlab.create_model(tmp_path / "ckpt")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_parity_with_official_code_fixture():
    state, x, logits, info = _official_fixture()
    model = timm.create_model("vl_cvt_13", **info["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_checkpoint_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(timm.create_model("vl_test_cvt"), checkpoint_filter_fn)


def test_official_pth_converts_to_a_vitlab_checkpoint(tmp_path):
    # what `vitlab convert vl_cvt_13 official.pth --out DIR --allow-pickle` does
    state, x, logits, info = _official_fixture()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "official.pth")  # DDP-wrapped
    model = vitlab.create_model("vl_cvt_13", **info["vitlab_kwargs"])
    load_weights(model, tmp_path / "official.pth", allow_pickle=True, filter_fn=checkpoint_filter_fn)
    vitlab.save_checkpoint(model, tmp_path / "ckpt")
    model = vitlab.create_model(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_pretrained_file_adapts_rgb_weights_to_in_chans_1(tmp_path):
    state, x, logits, info = _official_fixture()
    torch.save(state, tmp_path / "official.pth")
    overlay = dict(file=str(tmp_path / "official.pth"), num_classes=10)  # keep the 10-class head
    rgb = timm.create_model("vl_cvt_13", pretrained=True, pretrained_cfg_overlay=overlay, **info["vitlab_kwargs"])
    with torch.no_grad():
        torch.testing.assert_close(rgb.eval()(x), logits, atol=1e-4, rtol=0)
    gray = timm.create_model("vl_cvt_13", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1,
                             **info["vitlab_kwargs"]).eval()
    w = state["stage0.patch_embed.proj.weight"]
    torch.testing.assert_close(gray.stages[0].patch_embed.proj.weight, w.sum(dim=1, keepdim=True))
    assert gray(torch.randn(2, 1, 40, 40)).shape == (2, 10)


def _blocks(model):
    return [b for stage in model.stages for b in stage.blocks]


def test_fused_and_manual_attention_agree():
    torch.manual_seed(0)
    model = timm.create_model("vl_test_cvt").eval()
    assert_setting_keeps_output(model, torch.randn(2, 3, 32, 32),
                                [b.attn for b in _blocks(model)], "fused_attn", False)


def test_chunked_mlp_inference_equals_the_plain_mlp():
    torch.manual_seed(0)
    model = timm.create_model("vl_test_cvt").eval()
    # mlp_chunk_elems=1000 forces several chunks in every stage
    assert_setting_keeps_output(model, torch.randn(3, 3, 64, 64),
                                _blocks(model), "mlp_chunk_elems", 1000)


def test_any_input_size_and_in_chans_1():
    model = timm.create_model("vl_test_cvt", in_chans=1, num_classes=4).eval()
    for size in [(32, 32), (56, 40), (17, 23)]:
        assert model(torch.randn(1, 1, *size)).shape == (1, 4)


def test_forward_intermediates_and_features_only():
    model = timm.create_model("vl_test_cvt").eval()
    x = torch.randn(2, 3, 64, 48)
    final, feats = model.forward_intermediates(x)
    assert [f.shape for f in feats] == [(2, 32, 16, 12), (2, 48, 8, 6), (2, 64, 4, 3)]
    torch.testing.assert_close(final, model.forward_features(x))
    assert model.forward_head(final).shape == (2, 10)
    last_normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    torch.testing.assert_close(last_normed.flatten(2).transpose(1, 2), final[:, 1:])  # final LN, class token dropped
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], feats[0])
    assert [f.shape[1] for f in model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)] == [32, 64]

    backbone = timm.create_model("vl_test_cvt", features_only=True, out_indices=(1, 2))
    assert backbone.feature_info.channels() == [48, 64] and backbone.feature_info.reduction() == [8, 16]
    assert [f.shape for f in backbone(x)] == [(2, 48, 8, 6), (2, 64, 4, 3)]


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("vl_test_cvt")
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_global_pool_and_classifier_reset():
    model = timm.create_model("vl_test_cvt").eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)  # (B, 1 + H*W, C)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    model.reset_classifier(5, global_pool="avg")
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))
    assert model(x).shape == (2, 5)
    no_cls = timm.create_model("vl_test_cvt", cls_token=False)
    assert no_cls.global_pool == "avg" and no_cls(x).shape == (2, 10)
    with pytest.raises(ValueError, match="class token"):
        no_cls.reset_classifier(3, global_pool="token")


def test_module_docstring_example_runs():
    import doctest

    import vitlab.models.cvt as module

    result = doctest.testmod(module)
    assert result.attempted and not result.failed
