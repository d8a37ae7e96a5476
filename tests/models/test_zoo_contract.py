"""The contract every vitlab model family keeps, driven by timm's registry: each `vl_*` name belongs to a family (the
`vitlab.models` module that registers it, or its own entrypoint in `vitlab.entrypoints`), carries a timm
`pretrained_cfg`, and each family's tiny variant behaves like a timm family (the classifier API, `in_chans=1` and
another input size, `features_only` where the family has feature maps, a vitlab checkpoint round trip).

Families come from `timm.list_models("vl_*")` at collection time, so a new family is checked without being listed
here; the tables below only say how a family differs from the image-classifier default, and every key must be a
registered family (`test_every_registered_name_belongs_to_a_covered_family`). Family files test what is particular
to each (official parity, parameter counts, MACs, converters).
"""
from typing import Callable

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg, model_entrypoint
from timm.models._features import FeatureGetterNet
from timm.models.vision_transformer import VisionTransformer

import vitlab

_PACKAGE, _ENTRYPOINTS = "vitlab.models.", "vitlab.entrypoints"


def _family(name: str) -> str:
    """The module below vitlab.models that registers `name`; an entrypoint in vitlab.entrypoints (a model that a unit
    above vitlab.models builds) is a family of its own, named after it; anything else is returned as its module."""
    module = model_entrypoint(name).__module__
    if module == _ENTRYPOINTS:
        return name.removeprefix("vl_")
    return module.removeprefix(_PACKAGE) if module.startswith(_PACKAGE) else module


def _registry() -> dict[str, list[str]]:
    """{family: its registered names}, from timm's registry."""
    families: dict[str, list[str]] = {}
    for name in timm.list_models("vl_*"):
        families.setdefault(_family(name), []).append(name)
    return families


REGISTRY = _registry()
FAMILIES = sorted(f for f in REGISTRY if "." not in f)  # a dotted "family" is a module outside vitlab: an error

# Families whose tiny variant is not `vl_test_<family>`: (name, constructor kwargs).
TINY = {
    "vit_fmnist": ("vl_test_vit", {}),  # the library's own hybrid ViT (vl_vit_fmnist); its tiny one predates the rule
    # composed around a registered base (below): the tiny base, with its own widths per block
    "pruned_vit": ("vl_pruned_vit", {"base": "vl_test_vit", "num_heads": (1, 2), "head_dim": (8, 4),
                                     "mlp_hidden": (16, 24)}),
    "dense": ("vl_dense", {"backbone": "vl_test_vit", "img_size": 32}),
}
# Composed families: built around another registered model, whose pretrained_cfg (or the input size they are built
# for) the instance takes, so their registry entries have none; the instance's record names the composed family
# (model.vitlab.spec), so it saves as a vitlab checkpoint however it was built (test_composed_models_*).
COMPOSED = {"dense", "pruned_vit"}
# Dense prediction: `image -> {"sem_logits" | "pred_logits", ...}` (docs/dense.md), no pooled classifier.
NOT_CLASSIFIERS = {"dense"}
# Frame predictors (num_classes=0 in their cfgs): the head predicts the next frames, and reset_classifier(0) goes
# back to predicting frames instead of returning pooled features.
FRAME_PREDICTORS = {"convlstm", "predformer"}
# No 2-D conv takes the pixels, so timm cannot adapt `first_conv` to another in_chans (first_conv=None).
NO_FIRST_CONV = {
    "t2t_vit": "the soft split is an nn.Unfold followed by a Linear",
    "vivit": "the tubelet embedding is a Conv3d",
    "eventtransact": "the tubelet embedding is a Conv3d (ViViT's)",
}
# Families that refuse features_only=True (test_families_without_features_only_say_so checks that they do), and why.
NO_FEATURES_ONLY = {
    # clip models: their tokens are spatio-temporal; timm's features_only builds 2-D maps of images
    "deform3d": "clip model", "eventtransact": "clip model", "paab": "clip model", "stprivacy": "clip model",
    "uniformerv2": "clip model", "videomae": "clip model", "vivit": "clip model",
    "convlstm": "frame predictor", "predformer": "frame predictor",
    "vim": "VisionMamba has no forward_intermediates yet",
    "resnas": "ResNAS has no forward_intermediates yet",
    "dense": "a backbone with a head already: the backbone is what gives the feature maps",
}
# An input size other than the default that the architecture allows. Families in FIXED_SIZE fix their grid (position
# embeddings, global filters) at build time and are built for it (img_size=...); square-only ones get an int.
OTHER_SIZE = {
    "activator": (48, 64), "channelvit": (64, 48), "convlstm": (48, 64), "crossformer": (96, 64),
    "crossformer_pp": (96, 64), "cvt": (40, 56), "deform3d": (48, 64), "dinat": (96, 64), "dualtoken_vit": (96, 64),
    "eventtransact": (48, 64), "favit": (96, 64), "fcaformer": (96, 64), "fmvit": (96, 64), "ggem": (48, 64),
    "gmm_vit": (48, 64), "hornet": (96, 64), "hyena_nd": (48, 64), "maformer": (72, 56), "msvmamba": (88, 56),
    "paab": (48, 64), "predformer": (48, 64), "pruned_vit": (24, 32), "pvt": (96, 64), "resnas": (24, 24),
    "rmt": (96, 64), "sgformer": (112, 56), "soft": (96, 64), "spectformer": (48, 64), "sret": (96, 64),
    "stprivacy": (48, 64), "stvit": (84, 60), "svt": (96, 64), "t2t_vit": (96, 64), "tic": (96, 64),
    "turbovit": (96, 64), "uniformer": (96, 64), "uniformer_light": (96, 64), "uniformerv2": (48, 48),
    "videomae": (48, 64), "vim": (32, 48), "vir": (48, 64), "vit_fmnist": (24, 32), "vivit": (48, 64),
}
FIXED_SIZE = {"spectformer", "t2t_vit", "gmm_vit", "fcaformer", "ggem", "activator", "svt", "vim", "resnas",
              "vit_fmnist", "pruned_vit", "convlstm", "deform3d", "eventtransact", "paab", "predformer", "stprivacy",
              "uniformerv2", "videomae", "vivit"}
