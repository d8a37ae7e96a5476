"""Versioned checkpoint folders and `create_model`, which builds a model from a name or rebuilds one from a folder.

A checkpoint is a folder:

    model.safetensors   the weights (safetensors: no code runs when they load)
    config.json         {"format": "vitlab-checkpoint", "version": 1, "model": {"name", "kwargs"}, "techniques",
                         "preprocessing", "data", "metrics", "training", "versions", "created"}

`model.kwargs` are the constructor keyword arguments (per-block widths of a pruned model go here too), so
`create_model(DIR)` rebuilds the model from the folder alone. Training state for `--resume` lives beside it in
`train_state.pt` (see vitlab.engine). Every file is written atomically.
"""
from .errors import UserError
import datetime
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .techniques import apply_, applied_techniques, reapply_on_load, technique_from_dict, technique_to_dict
from .utils.io import atomic_path, atomic_write_json

__all__ = [
    "FORMAT", "VERSION", "CheckpointError", "create_model", "save_checkpoint", "load_config", "load_weights",
    "is_checkpoint", "model_spec", "default_preprocessing",
]

FORMAT = "vitlab-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SPEC_ATTR = "vitlab_model_spec"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")  # official releases use .pth.tar too


class CheckpointError(UserError):
    """A checkpoint folder or weights file that cannot be used; the message names the file and the fix."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    raise CheckpointError(f"cannot save {type(value).__name__} value {value!r} in config.json: use JSON types")


def is_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def model_spec(model: nn.Module) -> dict:
    """{"name", "kwargs"} to rebuild `model`: recorded by create_model, else timm's architecture name with what the
    model records (vitlab families: every constructor kwarg; other timm models: their class count and channels)."""
    spec = getattr(model, SPEC_ATTR, None)
    if spec is not None:
        # vitlab models record every constructor kwarg (vitlab_arch), so a checkpoint survives changed defaults
        return {"name": spec["name"], "kwargs": {**getattr(model, "vitlab_arch", {}), **spec["kwargs"]}}
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch is None:
        raise CheckpointError(
            f"{type(model).__name__} was not built by vitlab.create_model or timm.create_model; "
            "pass model_name= and model_kwargs= to save_checkpoint")
    kwargs = getattr(model, "vitlab_arch", None)
    if kwargs is None:  # a timm model: keep what timm.create_model users change most
        from .runner import model_input_size
        chans, height, width = model_input_size(model)
        default = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, None, None)))
        kwargs = {"num_classes": int(getattr(model, "num_classes", 0))}
        if chans != default[0]:
            kwargs["in_chans"] = chans
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # ViTs fix their grid at build
        if img_size is not None and tuple(img_size) != default[1:]:
            kwargs["img_size"] = list(img_size)
    return {"name": arch, "kwargs": dict(kwargs)}


def default_preprocessing(model: nn.Module, class_names: list[str] | None = None) -> dict:
    from .runner import model_input_size

    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = model_input_size(model)
    mean = tuple(cfg.get("mean", (0.5,) * c))
    std = tuple(cfg.get("std", (0.5,) * c))
    if len(mean) != c:  # timm's RGB defaults on a model built with in_chans=1: average the channels, as timm does
        mean, std = (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c
    num_classes = int(getattr(model, "num_classes", 0))
    return {
        "input_size": [c, h, w],
        "in_chans": c,
        "mean": list(mean),
        "std": list(std),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "class_names": list(class_names) if class_names else [str(i) for i in range(num_classes)],
    }


def save_checkpoint(
        model: nn.Module,
        directory: str | Path,
        *,
        preprocessing: dict | None = None,
        data: dict | None = None,
        metrics: dict | None = None,
        training: dict | None = None,
        model_name: str | None = None,
        model_kwargs: dict | None = None,
) -> Path:
    """Write `model.safetensors` and `config.json` into `directory` (each atomically) and return the folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    spec = model_spec(model) if model_name is None else {"name": model_name, "kwargs": model_kwargs or {}}
    import timm

    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": spec["name"], "kwargs": _jsonable(spec["kwargs"])},
        "techniques": [technique_to_dict(t) for t in applied_techniques(model)],
        "preprocessing": _jsonable(preprocessing or default_preprocessing(model)),
        "data": _jsonable(data or {}),
        "metrics": _jsonable(metrics or {}),
        "training": _jsonable(training or {}),
        "versions": {"vitlab": __version__, "timm": timm.__version__, "torch": torch.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # clone: safetensors refuses tensors that share memory (tied weights); contiguous for views
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    atomic_write_json(directory / CONFIG, config)
    return directory


def load_config(directory: str | Path) -> dict:
    """Read and validate a checkpoint folder's config.json."""
    directory = Path(directory)
    path = directory / CONFIG
    if not directory.exists():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a vitlab checkpoint: it has no {CONFIG}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {config.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(config.get("version"), int) or config["version"] > VERSION:
        raise CheckpointError(
            f"{path} is checkpoint version {config.get('version')!r}; this vitlab {__version__} reads up to version "
            f"{VERSION}: upgrade vitlab")
    return config


def _read_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e} (truncated or not a safetensors file)") from None
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} is a pickle-based file, which can run code when loaded; vitlab loads it only when you pass "
                "--allow-pickle (allow_pickle=True), and then with torch.load(weights_only=True). Prefer safetensors.")
        import argparse

        try:
            # training scripts (timm, DeiT) store their argparse.Namespace beside the weights: a plain data class
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (torch raises many types for a bad or unsafe pickle)
            raise CheckpointError(f"cannot load {path} with weights_only=True: {e}") from None
        for key in ("state_dict", "model", "module"):  # common wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        return state
    raise CheckpointError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors")


