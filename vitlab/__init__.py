"""vitlab: Vision Transformers that are accurate and fast on the hardware you have.

    import vitlab
    model = vitlab.create_model("vl_vit_fmnist")                 # any timm / vitlab name, or a checkpoint folder
    vitlab.apply_(model, vitlab.parse_apply(["tome:r=4"]))       # techniques, in place
    rows = vitlab.measure("checkpoints/fashion-mnist-reference", data="fashion-mnist")
"""
__version__ = "0.1.0"

from .checkpoint import CheckpointError, create_model, load_config, save_checkpoint  # noqa: E402
from . import models  # noqa: E402,F401  (registers the vl_* models into timm: timm.create_model works)
from .runner import Runner, TorchRunner, as_runner  # noqa: E402
from . import explain  # noqa: E402,F401  (callable: vitlab.explain(model, images, method=...))
from .techniques import (Kind, TechniqueError, TechniqueNotApplicable, apply_, format_technique, parse_apply,  # noqa: E402
                         register_technique)


def measure(*args, **kwargs):
    """See `vitlab.bench.measure.measure` (imported lazily: it pulls in the profiling stack)."""
    from .bench.measure import measure as _measure

    return _measure(*args, **kwargs)


def quantize_(model, cfg=None):
    """See `vitlab.quant.quantize_`: put fake quantizers (mode off) into a model, in place; then `calibrate` it."""
    from .quant import quantize_ as _quantize_

    return _quantize_(model, cfg)


def calibrate(model, loader_or_batches, num_images=None):
    """See `vitlab.quant.calibrate`: observe calibration images, finalize every quantizer, switch them on."""
    from .quant import calibrate as _calibrate

    return _calibrate(model, loader_or_batches, num_images=num_images)


def prune_(model, cfg=None, **kwargs):
    """See `vitlab.prune.prune_`: structured pruning to a FLOPs / params target (imported lazily)."""
    from .prune import prune_ as _prune_

    return _prune_(model, cfg, **kwargs)


def from_transformers(model_or_dir):
    """See `vitlab.models.from_transformers`: a HF transformers image model -> the vitlab model, weights copied."""
    from .models import from_transformers as _from_transformers

    return _from_transformers(model_or_dir)


__all__ = [
    "__version__", "create_model", "save_checkpoint", "load_config", "CheckpointError", "Runner", "TorchRunner",
    "as_runner", "apply_", "parse_apply", "format_technique", "register_technique", "Kind", "TechniqueError", "TechniqueNotApplicable",
    "measure", "from_transformers", "prune_", "quantize_", "calibrate", "explain",
]