# Families whose tiny model is a timm VisionTransformer (test_classifier_api checks the list): they serve features_only
# as timm's ViTs do (test_vit_families_serve_features_as_timm_vits).
VIT_FAMILIES = {"channelvit", "ggem", "gmm_vit", "pruned_vit", "t2t_vit", "vit_fmnist"}
# Gaps this contract finds in the model files, as strict xfails: fixing one makes its test pass (and fail as XPASS),
# then its entry goes. {(test, family): what is wrong}
KNOWN_GAPS: dict[tuple[str, str], str] = {}
TABLES = {"TINY": TINY, "COMPOSED": COMPOSED, "NOT_CLASSIFIERS": NOT_CLASSIFIERS, "FRAME_PREDICTORS": FRAME_PREDICTORS,
          "NO_FIRST_CONV": NO_FIRST_CONV, "NO_FEATURES_ONLY": NO_FEATURES_ONLY, "OTHER_SIZE": OTHER_SIZE,
          "FIXED_SIZE": FIXED_SIZE, "VIT_FAMILIES": VIT_FAMILIES, "KNOWN_GAPS": {f for _, f in KNOWN_GAPS}}


def _params(test: str, families) -> list:
    """`families`, sorted, with KNOWN_GAPS[test, family] as a strict xfail."""
    return [pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[test, f]))
            if (test, f) in KNOWN_GAPS else f for f in sorted(families)]


def _tiny(family: str) -> tuple[str, dict]:
    return TINY.get(family, (f"vl_test_{family}", {}))


def _model(family: str, build: Callable[..., nn.Module] = timm.create_model, **kwargs) -> nn.Module:
    """The family's tiny model in eval mode, seeded, with 7 classes (a classifier) and `kwargs`."""
    name, tiny_kwargs = _tiny(family)
    torch.manual_seed(0)
    defaults = {} if family in NOT_CLASSIFIERS else {"num_classes": 7}
    return build(name, **{**tiny_kwargs, **defaults, **kwargs}).eval()


