"""SpectFormer: exact parameter counts, MACs against the README, parity with the official code (fixture), loaders,
other input sizes."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.cli import main
from vitlab.models.spectformer import SpectralGatingNetwork, checkpoint_filter_fn
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, meta_model

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zoo" / "spectformer"
# the official tiny configuration of the fixture (alpha = 4 and 6 heads are hard-coded in the official code)
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_spectral_blocks=4, num_heads=6, mlp_ratio=4.0,
            num_classes=10)

# exact counts of the official constructors (badripatro/SpectFormers vanilla_architecture @ b6cf487), 1000 classes;
# they equal n_parameters in the official training logs
OFFICIAL_PARAMS = {
    "vl_spectformer_tiny": 9_158_376,
    "vl_spectformer_xs": 20_028_520,
    "vl_spectformer_small": 32_449_768,
}


@pytest.fixture(scope="module")
def official():
    tensors = load_file(str(FIXTURE / "official_tiny.safetensors"))
    extras = {k: tensors.pop(k) for k in list(tensors) if k.startswith("__")}
    return tensors, extras


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert sum(p.numel() for p in meta_model(name).parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name, published", [("vl_spectformer_tiny", 1.8e9), ("vl_spectformer_xs", 4.0e9)])
def test_macs_match_readme(name, published):
    with torch.device("meta"):
        count = count_flops(meta_model(name), torch.empty(1, 3, 224, 224))
    assert abs(count.macs / published - 1) < 0.05, count.macs
    fft = sum(v for op, v in count.by_op.items() if "fft" in op)
    width = meta_model(name).embed_dim
    # 4 spectral blocks, each an rfft2 and an irfft2 over 14x14 tokens per channel at 2.5 n log2 n
    assert fft == pytest.approx(4 * 2 * 2.5 * 196 * torch.log2(torch.tensor(196.0)).item() * width, rel=1e-6)


def test_fixture_provenance():
    meta = json.loads((FIXTURE / "official_tiny.json").read_text())
    assert meta["official_commit"] == "b6cf487a0ea71eeb252d5ba0fc7410b3f5dbd256"
    assert meta["config"]["embed_dim"] == TINY["embed_dim"] and meta["config"]["depth"] == TINY["depth"]


def test_logits_match_official(official):
    state, extras = official
    model = vitlab.create_model("vl_test_spectformer", **TINY).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(extras["__input__"]), extras["__logits__"], atol=1e-4, rtol=0)


def test_other_size_matches_official_finetune_resize(official):
    """48 px: the official fine-tuning script's bicubic resize of pos_embed and complex_weight, done at load time
    (img_size=48) or at run time (dynamic_img_size=True), gives the official 48 px logits."""
    state, extras = official
    built = vitlab.create_model("vl_test_spectformer", **dict(TINY, img_size=48)).eval()
    built.load_state_dict(checkpoint_filter_fn(state, built), strict=True)
    assert built.blocks[0].filter.complex_weight.shape == (12, 7, 48, 2)
    dynamic = vitlab.create_model("vl_test_spectformer", **dict(TINY, dynamic_img_size=True)).eval()
    dynamic.load_state_dict(checkpoint_filter_fn(state, dynamic), strict=True)
    with torch.no_grad():
        for model in (built, dynamic):
            torch.testing.assert_close(model(extras["__input_48__"]), extras["__logits_48__"], atol=1e-4, rtol=0)
        assert dynamic(torch.randn(1, 3, 32, 64)).shape == (1, 10)  # non-square grid 8x16
    with pytest.raises(AssertionError):  # a fixed-size model refuses other sizes, like timm's ViT
        vitlab.create_model("vl_test_spectformer", **TINY)(torch.randn(1, 3, 48, 48))


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_spectformer"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_and_cli(official, tmp_path):
    state, extras = official
    path = tmp_path / "official.pth"
    torch.save({"model": state, "epoch": 3}, path)  # the official training checkpoint layout
    # num_classes in the overlay too: otherwise timm drops a classifier whose size differs from the cfg's
    overlay = dict(file=str(path), num_classes=TINY["num_classes"])
    model = vitlab.create_model("vl_test_spectformer", pretrained=True, pretrained_cfg_overlay=overlay, **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(extras["__input__"]), extras["__logits__"], atol=1e-4, rtol=0)
    out = tmp_path / "ckpt"
    assert main(["convert", "vl_test_spectformer", str(path), "--out", str(out), "--allow-pickle",
                 "--model-kwargs", json.dumps(TINY)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(vitlab.create_model(out)(extras["__input__"]), extras["__logits__"], atol=1e-4,
                                   rtol=0)


def test_in_chans_1_adapts_rgb_weights(tmp_path):
    rgb = vitlab.create_model("vl_test_spectformer")
    path = tmp_path / "rgb.safetensors"
    save_file(rgb.state_dict(), str(path))
    gray = vitlab.create_model("vl_test_spectformer", in_chans=1, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(gray.patch_embed.proj.weight, rgb.patch_embed.proj.weight.sum(dim=1, keepdim=True))
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 1000)


def test_intermediates_and_features_only():
    x = torch.randn(2, 3, 32, 32)
    model = vitlab.create_model("vl_test_spectformer").eval()
    final, inter = model.forward_intermediates(x, indices=[1, 3])
    assert [tuple(m.shape) for m in inter] == [(2, 48, 8, 8), (2, 48, 8, 8)]
    torch.testing.assert_close(final, model.forward_features(x))
    tokens = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert tuple(tokens[0].shape) == (2, 64, 48)
    features = vitlab.create_model("vl_test_spectformer", features_only=True, out_indices=(1, 3))
    assert [tuple(m.shape) for m in features(x)] == [(2, 48, 8, 8), (2, 48, 8, 8)]


def test_unit_filter_is_identity():
    """A filter of ones passes the tokens through unchanged (ortho rfft2 / irfft2 round trip)."""
    layer = SpectralGatingNetwork(16, h=6, w=4)
    with torch.no_grad():
        layer.complex_weight.copy_(torch.stack([torch.ones(6, 4, 16), torch.zeros(6, 4, 16)], dim=-1))
    x = torch.randn(2, 36, 16)
    torch.testing.assert_close(layer(x, (6, 6)), x, atol=1e-5, rtol=0)


def test_residual_stream_is_contiguous():
    # the transposed patch-conv output must not set the layout of every residual add (a copy in every norm)
    model = vitlab.create_model("vl_test_spectformer").eval()
    with torch.no_grad():
        tokens, grid = model._tokens(torch.randn(2, 3, 32, 32))
        assert tokens.is_contiguous() and grid == (8, 8)
        assert model.blocks[0](tokens, grid).is_contiguous() and model.blocks[-1](tokens).is_contiguous()