def load_weights(model: nn.Module, path: str | Path, *, allow_pickle: bool = False, strict: bool = True,
                 filter_fn=None) -> nn.Module:
    """Load weights into `model`; a missing, unexpected or mis-shaped tensor is an error naming it and the file.

    `filter_fn(state_dict, model) -> state_dict` converts another layout first (each zoo family's
    `checkpoint_filter_fn` maps its official checkpoints to vitlab's layout).
    """
    path = Path(path)
    state = _read_state_dict(path, allow_pickle)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            if strict:
                raise CheckpointError(f"{path}: tensor {key!r} {tuple(value.shape)} that the model needs is missing")
        elif tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(state[key].shape)} but the model expects {tuple(value.shape)}")
    unexpected = [k for k in state if k not in own]
    if unexpected and strict:
        raise CheckpointError(f"{path}: tensor {unexpected[0]!r} is not in the model ({len(unexpected)} unexpected)")
    model.load_state_dict(state, strict=False)
    return model


def create_model(name_or_checkpoint: str | Path, *, pretrained: bool = False, reapply: bool = True, **kwargs) -> nn.Module:
    """Create any timm or vitlab model by name, or rebuild one from a vitlab checkpoint folder.

    For a folder, `kwargs` override the saved constructor kwargs; the saved technique stack is re-applied where the
    technique asks for it (token reduction), unless `reapply=False`.
    """
    import timm

    from . import models  # noqa: F401  (registers vl_* models into timm)

    if Path(str(name_or_checkpoint)).is_dir() or "/" in str(name_or_checkpoint):
        directory = Path(name_or_checkpoint)
        config = load_config(directory)
        if "quantization" in config:  # a quantized model or a deployed runner: vitlab.quant rebuilds it
            from .quant.export import load_quantized

            return load_quantized(directory, **kwargs)
        model_kwargs = {**config["model"]["kwargs"], **kwargs}
        model = create_model(config["model"]["name"], **model_kwargs)
        load_weights(model, directory / WEIGHTS)
        model.eval()
        stack = [technique_from_dict(t) for t in config.get("techniques", [])]
        if stack:
            object.__setattr__(model, "vitlab_techniques", tuple(t for t in stack if not reapply_on_load(t)))
            if reapply:
                model = apply_(model, [t for t in stack if reapply_on_load(t)])
        model.vitlab_checkpoint = {"path": str(directory), "config": config}
        return model
    name = str(name_or_checkpoint)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else "; `vitlab models PATTERN` lists names"
        raise ValueError(f"unknown model {name!r} (not a timm/vitlab model name nor a checkpoint folder){hint}")
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    setattr(model, SPEC_ATTR, {"name": name, "kwargs": dict(kwargs)})
    return model