def _input(model: nn.Module, batch: int = 2, size: tuple[int, int] | None = None,
           in_chans: int | None = None) -> torch.Tensor:
    """Images (B, C, H, W) of the model's pretrained_cfg input size, or clips (B, C, T, H, W) of its num_frames."""
    chans, height, width = model.pretrained_cfg["input_size"]
    frames = getattr(model, "num_frames", None)
    return torch.randn(batch, in_chans or chans, *((frames,) if frames else ()), *(size or (height, width)))


def _names(field) -> tuple[str, ...]:
    return (field,) if isinstance(field, str) else tuple(field)


def test_every_registered_name_belongs_to_a_covered_family():
    outside = {name: family for family, names in REGISTRY.items() if family not in FAMILIES for name in names}
    assert not outside, f"registered outside {_PACKAGE}* and {_ENTRYPOINTS} (one family per module): {outside}"
    untested = {f: REGISTRY[f] for f in FAMILIES if _tiny(f)[0] not in REGISTRY[f]}
    assert not untested, f"families without a vl_test_<family> variant (or a TINY entry): {untested}"
    missing = sorted(set(FAMILIES) - set(OTHER_SIZE) - NOT_CLASSIFIERS)
    assert not missing, f"families with no OTHER_SIZE entry (an input size their architecture allows): {missing}"
    for table, keys in TABLES.items():
        stale = sorted(set(keys) - set(FAMILIES))
        assert not stale, f"{table} names families the registry does not have: {stale}"


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_cfgs_carry_timm_fields(family):
    # read from the registry: the full-size models are not built
    for name in REGISTRY[family]:
        cfg = get_pretrained_cfg(name)
        if family in COMPOSED:
            assert cfg is None, f"{name} has a pretrained_cfg: take {family} out of COMPOSED"
            continue
        assert cfg is not None, f"{name} has no pretrained_cfg (generate_default_cfgs in {_PACKAGE}{family})"
        chans, height, width = cfg.input_size
        assert isinstance(cfg.num_classes, int) and cfg.num_classes >= 0, name
        assert min(chans, height, width) > 0 and len(cfg.mean) == len(cfg.std) == chans, name
        assert all(s > 0 for s in cfg.std), name
        assert cfg.classifier and all(isinstance(c, str) and c for c in _names(cfg.classifier)), name
        if family in NO_FIRST_CONV:
            assert cfg.first_conv is None, f"{name} has first_conv {cfg.first_conv}: take {family} out of NO_FIRST_CONV"
        else:
            assert cfg.first_conv and all(isinstance(c, str) and c for c in _names(cfg.first_conv)), name
    predicts_frames = all(get_pretrained_cfg(n) and get_pretrained_cfg(n).num_classes == 0 for n in REGISTRY[family])
    assert predicts_frames == (family in FRAME_PREDICTORS), family


@pytest.mark.parametrize("family", _params("test_pretrained_cfg_names_modules_of_the_tiny_model", FAMILIES))
def test_pretrained_cfg_names_modules_of_the_tiny_model(family):
    model = _model(family)
    cfg = model.pretrained_cfg
    assert len(cfg["input_size"]) == 3 and cfg["num_classes"] >= 0
    if family in COMPOSED:
        return  # the instance carries the cfg of what it was composed around; its module names are the base's
    for name in _names(cfg["classifier"]):
        assert isinstance(model.get_submodule(name), nn.Module)
    assert model.get_classifier() is model.get_submodule(_names(cfg["classifier"])[0])
    for name in _names(cfg["first_conv"] or ()):
        assert isinstance(model.get_submodule(name).weight, nn.Parameter), name


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - NOT_CLASSIFIERS))
def test_classifier_api(family):
    model = _model(family)
    assert isinstance(model, VisionTransformer) == (family in VIT_FAMILIES), f"VIT_FAMILIES lacks or names {family}"
    x = _input(model)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 7) and torch.isfinite(logits).all()
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), logits)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        assert model.get_classifier() is not None
        model.reset_classifier(0)
        if family in FRAME_PREDICTORS:
            assert model(x).shape == x.shape  # back to predicting the clip's frames
        else:
            torch.testing.assert_close(model(x), pooled)  # no head: forward returns the pooled features
        model.reset_classifier(5)
        assert model.get_classifier().out_features == 5 and model.forward_head(features).shape == (2, 5)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - NOT_CLASSIFIERS))
