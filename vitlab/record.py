"""What vitlab knows about a model it built, loaded or changed: one typed, frozen record, `model.vitlab`.

Every fact a verb needs later (how to rebuild the model, the techniques applied so far, the checkpoint it came from,
what pruning or quantization decided) lives in one `ModelRecord` instead of loose attributes, so a reader finds them
in one place and a typo is an error, not a silent `None`:

    >>> model = vitlab.create_model("vl_test_vit")
    >>> model.vitlab.spec
    {'name': 'vl_test_vit', 'kwargs': {}}

The record is frozen: code changes it with `update_record(model, field=value)`, which swaps in a new record. It is
not saved as such; checkpoints write what it holds into config.json (vitlab.checkpoint) and loading rebuilds it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["ModelRecord", "record", "update_record"]

ATTR = "vitlab"


@dataclass(frozen=True)
class ModelRecord:
    """The facts vitlab keeps on a model. Every field is optional; an untouched timm model has the empty record.

    spec: {"name", "kwargs"} that rebuild the model (set by `vitlab.create_model`, and by the composed families'
        entrypoints `vl_pruned_vit` and `vl_dense` when timm builds them).
    arch: every constructor kwarg of a vitlab family, so a checkpoint survives changed defaults.
    techniques: the technique configs applied so far, in order.
    checkpoint: {"path", "config"} of the checkpoint folder the model was loaded from.
    dense: a dense model's task, head and backbone (vitlab.dense).
    prune: the summary of what structured pruning removed.
    resized: the module resizes of a model pruned through the dependency graph (rebuilt on load).
    lpvit: LPViT's per-layer pruned fractions, reached sparsity and beta.
    quant_config: the post-training quantization config the model was prepared with.
    calibration: how many images calibrated it ({"images": n}).
    smoothing: MPTQ-ViT's chosen smoothing factor per layer.
    repq: RepQ-ViT's reparameterized layers, each with the mean |log r| of its channel rescaling.
    bit_allocation / bit_sensitivity: MPTQ-ViT's mixed-precision bits per layer and the sensitivities behind them.
    """

    spec: Mapping[str, Any] | None = None
    arch: Mapping[str, Any] | None = None
    techniques: tuple = ()
    checkpoint: Mapping[str, Any] | None = None
    dense: Mapping[str, Any] | None = None
    prune: Mapping[str, Any] | None = None
    resized: Mapping[str, Any] | None = None
    lpvit: Mapping[str, Any] | None = None
    quant_config: Any = None
    calibration: Mapping[str, Any] | None = None
    smoothing: Mapping[str, float] | None = None
    repq: Mapping[str, float] | None = None
    bit_allocation: Mapping[str, int] | None = None
    bit_sensitivity: Mapping[str, Any] | None = field(default=None, repr=False)

    @property
    def config(self) -> dict:
        """The loaded checkpoint's config.json ({} for a model not loaded from a checkpoint)."""
        return dict((self.checkpoint or {}).get("config") or {})


_EMPTY = ModelRecord()


def record(obj: Any) -> ModelRecord:
    """`obj.vitlab`, or the empty record for a model (or runner) vitlab has not touched."""
    found = getattr(obj, ATTR, None)
    return found if isinstance(found, ModelRecord) else _EMPTY


def update_record(obj: Any, **changes: Any) -> ModelRecord:
    """Replace fields of `obj`'s record (`update_record(model, prune=summary)`); returns the new record.

    Unknown field names raise TypeError. Set with `object.__setattr__`, so it works on any object with a __dict__
    (an nn.Module keeps the record as a plain attribute, outside its modules and buffers).
    """
    new = dataclasses.replace(record(obj), **changes)
    object.__setattr__(obj, ATTR, new)
    return new
