"""What each family records so a checkpoint rebuilds the model: its constructor kwargs, minus timm's plumbing."""
__all__ = ["BUILDER_KWARGS", "arch_kwargs"]

# keys timm's create_model / build_model_with_cfg pass along that describe loading or wrapping, not the architecture
BUILDER_KWARGS = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "out_indices",
                            "feature_cfg", "feature_cls"})


def arch_kwargs(kwargs: dict, exclude=()) -> dict:
    """The architecture part of `kwargs` (also leaving out `exclude`: e.g. layer classes, which JSON cannot hold)."""
    return {k: v for k, v in kwargs.items() if k not in BUILDER_KWARGS and k not in exclude}
