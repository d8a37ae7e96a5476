"""timm entrypoints for models that units above `vitlab.models` build, registered when `import vitlab` runs and
importing their unit only when called, so `import vitlab` stays light.

`vl_dense`: a dense-prediction model (a backbone with stage features + a registered head, vitlab.dense), so
`vitlab.create_model(CHECKPOINT)` rebuilds the models `vitlab train --task ...` saves. Its kwargs are what
`vitlab.dense.build_dense_model` takes; a checkpoint's config.json records them.
"""
from typing import Any

import torch.nn as nn
from timm.models import register_model

from .record import record, update_record

__all__ = ["vl_dense"]


@register_model
def vl_dense(pretrained: bool = False, backbone: str = "vl_vit_fmnist", head: str = "semantic-fpn",
             task: str = "semantic", num_classes: int = 11, in_chans: int = 1, img_size: int = 64,
             head_options: dict[str, Any] | None = None, backbone_kwargs: dict[str, Any] | None = None,
             pretrained_cfg_overlay: dict | None = None, **timm_kwargs) -> nn.Module:
    """Backbone + head for a dense task (default: vl_vit_fmnist with Semantic FPN, 11 classes at 64 px).

    The record names this entrypoint with the kwargs `vitlab.dense` records (the backbone's architecture in place of
    a checkpoint folder it starts from), so an instance built by `timm.create_model` saves as a checkpoint that
    `vitlab.create_model(DIR)` rebuilds; `vitlab.create_model` replaces that spec with its own name and kwargs.
    """
    from .dense.heads import build_dense_model   # at call time: vitlab.dense loads the contract and profiling

    unknown = sorted(set(timm_kwargs) - {"pretrained_cfg", "cache_dir"})   # what timm.create_model adds
    if unknown:
        raise TypeError(f"vl_dense() got an unexpected keyword argument {unknown[0]!r}")
    if pretrained:
        raise ValueError("vl_dense has no pretrained weights: load a checkpoint folder with vitlab.create_model(DIR)")
    model = build_dense_model(backbone, head, task, num_classes, in_chans=in_chans, img_size=img_size,
                              head_options=head_options, backbone_kwargs=backbone_kwargs)
    if pretrained_cfg_overlay:
        model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg_overlay}
    update_record(model, spec={"name": "vl_dense", "kwargs": dict(record(model).dense)})
    return model