def test_one_channel_and_another_input_size(family):
    h, w = OTHER_SIZE[family]
    size = {"img_size": h if h == w else (h, w)} if family in FIXED_SIZE else {}
    model = _model(family, in_chans=1, **size)
    logits = model(_input(model, 1, (h, w), in_chans=1))
    assert logits.shape == (1, 7)
    logits.sum().backward()  # gradients flow at that size too
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(NO_FEATURES_ONLY)))
def test_features_only_matches_forward_intermediates(family):
    model = _model(family)
    x = _input(model)
    levels = tuple(range(len(model.feature_info)))  # every stage (every block of a plain ViT)
    backbone = _model(family, features_only=True, out_indices=levels)  # the same seed, so the same weights
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=list(levels), intermediates_only=True)
        feats = backbone(x)
    assert len(feats) == len(maps) >= 2
    assert all(f.ndim == 4 and f.shape[0] == 2 for f in feats)
    assert backbone.feature_info.channels() == [f.shape[1] for f in feats]
    for got, want in zip(feats, maps):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", _params("test_families_without_features_only_say_so", NO_FEATURES_ONLY))
def test_families_without_features_only_say_so(family):
    # a family that learns features_only must leave NO_FEATURES_ONLY and be tested above
    name, kwargs = _tiny(family)
    with pytest.raises((AttributeError, AssertionError, IndexError, TypeError, ValueError)):
        timm.create_model(name, **kwargs, features_only=True)


@pytest.mark.parametrize("family", _params("test_checkpoint_round_trip", FAMILIES))
def test_checkpoint_round_trip(family, tmp_path):
    model = _model(family, in_chans=1)  # timm.create_model's instance: composed families' too
    x = _input(model, in_chans=1)
    vitlab.save_checkpoint(model, tmp_path / family)
    again = vitlab.create_model(tmp_path / family).eval()
    assert type(again) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize("family", sorted(COMPOSED))
def test_composed_models_save_the_same_checkpoint_built_by_timm_or_vitlab(family, tmp_path):
    # the instance's pretrained_cfg is its base's, so only the record says which family to rebuild: both builders'
    # checkpoints name the composed family and rebuild the same model (the same seed, so the same weights)
    name = _tiny(family)[0]
    models = {"timm": _model(family, in_chans=1), "vitlab": _model(family, vitlab.create_model, in_chans=1)}
    x = _input(models["timm"], in_chans=1)
    with torch.no_grad():
        want = models["vitlab"](x)
        for build, model in models.items():
            assert model.vitlab.spec["name"] == name, build
            vitlab.save_checkpoint(model, tmp_path / build)
            assert vitlab.load_config(tmp_path / build)["model"]["name"] == name, build
            again = vitlab.create_model(tmp_path / build).eval()
            assert type(again) is type(model), build
            torch.testing.assert_close(again(x), want)


@pytest.mark.parametrize("family", _params("test_vit_families_serve_features_as_timm_vits", VIT_FAMILIES))
def test_vit_families_serve_features_as_timm_vits(family):
    # timm's VisionTransformer serves features_only through forward_intermediates (feature_cls="getter") and, with
    # no out_indices, its last three blocks: vitlab's ViT families (and the ViTs composed into pruned_vit) do the same
    model = _model(family)
    backbone = _model(family, features_only=True)
    assert isinstance(backbone, FeatureGetterNet)
    assert len(backbone.feature_info) == min(3, len(model.blocks)) == len(backbone(_input(model)))


def test_dense_model_predicts_per_pixel_classes():
    model = _model("dense")
    x = _input(model)
    with torch.no_grad():
        out = model(x)
    assert out["sem_logits"].shape[:2] == (2, model.num_classes) and out["sem_logits"].isfinite().all()
    assert out["sem_logits"].shape[2:] == (x.shape[-2] // 4, x.shape[-1] // 4)  # Semantic FPN's stride-4 output


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
