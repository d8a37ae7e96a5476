"""ViR (vitlab/models/vir.py): the three retention forms agree, the decay mask, parity with the authors' reviewer
code (fixture) and with torchscale's MultiScaleRetention (fixture), parameter counts, MACs, loaders, interfaces."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.checkpoint import load_weights, save_checkpoint
from vitlab.models.listing import count_params_meta
from vitlab.models.rmt import rotate_every_two
from vitlab.models.vir import (Retention, VisionRetention, checkpoint_filter_fn, decay_mask, decay_rates,
                               retention_chunkwise, retention_parallel, retention_recurrent)
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo" / "vir"

# exact counts of the reviewer-code constructors (anom63931/ViR models/vir.py at d91fd8b, img_size (224, 224),
# 1000 classes): ViT widths, 196 position embeddings (none for the class token), LayerScale in every block
REVIEWER_CODE_PARAMS = {
    "vl_vir_small": 22_059_496,          # vir_small_patch16_224
    "vl_vir_base": 86_585_320,           # vir_base_patch16_224
    "vl_vir_large": 304_374_760,         # vir_large_patch16_224
    "vl_vir_large_patch14": 304_251_880,  # vir_large_patch14_224
}


def _official():
    meta = json.loads((FIXTURES / "official_tiny.json").read_text())
    state = load_file(str(FIXTURES / "official_tiny.safetensors"))
    return meta, state.pop("__input__"), state.pop("__logits__"), state


def _qkv(batch=2, heads=3, length=17, dim=8, value_dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, d, generator=g) for d in (dim, dim, value_dim)]


def _test_model(**kwargs) -> VisionRetention:
    """vl_test_vir with LayerScale gammas raised from 1e-5 to ~1, so that every retention shows in the output."""
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vir", **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", sorted(REVIEWER_CODE_PARAMS))
def test_param_count_equals_reviewer_code(name):
    assert count_params_meta(name) == REVIEWER_CODE_PARAMS[name]


@pytest.mark.parametrize("name, vit, published", [("vl_vir_small", "vit_small_patch16_224", 4.599e9),
                                                   ("vl_vir_base", "vit_base_patch16_224", 17.564e9)])
def test_macs_at_224_equal_vit(name, vit, published):
    """The parallel form costs what ViT's attention does (q k^T and (.) v over the same 197 tokens)."""
    with torch.device("meta"):
        x = torch.empty(1, 3, 224, 224)
        ours, theirs = count_flops(timm.create_model(name), x), count_flops(timm.create_model(vit), x)
    assert ours.macs == theirs.macs and abs(ours.macs / published - 1) < 1e-3, ours.macs
    width, blocks = (384, 12) if "small" in name else (768, 12)
    assert ours.by_op["aten.bmm"] == blocks * 2 * 197 ** 2 * width  # the retention matmuls, 2 N^2 C per block


def test_decay_rates_and_mask_equal_direct_powers():
    log_gamma = decay_rates(4)
    # the reviewer code's schedule: 1 - exp(linspace(log(1/32), log(1/512), heads))
    reviewer = 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), 4))
    torch.testing.assert_close(log_gamma.exp(), reviewer)
    assert decay_rates(1).exp().item() == pytest.approx(1 - 1 / 32)
    mask = decay_mask(9, log_gamma)
    for h, gamma in enumerate(log_gamma.exp().tolist()):
        for n in range(9):
            for m in range(9):
                assert mask[h, n, m].item() == pytest.approx(gamma ** (n - m) if n >= m else 0.0, rel=1e-6, abs=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 16, 17, 40])
