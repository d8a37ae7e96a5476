"""vitlab: Vision Transformers that are accurate and fast on the hardware you have.

    import vitlab
    model = vitlab.create_model("vl_vit_fmnist")                 # any timm / vitlab name, or a checkpoint folder
    vitlab.apply_(model, vitlab.parse_apply(["tome:r=4"]))       # techniques, in place
    rows = vitlab.measure("checkpoints/fashion-mnist-reference", data="fashion-mnist")
"""
__version__ = "0.1.0"

from .checkpoint import CheckpointError, create_model, load_config, save_checkpoint  # noqa: E402
from .runner import Runner, TorchRunner, as_runner  # noqa: E402
from .techniques import Kind, TechniqueError, apply_, format_technique, parse_apply, register_technique  # noqa: E402


def measure(*args, **kwargs):
    """See `vitlab.bench.measure.measure` (imported lazily: it pulls in the profiling stack)."""
    from .bench.measure import measure as _measure

    return _measure(*args, **kwargs)


def from_transformers(model_or_dir):
    """See `vitlab.models.from_transformers`: a HF transformers image model -> the vitlab model, weights copied."""
    from .models import from_transformers as _from_transformers

    return _from_transformers(model_or_dir)


__all__ = [
    "__version__", "create_model", "save_checkpoint", "load_config", "CheckpointError", "Runner", "TorchRunner",
    "as_runner", "apply_", "parse_apply", "format_technique", "register_technique", "Kind", "TechniqueError", "measure", "from_transformers",
]
