"""DiNAT: neighborhood attention vs a masked full-attention reference, the official code (fixture), HF transformers."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.models.dinat import (_natten_ops, checkpoint_filter_fn, neighborhood_attention_2d,
                                 neighborhood_attention_2d_gather)
from vitlab.profiling import count_flops

from _zoo_common import assert_file_converts

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo" / "dinat"


# --- reference neighbourhood: NATTEN's C++ (natten_cpu_commons.h, natten 0.17.5), one position at a time ---------

def _window_start(index, length, kernel_size, dilation):
    nbhd = kernel_size // 2
    dilation_idx, index_pdp = index % dilation, index // dilation
    length_pdp = (length + dilation - 1) // dilation
    num_padded = length_pdp * dilation - length
    length_pdp -= 1 if dilation_idx >= dilation - num_padded else 0
    start = max(index_pdp - nbhd, 0) + (index_pdp + nbhd >= length_pdp) * (length_pdp - index_pdp - nbhd - 1)
    return start * dilation + dilation_idx


def _pb_start(index, length, kernel_size, dilation):
    nbhd = kernel_size // 2
    if dilation <= 1:
        return nbhd + (index < nbhd) * (nbhd - index) + (index + nbhd >= length) * (length - index - 1 - nbhd)
    if index - nbhd * dilation < 0:
        return kernel_size - 1 - index // dilation
    if index + nbhd * dilation >= length:
        return (length - index - 1) // dilation
    return nbhd


def _axis(length, kernel_size, dilation):
    """keys[i][t], rpb index[i][t] along one axis."""
    keys = [[_window_start(i, length, kernel_size, dilation) + t * dilation for t in range(kernel_size)]
            for i in range(length)]
    bias = [[_pb_start(i, length, kernel_size, dilation) + t for t in range(kernel_size)] for i in range(length)]
    return torch.tensor(keys), torch.tensor(bias)


def masked_full_attention(q, k, v, kernel_size, dilation, rpb, scale):
    """SDPA over all H*W keys with a boolean neighbourhood mask (and rpb as an additive bias); q (B, H, W, heads, d)."""
    B, H, W, heads, d = q.shape
    keys_h, bias_h = _axis(H, kernel_size, dilation)
    keys_w, bias_w = _axis(W, kernel_size, dilation)
    allowed = torch.zeros(H * W, H * W, dtype=torch.bool)
    bias = torch.zeros(heads, H * W, H * W)
    for i in range(H):
        for j in range(W):
            query = i * W + j
            for a in range(kernel_size):
                for b in range(kernel_size):
                    key = int(keys_h[i, a]) * W + int(keys_w[j, b])
                    assert not allowed[query, key], "a key twice in one neighbourhood"
                    allowed[query, key] = True
                    bias[:, query, key] = rpb[:, bias_h[i, a], bias_w[j, b]]
    q, k, v = (t.reshape(B, H * W, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~allowed, float("-inf")), scale=scale)
    bool_out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)  # no rpb: boolean mask
    as_image = lambda t: t.transpose(1, 2).reshape(B, H, W, heads, d)  # noqa: E731
    return as_image(out), as_image(bool_out)


@pytest.mark.parametrize("H, W, kernel_size, dilation", [
    (9, 9, 3, 1), (11, 8, 3, 2), (23, 19, 3, 3), (13, 17, 5, 2), (14, 14, 7, 2), (7, 9, 7, 1), (16, 21, 3, 5)])
def test_neighborhood_attention_equals_masked_full_attention(H, W, kernel_size, dilation):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, H, W, 2, 8) for _ in range(3))
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1)
    expected, expected_no_bias = masked_full_attention(q, k, v, kernel_size, dilation, rpb, 0.3)
    for op in (neighborhood_attention_2d, neighborhood_attention_2d_gather):
        torch.testing.assert_close(op(q, k, v, kernel_size, dilation, rpb, 0.3), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(op(q, k, v, kernel_size, dilation, None, 0.3), expected_no_bias,
                                   atol=1e-5, rtol=1e-5)


def test_neighborhood_attention_gradients_match_gather():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 13, 10, 2, 4, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    grads = []
    for op in (neighborhood_attention_2d, neighborhood_attention_2d_gather):
        out = op(q, k, v, 3, 2, rpb, 0.5)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                         (q, k, v, rpb)))
    for tiled, gathered in zip(*grads):
        torch.testing.assert_close(tiled, gathered, atol=1e-5, rtol=1e-5)


# --- the official code (fixture) ---------------------------------------------------------------------------

def _fixture():
    """(official state dict, input, official logits, vitlab kwargs of the tiny config)."""
    meta = json.loads((FIXTURES / "official_tiny.json").read_text())
    tensors = load_file(FIXTURES / "official_tiny.safetensors")
    x, expected = tensors.pop("__input__"), tensors.pop("__logits__")
    cfg = dict(meta["config"])
    cfg.pop("drop_path_rate")  # training only
    return tensors, x, expected, cfg


def test_official_tiny_fixture_parity():
    tensors, x, expected, cfg = _fixture()
    model = timm.create_model("vl_test_dinat", **cfg).eval()
    model.load_state_dict(checkpoint_filter_fn(tensors, model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
    # on CPU, backend="auto" runs the pure-PyTorch tiled op (NATTEN only on CUDA), and says so
    assert {m.last_backend for m in model.modules() if hasattr(m, "last_backend")} == {"tiled"}
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()  # identity on vitlab


def test_official_file_loads_through_timm_and_convert(tmp_path):
    tensors, x, expected, cfg = _fixture()
    path = tmp_path / "official.pth"
    torch.save({"model": tensors, "epoch": 3}, path)  # the official training checkpoint layout
    overlay = dict(file=str(path), num_classes=cfg["num_classes"])
    model = vitlab.create_model("vl_test_dinat", pretrained=True, pretrained_cfg_overlay=overlay, **cfg).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
    assert_file_converts(tmp_path, "vl_test_dinat", path, checkpoint_filter_fn, x, expected, **cfg)


def test_in_chans_1_adapts_rgb_weights(tmp_path):
    rgb = vitlab.create_model("vl_test_dinat")
    path = tmp_path / "rgb.safetensors"
    save_file(rgb.state_dict(), str(path))
    gray = vitlab.create_model("vl_test_dinat", in_chans=1, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(gray.patch_embed.proj[0].weight, rgb.patch_embed.proj[0].weight.sum(dim=1, keepdim=True))
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 10)


# --- HF transformers (its natten ops replaced by the reference above) --------------------------------------

def _heads_first(t, heads):
    """(B, heads, H, W, d) as natten expects. transformers 5.x's NeighborhoodAttention passes (B, W, H, heads, d)
    (a `.view(...).transpose(1, 2)` that replaced 4.x's `.permute(0, 3, 1, 2, 4)`): undo that here, so HF computes
    DiNAT as transformers 4.x + natten did. The test configs keep heads != H, W so the layouts cannot be confused."""
    assert not (t.shape[1] == heads and t.shape[3] == heads), "ambiguous layout: choose other sizes"
    return t if t.shape[1] == heads else t.permute(0, 3, 2, 1, 4)


def _hf_natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    query, key = _heads_first(query, rpb.shape[0]), _heads_first(key, rpb.shape[0])
    keys_h, bias_h = _axis(query.shape[2], kernel_size, dilation)
    keys_w, bias_w = _axis(query.shape[3], kernel_size, dilation)
    gathered = key[:, :, keys_h[:, None, :, None], keys_w[None, :, None, :]]  # (B, heads, H, W, k, k, d)
    scores = torch.einsum("bnxyd,bnxyijd->bnxyij", query, gathered)
    return (scores + rpb[:, bias_h[:, None, :, None], bias_w[None, :, None, :]]).flatten(-2)  # (B, heads, H, W, k*k)


def _hf_natten2dav(attn, value, kernel_size, dilation):
    value = _heads_first(value, attn.shape[1])
    keys_h, _ = _axis(value.shape[2], kernel_size, dilation)
    keys_w, _ = _axis(value.shape[3], kernel_size, dilation)
    gathered = value[:, :, keys_h[:, None, :, None], keys_w[None, :, None, :]]
    return torch.einsum("bnxyk,bnxykd->bnxyd", attn, gathered.flatten(4, 5))  # (B, heads, H, W, d)


def test_hf_converter_parity(monkeypatch):
    from transformers import DinatConfig, DinatForImageClassification
    from transformers.models.dinat import modeling_dinat

    monkeypatch.setattr(modeling_dinat, "requires_backends", lambda *args, **kwargs: None)
    monkeypatch.setattr(modeling_dinat, "natten2dqkrpb", _hf_natten2dqkrpb)
    monkeypatch.setattr(modeling_dinat, "natten2dav", _hf_natten2dav)
    torch.manual_seed(0)
    config = DinatConfig(embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], kernel_size=3,
                         dilations=[[3], [1, 2], [1], [1]], mlp_ratio=2.0, layer_scale_init_value=0.5, num_labels=7)
    hf = DinatForImageClassification(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = vitlab.models.from_transformers(hf)
    for size in ((64, 64), (56, 44)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


# --- published sizes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params", [("vl_dinat_mini", 19_984_174), ("vl_dinat_tiny", 27_901_582)])
def test_param_count_equals_official(name, params):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_mini_macs_match_paper():
    with torch.device("meta"):  # shapes are all the counter needs
        model = timm.create_model("vl_dinat_mini", backend="gather").eval()  # executes exactly NA's multiply-adds
        macs = count_flops(model, torch.randn(1, 3, 224, 224)).macs
    assert abs(macs / 2.7e9 - 1) < 0.05, macs


# --- timm contract beyond tests/models/test_models.py ---------------------------------------------------------------

def test_features_only_and_intermediates():
    model = timm.create_model("vl_test_dinat", features_only=True)
    assert model.feature_info.channels() == [32, 64, 128, 256]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    outs = model(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 128, 4, 6), (2, 256, 2, 3)]
    full = timm.create_model("vl_test_dinat").eval()
    x = torch.randn(1, 3, 64, 64)
    final, inter = full.forward_intermediates(x, indices=2)
    assert [t.shape[1] for t in inter] == [128, 256]
    torch.testing.assert_close(final, full.forward_features(x))


def test_other_input_sizes_and_in_chans():
    model = timm.create_model("vl_test_dinat", in_chans=1, num_classes=4).eval()
    for size in ((32, 32), (50, 72), (128, 128)):  # 32 px: every stage padded up to its window
        assert model(torch.randn(1, 1, *size)).shape == (1, 4)
    assert model.patch_embed.proj[0].in_channels == 1


def test_natten_backend_is_required_when_named():
    model = timm.create_model("vl_test_dinat", backend="natten").eval()
    if _natten_ops() is None:
        with pytest.raises(RuntimeError, match="NATTEN is not importable"):
            model(torch.randn(1, 3, 64, 64))
    else:
        model(torch.randn(1, 3, 64, 64))
        assert model.stages[0].blocks[0].attn.last_backend == "natten"