def test_retention_forms_agree(chunk_size):
    q, k, v = _qkv()  # 17 tokens: only 1 and 17 divide it
    log_gamma = torch.log(torch.tensor([0.5, 0.9, 0.99]))  # strong decays: a wrong power shows
    parallel = retention_parallel(q, k, v, log_gamma)
    torch.testing.assert_close(retention_recurrent(q, k, v, log_gamma), parallel, atol=1e-5, rtol=0)
    torch.testing.assert_close(retention_chunkwise(q, k, v, log_gamma, chunk_size), parallel, atol=1e-5, rtol=0)
    # against the definition: o_n = sum_{m <= n} gamma^(n - m) (q_n . k_m) v_m
    n = 11
    direct = sum(log_gamma.exp()[None, :, None] ** (n - m) * (q[:, :, n] * k[:, :, m]).sum(-1, keepdim=True)
                 * v[:, :, m] for m in range(n + 1))
    torch.testing.assert_close(parallel[:, :, n], direct, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode, chunk_size", [("recurrent", None), ("chunkwise", 5), ("chunkwise", 16)])
def test_retention_layer_modes_agree(mode, chunk_size):
    torch.manual_seed(0)
    layer = Retention(24, num_heads=3).eval()
    x = torch.randn(2, 21, 24)
    with torch.no_grad():
        parallel = layer(x)
        layer.mode, layer.chunk_size = mode, chunk_size or layer.chunk_size
        torch.testing.assert_close(layer(x), parallel, atol=1e-5, rtol=0)


def test_model_modes_agree():
    model = _test_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parallel = model.forward_features(x)  # (2, 65, 48): 64 patches + the class token
        for mode, chunk_size in [("recurrent", None), ("chunkwise", 7), ("chunkwise", 16), ("chunkwise", 65)]:
            torch.testing.assert_close(model.set_mode(mode, chunk_size).forward_features(x), parallel, atol=1e-5,
                                       rtol=0)
    built = vitlab.create_model("vl_test_vir", mode="chunkwise", chunk_size=9)
    assert {(b.attn.mode, b.attn.chunk_size) for b in built.blocks} == {("chunkwise", 9)}
    with pytest.raises(ValueError, match="mode must be one of"):
        model.set_mode("softmax")


def test_retention_is_causal_and_the_class_token_sees_every_patch():
    model = _test_model()
    x = torch.randn(1, 3, 32, 32)
    changed = x.clone()
    changed[..., 16:20, 8:12] += 1.0  # patch (4, 2): token 4 * 8 + 2 = 34
    with torch.no_grad():
        before, after = model.forward_features(x), model.forward_features(changed)
    moved = (after - before).abs().amax(-1)[0]  # (65,)
    assert moved[:34].max() == 0 and moved[34] > 0.01 and moved[-1] > 0.01


def test_retention_matches_torchscale_multiscale_retention():
    """torchscale's MultiScaleRetention = out_proj(swish(g) * RMSNorm_head(retention of xPos-rotated q, k)); its
    normalisations scale each output row per head, which the RMS norm removes: so the same wrapper around vitlab's
    retention, on its weights, gives its outputs in its parallel, recurrent and chunkwise forms."""
    t = load_file(str(FIXTURES / "torchscale_msr.safetensors"))
    meta = json.loads((FIXTURES / "torchscale_msr.json").read_text())
    B, N, C = t["x"].shape
    H, dv = meta["config"]["num_heads"], meta["config"]["value_dim"] // meta["config"]["num_heads"]

    def heads(y, d):
        return y.view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)

    q, k = (heads(t["x"] @ t[f"msr.{n}_proj.weight"].T, C // H) for n in "qk")
    k = k * (C // H) ** -0.5
    q, k = ((y * t["cos"]) + rotate_every_two(y) * t["sin"] for y in (q, k))
    v, g = (t["x"] @ t[f"msr.{n}_proj.weight"].T for n in "vg")
    for form, retention in [("parallel", retention_parallel), ("recurrent", retention_recurrent),
                            ("chunkwise", lambda *a: retention_chunkwise(*a, meta["config"]["chunk"]))]:
        out = retention(q, k, heads(v, dv), t["log_gamma"])  # (B, H, N, dv)
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + meta["layernorm_eps"])
        out = (F.silu(g) * out.transpose(1, 2).reshape(B, N, H * dv)) @ t["msr.out_proj.weight"].T
        torch.testing.assert_close(out, t[form], atol=1e-5, rtol=1e-4)


def test_logits_match_reviewer_code_in_every_mode():
    meta, x, logits, state = _official()
    assert meta["commit"] == "d91fd8beb942b95332d7506fae3df03cf18471db" and logits.shape == (2, 10)
    model = VisionRetention(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model))  # strict: every tensor mapped
    with torch.no_grad():
        for mode, chunk_size in [("parallel", None), ("recurrent", None), ("chunkwise", 5), ("chunkwise", 4)]:
            torch.testing.assert_close(model.set_mode(mode, chunk_size)(x), logits, atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_vir"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_and_converts(tmp_path):
    meta, x, logits, state = _official()
    path = tmp_path / "official.pth"
    torch.save({"model": state, "epoch": 3}, path)  # the timm training checkpoint layout
    model = vitlab.create_model("vl_test_vir", **meta["vitlab_kwargs"])
    load_weights(model, path, allow_pickle=True, filter_fn=checkpoint_filter_fn)
    save_checkpoint(model, tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(vitlab.create_model(str(tmp_path / "ckpt"))(x), logits, atol=1e-4, rtol=0)
    safetensors_path = tmp_path / "official.safetensors"
    save_file(state, str(safetensors_path))
    overlay = dict(file=str(safetensors_path), num_classes=10)
    loaded = vitlab.create_model("vl_test_vir", pretrained=True, pretrained_cfg_overlay=overlay,
                                 **meta["vitlab_kwargs"]).eval()
    gray = vitlab.create_model("vl_test_vir", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay,
                               **meta["vitlab_kwargs"]).eval()
    torch.testing.assert_close(gray.patch_embed.proj.weight, state["patch_embed.proj.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(gray(x[:, :1]), loaded(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_other_input_sizes_resample_the_position_embedding():
    meta, x, logits, state = _official()
    larger = vitlab.create_model("vl_test_vir", **dict(meta["vitlab_kwargs"], img_size=48)).eval()
    larger.load_state_dict(checkpoint_filter_fn(state, larger))  # 4x4 position embeddings resampled to 6x6
    assert larger.pos_embed.shape == (1, 36, 32)
    model = VisionRetention(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model))
    big = F.interpolate(x, size=(48, 48), mode="bilinear")
    with torch.no_grad():
        torch.testing.assert_close(model(big), larger(big), atol=1e-4, rtol=0)  # on the fly == at load time
        assert model(torch.randn(1, 3, 32, 56)).shape == (1, 10)  # non-square grid 4 x 7


def test_intermediates_and_features_only():
    x = torch.randn(2, 3, 32, 32)
    model = vitlab.create_model("vl_test_vir").eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, 2])
        assert [tuple(m.shape) for m in inter] == [(2, 48, 8, 8)] * 2
        torch.testing.assert_close(final, model.forward_features(x))
        tokens = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        assert tuple(tokens[0].shape) == (2, 65, 48)
        early = model.forward_intermediates(x, indices=[2], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[-1])
        features = vitlab.create_model("vl_test_vir", features_only=True, out_indices=(1, 2))
        assert [tuple(m.shape) for m in features(x)] == [(2, 48, 8, 8)] * 2


def test_pools_and_refusals():
    x = torch.randn(2, 3, 32, 32)
    model = _test_model(global_pool="avg")
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features[:, :64].mean(1))
        model.reset_classifier(0, "token")
        torch.testing.assert_close(model(x), features[:, -1])
    with pytest.raises(ValueError, match="class token"):
        vitlab.create_model("vl_test_vir", class_token=False)
    assert vitlab.create_model("vl_test_vir", class_token=False, global_pool="avg")(x).shape == (2, 1000)
    with pytest.raises(ValueError, match="attn_mask"):
        Retention(16, 2)(torch.randn(1, 3, 16), attn_mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="attention dropout"):
        Retention(16, 2, attn_drop=0.1)
