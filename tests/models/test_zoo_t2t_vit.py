"""T2T-ViT: parity with the official code (fixture), exact parameter counts, MACs, sizes, in_chans, features."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoint import load_weights
from vitlab.models.listing import count_params_meta
from vitlab.models.t2t_vit import T2TViT, checkpoint_filter_fn, sinusoid_pos_embed, soft_split_sizes
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zoo" / "t2t_vit"

# sum(p.numel() for p in model.parameters()) of the official constructors (commit 0f63dc9), 1000 classes
OFFICIAL_PARAMS = {
    "vl_t2t_vit_7": 4_310_222,
    "vl_t2t_vit_10": 5_889_230,
    "vl_t2t_vit_12": 6_941_902,
    "vl_t2t_vit_14": 21_545_550,
    "vl_t2t_vit_19": 39_177_422,
    "vl_t2t_vit_24": 64_105_934,
}


def _official_fixture():
    tensors = load_file(FIXTURE / "official_tiny.safetensors")
    meta = json.loads((FIXTURE / "official_tiny.json").read_text())
    extras = {k: tensors.pop(k) for k in ("__input__", "__logits__", "__logits_qk_scale__")}
    return tensors, meta, extras


def _test_model(**kwargs) -> T2TViT:
    return vitlab.create_model("vl_test_t2t_vit", **kwargs).eval()


@pytest.mark.parametrize("qk_scale", [None, 48 ** -0.5])
def test_matches_official_code(qk_scale):
    official, meta, extras = _official_fixture()
    model = _test_model(**meta["vitlab_config"], qk_scale=qk_scale)
    model.load_state_dict(checkpoint_filter_fn(official, model))
    expected = extras["__logits__"] if qk_scale is None else extras["__logits_qk_scale__"]
    with torch.no_grad():
        torch.testing.assert_close(model(extras["__input__"]), expected, atol=1e-4, rtol=0)


def test_position_embedding_is_the_official_sinusoid():
    official, meta, _ = _official_fixture()
    model = _test_model(**meta["vitlab_config"])
    assert torch.equal(model.pos_embed, official["pos_embed"])  # same table, bit for bit
    assert not model.pos_embed.requires_grad and not model.patch_embed.attention1.w.requires_grad


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(_test_model(), checkpoint_filter_fn)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


def test_trainable_parameter_count_t2t_vit_7():
    with torch.device("meta"):
        model = timm.create_model("vl_t2t_vit_7")
    # the sinusoidal pos_embed (197 x 256) and the two Performer matrices (32 x 64) are frozen, as in the official code
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4_255_694


def test_macs_t2t_vit_7_at_224():
    model = vitlab.create_model("vl_t2t_vit_7").eval()
    macs = count_flops(model, torch.randn(1, 3, 224, 224)).macs
    assert macs == pytest.approx(1_146_863_616, rel=1e-3)  # the same counter on the official model
    assert macs == pytest.approx(1.1e9, rel=0.05)  # README "1.1G MACs"


def test_token_grid_follows_soft_splits():
    assert soft_split_sizes(224) == (56, 28, 14)
    model = _test_model(img_size=96)
    assert model.patch_embed.grid_size == (6, 6) and model.pos_embed.shape == (1, 37, 48)
    # a model built at another size gets the official constructor's table for its own length
    assert torch.equal(model.pos_embed, sinusoid_pos_embed(37, 48))
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 10)


def test_dynamic_img_size_non_square():
    model = _test_model(dynamic_img_size=True)
    x = torch.randn(2, 3, 96, 128)
    assert model(x).shape == (2, 10)
    _, intermediates = model.forward_intermediates(x, indices=2)
    assert [tuple(t.shape) for t in intermediates] == [(2, 48, 6, 8)] * 2
    # at the default size the dynamic model computes what the fixed-size one does
    fixed = _test_model()
    fixed.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fixed(x))


def test_wrong_size_without_dynamic_img_size_says_what_to_do():
    with pytest.raises(ValueError, match="dynamic_img_size"):
        _test_model()(torch.randn(1, 3, 96, 96))


def test_pos_embed_resampled_from_another_size():
    official, meta, extras = _official_fixture()
    model = _test_model(img_size=96)
    state = checkpoint_filter_fn(official, model)
    assert state["pos_embed"].shape == (1, 37, 48)
    model.load_state_dict(state)
    assert torch.isfinite(model(torch.randn(1, 3, 96, 96))).all()


def test_in_chans_1_from_rgb_weights(tmp_path):
    torch.manual_seed(0)
    rgb = _test_model()
    with torch.no_grad():
        for p in rgb.patch_embed.attention1.norm1.parameters():  # a non-trivial LayerNorm affine to fold
            p.add_(torch.randn_like(p) * 0.1)
    gray = _test_model(in_chans=1)
    gray.load_state_dict(checkpoint_filter_fn(rgb.state_dict(), gray))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)
    # timm's loader path: pretrained=True with a local file
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, tmp_path / "rgb.safetensors")
    loaded = vitlab.create_model("vl_test_t2t_vit", pretrained=True, in_chans=1,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "rgb.safetensors"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gray(x))


def test_features_only():
    model = timm.create_model("vl_test_t2t_vit", features_only=True, out_indices=(0, 1))
    features = model(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 48, 4, 4)] * 2
    assert model.feature_info.reduction() == [16, 16]


def test_load_weights_reads_an_official_training_checkpoint(tmp_path):
    # what `vitlab convert vl_t2t_vit_7 official.pth --allow-pickle` runs: torch.load(weights_only=True), the filter
    official, meta, extras = _official_fixture()
    wrapped = {"epoch": 300, "state_dict": {f"module.{k}": v for k, v in official.items()}}
    torch.save(wrapped, tmp_path / "official.pth")
    model = _test_model(**meta["vitlab_config"])
    load_weights(model, tmp_path / "official.pth", allow_pickle=True, filter_fn=checkpoint_filter_fn)
    with torch.no_grad():
        torch.testing.assert_close(model(extras["__input__"]), extras["__logits__"], atol=1e-4, rtol=0)
