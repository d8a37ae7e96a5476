"""vitlab: Vision Transformers that are accurate and fast on the hardware you have.

    import vitlab
    model = vitlab.create_model("vl_vit_fmnist")                 # any timm / vitlab name, or a checkpoint folder
    vitlab.apply_(model, vitlab.parse_apply(["tome:r=4"]))       # techniques, in place
    runner = vitlab.deploy(model, ["w8a8"], calib=batches)       # int8 engine runner (calibration image batches)
    model = vitlab.load("checkpoints/fashion-mnist-reference-v2", ["tome:r=4"])   # a name or folder + a stack
    model.vitlab.techniques                                      # what vitlab knows about it (vitlab.ModelRecord)
    rows = vitlab.measure("checkpoints/fashion-mnist-reference", data="fashion-mnist")
"""
from ._version import __version__
from .checkpoint import CheckpointError, create_model, load_config, save_checkpoint  # noqa: E402
from . import models  # noqa: E402,F401  (registers the vl_* models into timm: timm.create_model works)
from .record import ModelRecord  # noqa: E402
from .runner import Runner, TorchRunner, as_runner  # noqa: E402
from . import explain  # noqa: E402,F401  (callable: vitlab.explain(model, images, method=...))
from .techniques import (Kind, TechniqueError, TechniqueNotApplicable, apply_, format_technique, parse_apply,  # noqa: E402
                         register_technique)
from .loader import Calibration, deploy, load, load_runner  # noqa: E402
from . import entrypoints  # noqa: E402,F401  (registers vl_dense, whose package loads when it is called)
from .api import calibrate, from_transformers, measure, prune_, quantize_  # noqa: E402  (lazy: heavy stacks)

__all__ = [
    "__version__", "create_model", "save_checkpoint", "load_config", "CheckpointError", "Runner", "TorchRunner",
    "as_runner", "apply_", "parse_apply", "format_technique", "register_technique", "Kind", "TechniqueError", "TechniqueNotApplicable",
    "load", "load_runner", "deploy", "Calibration", "measure", "from_transformers", "prune_", "quantize_", "calibrate", "explain",
    "ModelRecord",
]
