"""The model contract every zoo family keeps (so techniques and verbs treat every family alike), checked the same way
on each family's `vl_test_*` model.

Family files test what is particular to each (official parity, parameter counts, MACs, converters); this file
checks the timm API a user relies on whatever the family: the classifier API, `in_chans=1`, input sizes other than
the default, `features_only` / `forward_intermediates` for the hierarchical ones, and a vitlab checkpoint round trip.
"""
import pytest
import timm
import torch

import vitlab

# family -> (its vl_test model, an input size other than the default that the architecture allows)
# SpectFormer's global filters and T2T-ViT's position embedding are sized to the grid at build time: those two are
# built for the other size (img_size=...); the others take it as it comes.
FIXED_SIZE = {"spectformer", "t2t_vit", "gmm_vit", "fcaformer", "ggem", "activator", "svt"}
FAMILIES = {
    "cvt": ("vl_test_cvt", (40, 56)),
    "pvt": ("vl_test_pvt", (96, 64)),
    "dinat": ("vl_test_dinat", (96, 64)),
    "t2t_vit": ("vl_test_t2t_vit", (96, 64)),
    "hornet": ("vl_test_hornet", (96, 64)),
    "uniformer": ("vl_test_uniformer", (96, 64)),
    "crossformer": ("vl_test_crossformer", (96, 64)),
    "rmt": ("vl_test_rmt", (96, 64)),
    "spectformer": ("vl_test_spectformer", (48, 64)),
    "sret": ("vl_test_sret", (96, 64)),
    "channelvit": ("vl_test_channelvit", (64, 48)),
    "gmm_vit": ("vl_test_gmm_vit", (48, 64)),
    "ggem": ("vl_test_ggem", (48, 64)),
    "fcaformer": ("vl_test_fcaformer", (96, 64)),
    "favit": ("vl_test_favit", (96, 64)),
    "vir": ("vl_test_vir", (48, 64)),
    "soft": ("vl_test_soft", (96, 64)),
    "activator": ("vl_test_activator", (48, 64)),
    "hyena_nd": ("vl_test_hyena_nd", (48, 64)),
    "svt": ("vl_test_svt", (96, 64)),
    "sgformer": ("vl_test_sgformer", (112, 56)),
    "msvmamba": ("vl_test_msvmamba", (88, 56)),
    "maformer": ("vl_test_maformer", (72, 56)),
    "fmvit": ("vl_test_fmvit", (96, 64)),
    "dualtoken_vit": ("vl_test_dualtoken_vit", (96, 64)),
    "turbovit": ("vl_test_turbovit", (96, 64)),
    "tic": ("vl_test_tic", (96, 64)),
    "uniformer_light": ("vl_test_uniformer_light", (96, 64)),
    "crossformer_pp": ("vl_test_crossformer_pp", (96, 64)),
    "stvit": ("vl_test_stvit", (84, 60)),
}
HIERARCHICAL = {"cvt", "pvt", "dinat", "hornet", "uniformer", "crossformer", "rmt", "sret", "fcaformer", "favit",
                "soft", "svt", "sgformer", "msvmamba", "maformer", "fmvit",
                "dualtoken_vit", "turbovit", "tic", "uniformer_light", "crossformer_pp", "stvit"}


def _model(family, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(FAMILIES[family][0], num_classes=7, **kwargs).eval()


def _default_input(model, batch=2):
    return torch.randn(batch, *model.pretrained_cfg["input_size"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_classifier_api(family):
    model = _model(family)
    x = _default_input(model)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 7) and torch.isfinite(logits).all()
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        assert model.get_classifier() is not None
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)  # no head: forward returns the pooled features
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_channel_and_another_input_size(family):
    h, w = FAMILIES[family][1]
    model = _model(family, in_chans=1, **({"img_size": (h, w)} if family in FIXED_SIZE else {}))
    with torch.no_grad():
        assert model(torch.randn(1, 1, h, w)).shape == (1, 7)
    assert model(torch.randn(2, 1, h, w)).sum().backward() is None  # gradients flow at that size too
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", sorted(HIERARCHICAL))
def test_features_only_matches_forward_intermediates(family):
    model = _model(family)
    x = _default_input(model)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        torch.manual_seed(0)  # the same initial weights as _model's
        feats = timm.create_model(FAMILIES[family][0], num_classes=7, features_only=True).eval()(x)
    assert len(feats) == len(maps) >= 2
    assert [f.shape for f in feats] == [m.shape for m in maps]
    assert all(f.ndim == 4 and f.shape[0] == 2 for f in feats)
    backbone = timm.create_model(FAMILIES[family][0], features_only=True)
    assert backbone.feature_info.channels() == [f.shape[1] for f in feats]
    for got, want in zip(feats, maps):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_round_trip(family, tmp_path):
    model = _model(family, in_chans=1)
    x = torch.randn(2, 1, *model.pretrained_cfg["input_size"][1:])
    vitlab.save_checkpoint(model, tmp_path / family)
    again = vitlab.create_model(tmp_path / family).eval()
    assert type(again) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize("name", ["vl_test_crossformer", "vl_test_dinat"])
def test_size_caches_survive_a_forward_on_the_meta_device(name):
    # the cached index / mask tensors are built on the CPU even under torch.device("meta") (parameter counting
    # builds models there): a meta tensor in the cache broke every later real forward of that size
    from vitlab.models.crossformer import _relative_index
    from vitlab.models.dinat import _axis_tiles, _tiles_2d

    for cached in (_relative_index, _axis_tiles, _tiles_2d):
        cached.cache_clear()
    with torch.device("meta"):
        timm.create_model(name, num_classes=7)(torch.randn(1, 3, 64, 64))
    assert timm.create_model(name, num_classes=7).eval()(torch.randn(1, 3, 64, 64)).isfinite().all()
