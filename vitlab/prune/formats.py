"""How checkpoints of pruned models load: a model pruned through the dependency graph records the shapes it was left
with under config.json's "model.resized" (`vitlab.checkpoint.model_spec`); `resize_` re-shapes the freshly built
base model to them before its weights load. Registered with `vitlab.checkpoint` so that it never imports prune."""
from ..checkpoint import register_model_layout
from .graph import resize_

register_model_layout("resized", resize_)
