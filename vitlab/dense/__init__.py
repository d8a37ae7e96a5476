"""Dense prediction on ViT backbones: stage-feature backbones, a head registry, the dense engine.

    from vitlab.dense import Backbone, build_dense_model
    model = build_dense_model("vl_vit_fmnist", "semantic-fpn", task="semantic", num_classes=11)
    model(images)   # {"sem_logits": [B, 11, 16, 16]}

Heads register in `vitlab.dense.heads` (`register_head` / `register_model_head`); data in `vitlab.data.scenes`;
matching, criteria and inference in `vitlab.dense.matching`, metrics in `vitlab.dense.metrics`; training,
evaluation and checkpoints in `vitlab.dense.engine` (`vitlab train --task ... --head ...`); docs/dense.md.
"""
from . import apply  # noqa: F401  (registers the DenseModel contract adapter and its quant / prune handlers)
from .backbone import Backbone, BackboneError, SimpleFeaturePyramid
from .heads import (TASKS, DenseModel, HeadEntry, HeadError, build_dense_model, format_head, get_head, head_names,
                    parse_head, register_head, register_model_head)

__all__ = [
    "TASKS", "Backbone", "BackboneError", "SimpleFeaturePyramid", "DenseModel", "HeadEntry", "HeadError",
    "build_dense_model", "format_head", "get_head", "head_names", "parse_head", "register_head",
    "register_model_head",
]
