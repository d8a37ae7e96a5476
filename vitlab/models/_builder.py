"""Shared registry plumbing for vitlab's model families: pretrained configs, the timm builder call, and what each
family records so a checkpoint rebuilds the model (its constructor kwargs, minus timm's plumbing)."""
import functools

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg

from ..record import update_record

__all__ = ["BUILDER_KWARGS", "arch_kwargs", "as_lists", "build_vitlab_model", "imagenet_cfg"]

# keys timm's create_model / build_model_with_cfg pass along that describe loading or wrapping, not the architecture
BUILDER_KWARGS = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "out_indices",
                            "feature_cfg", "feature_cls"})


def arch_kwargs(kwargs: dict, exclude=()) -> dict:
    """The architecture part of `kwargs` (also leaving out `exclude`: e.g. layer classes, which JSON cannot hold)."""
    return {k: v for k, v in kwargs.items() if k not in BUILDER_KWARGS and k not in exclude}


def as_lists(value):
    """Nested tuples -> nested lists, so a recorded architecture equals its JSON round trip."""
    return [as_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def imagenet_cfg(**kwargs) -> dict:
    """A timm pretrained config for an ImageNet-1k model at 224 px; `kwargs` override or add fields."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "classifier": "head",
        **kwargs,
    }


def build_vitlab_model(model_cls, variant: str, pretrained: bool, *, filter_fn=None, default_out_indices=None,
                       feature_cfg: dict | None = None, exclude=(), **kwargs):
    """`timm.models.build_model_with_cfg` plus `model.vitlab.arch` (every constructor kwarg, so checkpoints do not
    depend on a family file's defaults).

    Families with `forward_intermediates` pass `default_out_indices` (e.g. every stage): `features_only` then serves
    those outputs unless the caller gives `out_indices`. `exclude` names kwargs JSON cannot hold (layer classes).
    """
    arch = {k: as_lists(v) for k, v in arch_kwargs(kwargs, exclude=exclude).items()}
    if feature_cfg is None and default_out_indices is not None:
        feature_cfg = dict(out_indices=kwargs.pop("out_indices", default_out_indices), feature_cls="getter")
    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                 feature_cfg=feature_cfg, **kwargs)
    update_record(model, arch=arch)
    return model


def cpu_cached(maxsize: int):
    """`functools.lru_cache` for functions of sizes that build index / mask tensors: the body runs on the CPU
    whatever the default device is (under `torch.device("meta")`, as when parameters are counted on the meta device,
    a cached meta tensor would break every later real forward); callers move the results to their input's device."""
    def wrap(fn):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def cached(*args):
            with torch.device("cpu"):
                return fn(*args)
        return cached
    return wrap
