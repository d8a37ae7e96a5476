"""Versioned checkpoint folders and `create_model`, which builds a model from a name or rebuilds one from a folder.

A checkpoint is a folder:

    model.safetensors   the weights (safetensors: no code runs when they load)
    config.json         {"format": "vitlab-checkpoint", "version": 1, "model": {"name", "kwargs"}, "techniques",
                         "preprocessing", "data", "metrics", "training", "versions", "created"}

`model.kwargs` are the constructor keyword arguments (per-block widths of a pruned model go here too), so
`create_model(DIR)` rebuilds the model from the folder alone. Training state for `--resume` lives beside it in
`train_state.pt` (see vitlab.engine). Every file is written atomically.

Loading trusts nothing in the folder: config.json is checked for types and keys, every file it names must lie inside
the folder (`checkpoint_file`: no absolute path, no "..", no symlink out), every tensor must have the model's
name, shape and dtype, and pickle files are never unpickled (`vitlab convert ... --allow-pickle` reads tensors only).
"""
import argparse
import datetime
import json
import pickle
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .errors import UserError
from .record import record, update_record
from .runner import model_input_size
from .techniques import (_load_builtin_techniques, applied_techniques, apply_stack, reapply_on_load, technique_from_dict,
                         technique_to_dict)
from .utils.io import atomic_path, atomic_write_json

__all__ = [
    "FORMAT", "VERSION", "CheckpointError", "create_model", "save_checkpoint", "load_config", "load_weights",
    "is_checkpoint", "model_spec", "default_preprocessing", "checkpoint_file", "check_state_dict",
    "techniques_from_config", "refuse_out_over_source", "register_format", "register_model_layout",
]

FORMAT = "vitlab-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")  # official releases use .pth.tar too


class CheckpointError(UserError):
    """A checkpoint folder or weights file that cannot be used; the message names the file and the fix."""


# A technique package that saves more than float weights registers how its folders load, so this module never imports
# the packages above it (quant, prune): they register on import, and `_load_builtin_techniques` imports them.
BASE_KEYS = frozenset({"format", "version", "model", "techniques", "preprocessing", "data", "metrics", "training",
                       "versions", "created"})
_FORMATS: dict[str, Callable[..., Any]] = {}
Reshape = Callable[[nn.Module, Any, str], Any]   # (model just built, the "model" key's value, where in config.json)
_LAYOUTS: dict[str, Reshape] = {}


def register_format(section: str, loader: Callable[..., Any]) -> Callable[..., Any]:
    """`loader(directory, **kwargs) -> model or runner` rebuilds, whole, a checkpoint folder whose config.json has
    the top-level `section` (vitlab.quant: "quantization"); returns `loader`."""
    _FORMATS[section] = loader
    return loader


def register_model_layout(key: str, reshape: Reshape) -> Reshape:
    """`reshape(model, value, where)` re-shapes a model just built from a config.json whose "model" has `key`, before
    its weights load (vitlab.prune: "resized", the tensor shapes left by pruning); returns `reshape`."""
    _LAYOUTS[key] = reshape
    return reshape


def _registered(table: dict[str, Callable], keys) -> list[tuple[str, Callable]]:
    """The (key, function) pairs of `table` for `keys`, importing vitlab's technique packages first when one of
    `keys` has no function yet (they register on import)."""
    keys = list(keys)
    if any(k not in table for k in keys):
        _load_builtin_techniques()
    return [(k, table[k]) for k in keys if k in table]


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
    spec = record(model).spec
    if spec is not None:
        # vitlab models record every constructor kwarg (record.arch), so a checkpoint survives changed defaults
        return {"name": spec["name"], "kwargs": {**(record(model).arch or {}), **spec["kwargs"]},
                **_resized(model)}
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch is None:
        raise CheckpointError(
            f"{type(model).__name__} was not built by vitlab.create_model or timm.create_model; "
            "pass model_name= and model_kwargs= to save_checkpoint")
    kwargs = record(model).arch
    if kwargs is None:  # a timm model: keep what timm.create_model users change most
        chans, height, width = model_input_size(model)
        default = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, None, None)))
        kwargs = {"num_classes": int(getattr(model, "num_classes", 0))}
        if chans != default[0]:
            kwargs["in_chans"] = chans
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # ViTs fix their grid at build
        if img_size is not None and tuple(img_size) != default[1:]:
            kwargs["img_size"] = list(img_size)
    return {"name": arch, "kwargs": dict(kwargs), **_resized(model)}


def _resized(model: nn.Module) -> dict:
    """{"resized": ...} for a model pruned through the dependency graph (vitlab.prune.graph), else {}."""
    resized = record(model).resized
    return {"resized": resized} if resized else {}


def default_preprocessing(model: nn.Module, class_names: list[str] | None = None) -> dict:
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


def _inherited_preprocessing(model: nn.Module) -> dict | None:
    """The preprocessing (input size, mean/std, class names) of the checkpoint `model` was loaded from, if any, so
    a model saved again (quantized, exported by the Pareto lab) keeps its class names; None when the input size
    changed since (e.g. a model rebuilt at another img_size)."""
    pre = record(model).config.get("preprocessing")
    if not isinstance(pre, dict):
        return None
    try:
        same = list(pre.get("input_size", [])) == list(model_input_size(model))
    except ValueError:
        return None
    return dict(pre) if same and len(pre.get("class_names") or []) == int(getattr(model, "num_classes", 0)) else None


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
    directory = Path(directory)
    spec = model_spec(model) if model_name is None else {"name": model_name, "kwargs": model_kwargs or {}}

    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": spec["name"], "kwargs": _jsonable(spec["kwargs"]),
                  **({"resized": _jsonable(spec["resized"])} if spec.get("resized") else {})},
        "techniques": [technique_to_dict(t) for t in applied_techniques(model)],
        "preprocessing": _jsonable(preprocessing or _inherited_preprocessing(model) or default_preprocessing(model)),
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


def checkpoint_file(directory: str | Path, name: object, what: str = "a file name") -> Path:
    """The file `name` (read from `directory`'s config.json, or one of vitlab's fixed names) inside `directory`.

    A checkpoint may only refer to files inside its own folder: an absolute path, a ".." or a symlink that leads
    out of it is a CheckpointError (a crafted config.json must not make vitlab open /etc/passwd). The folder itself
    may be a symlink (e.g. `latest -> run3`)."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{directory / CONFIG}: {what} must be a file name inside the checkpoint, got {name!r}")
    root = directory.resolve()
    rel = Path(name)
    path = (root / rel).resolve()
    why = ("is an absolute path" if rel.is_absolute() else "climbs out with '..'" if ".." in rel.parts else
           f"leads to {path}" if not path.is_relative_to(root) or path == root else None)
    if why:
        raise CheckpointError(f"checkpoint refers to a file outside it: {what} {name!r} in {directory} {why}; a "
                              "checkpoint may only name files inside its folder (re-create it with vitlab)")
    return path


def refuse_out_over_source(out: str | Path, *sources: str | Path, flag: str = "--out") -> None:
    """A verb never writes into what it reads: `out` may not be (or lie inside) a source checkpoint folder, nor be
    the folder of a source weights file (its model.safetensors / config.json would land beside, or over, the file).
    Model names among `sources` are skipped."""
    target = Path(out).resolve()
    for source in sources:
        src = Path(source)
        if src.is_dir():
            folder = src.resolve()
            hit = target == folder or target.is_relative_to(folder)
        else:
            hit = src.is_file() and target == src.resolve().parent
        if hit:
            what = "the checkpoint folder" if src.is_dir() else f"the folder of {src.name}"
            raise UserError(f"{flag} {out} is {what} it reads ({source}); vitlab does not write into its input: "
                            f"choose another {flag}")


MISSING = object()


def _expect(cond: bool, path: Path, where: str, want: str, got: object) -> None:
    if not cond:
        text = "it is missing" if got is MISSING else f"got {got!r}"
        text = text if len(text) <= 84 else text[:81] + "..."
        raise CheckpointError(f"{path}: {where} must be {want}, {text}; the checkpoint is damaged or was edited "
                              "by hand: fix that key or re-save the checkpoint with vitlab")


def _check_config(config: object, path: Path) -> dict:
    """Types and required keys of a config.json (what loading reads), each error naming the key."""
    _expect(isinstance(config, dict), path, "the file", "a JSON object", type(config).__name__)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {config.get('format')!r}, expected {FORMAT!r}: not a vitlab "
                              "checkpoint (import weights with `vitlab convert MODEL FILE --out DIR`)")
    version = config.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise CheckpointError(
            f"{path} is checkpoint version {version!r}; this vitlab {__version__} reads up to version "
            f"{VERSION}: upgrade vitlab")
    model = config.get("model", MISSING)
    _expect(isinstance(model, dict), path, '"model"', 'an object {"name": ..., "kwargs": {...}}', model)
    _expect(isinstance(model.get("name"), str) and bool(model.get("name")), path, '"model.name"',
            "a model name (text)", model.get("name", MISSING))
    _expect(isinstance(model.get("kwargs"), dict), path, '"model.kwargs"', "an object of constructor kwargs",
            model.get("kwargs", MISSING))
    techniques = config.get("techniques", [])
    _expect(isinstance(techniques, list), path, '"techniques"', "a list", techniques)
    for i, t in enumerate(techniques):
        _expect(isinstance(t, dict) and isinstance(t.get("name"), str), path, f'"techniques"[{i}]',
                'an object with a "name"', t)
    pre = config.get("preprocessing")
    if pre is not None:
        _expect(isinstance(pre, dict), path, '"preprocessing"', "an object", pre)
        size = pre.get("input_size", MISSING)
        _expect(isinstance(size, list) and len(size) == 3 and all(type(v) is int and v > 0 for v in size), path,
                '"preprocessing.input_size"', "[channels, height, width], three integers >= 1", size)
        for key in ("mean", "std"):
            v = pre.get(key, MISSING)
            _expect(isinstance(v, list) and len(v) == size[0]
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v), path,
                    f'"preprocessing.{key}"', f"a list of {size[0]} numbers (one per channel)", v)
        _expect(all(x > 0 for x in pre["std"]), path, '"preprocessing.std"', "positive numbers", pre["std"])
        names = pre.get("class_names", [])
        _expect(isinstance(names, list) and all(isinstance(n, str) for n in names), path,
                '"preprocessing.class_names"', "a list of class names (text)", names)
    quant = config.get("quantization")
    if quant is not None:
        _expect(isinstance(quant, dict), path, '"quantization"', "an object", quant)
        for key in ("bits", "modes"):
            _expect(isinstance(quant.get(key, {}), dict), path, f'"quantization.{key}"',
                    "an object {quantizer: value}", quant.get(key))
    return config


def load_config(directory: str | Path) -> dict:
    """Read and validate a checkpoint folder's config.json (types and keys: see `_check_config`)."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a checkpoint folder (a folder with {CONFIG} and {WEIGHTS})")
    if not (directory / CONFIG).is_file():
        raise CheckpointError(f"{directory} is not a vitlab checkpoint: it has no {CONFIG}")
    path = directory / CONFIG
    checkpoint_file(directory, CONFIG)  # config.json itself may not be a symlink out of the folder
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    return _check_config(config, path)


def _convert_hint(path: Path, model: nn.Module | None) -> str:
    """The exact `vitlab convert` command that turns a trusted pickle file into a checkpoint."""
    spec = (record(model).spec or {}) if model is not None else {}
    name = spec.get("name") or ((getattr(model, "pretrained_cfg", None) or {}).get("architecture") if model else None)
    command = f"vitlab convert {shlex.quote(name) if name else 'MODEL'} {shlex.quote(str(path))}"
    if spec.get("kwargs"):
        command += f" --model-kwargs {shlex.quote(json.dumps(spec['kwargs']))}"
    return command + " --allow-pickle --out DIR"


def _unpickler_reason(err: BaseException) -> str:
    """torch.load's refusal without its multi-line advice (weights_only=False etc.): just what it found."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = text.split(" Please use", 1)[0].split("Check the documentation", 1)[0]
    elif "Weights only load failed" in text:
        text = text.split("\n", 1)[0]
    text = " ".join(text.split()).strip(" .")
    return text or f"{type(err).__name__}: the file is empty or truncated"


def _read_state_dict(path: Path, allow_pickle: bool, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        hint = ""
        if path.name == WEIGHTS and path.parent.is_dir():
            pickles = sorted(p.name for p in path.parent.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                hint = (f" (the folder has {pickles[0]}, a pickle file, which vitlab does not read from a checkpoint; "
                        f"if you trust it: {_convert_hint(path.parent / pickles[0], model)})")
        raise CheckpointError(f"weights file {path} does not exist{hint}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {path}: {e} (truncated or not a safetensors file)") from None
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} is a pickle file, and vitlab does not unpickle files (loading a pickle can run any code in "
                f"it); if you trust it, convert it once: {_convert_hint(path, model)}")

        try:
            # training scripts (timm, DeiT) store their argparse.Namespace beside the weights: a plain data class
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, TypeError, KeyError,
                AttributeError, ImportError) as e:  # torch raises many types for a bad or unsafe pickle
            raise CheckpointError(
                f"{path}: vitlab read this pickle with torch.load(weights_only=True), tensors and plain data only, "
                f"and it holds something else ({_unpickler_reason(e)}); vitlab will not unpickle it: get the "
                "weights as .safetensors or a plain state_dict from its source") from None
        for key in ("state_dict", "model_state_dict", "model", "module"):  # common wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} holds no state_dict (a dict of tensor names to tensors) but a "
                                  f"{type(state).__name__}; save model.state_dict() instead")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors")


def _dtype_fits(saved: torch.dtype, wanted: torch.dtype) -> bool:
    """Same dtype, or a lossless widening of one floating-point type into another (a float16 release into float32
    parameters). Never int <-> float (int8 codes read as float weights), never a narrowing."""
    if saved == wanted:
        return True
    return saved.is_floating_point and wanted.is_floating_point and torch.promote_types(saved, wanted) == wanted


def check_state_dict(state: dict, own: dict, path: str | Path, *, strict: bool = True, adopt_shapes=()) -> None:
    """Every tensor of `own` (the model's state_dict) is in `state` with the same shape and a dtype that fits; else
    a CheckpointError naming the tensor and the file. `strict`: missing and unexpected tensors are errors too.
    `adopt_shapes`: keys whose module takes the saved shape (a quantizer's per-channel scales): dtype checked only."""
    for key, value in own.items():
        if key not in state:
            if strict:
                raise CheckpointError(f"{path}: tensor {key!r} {tuple(value.shape)} that the model needs is missing")
            continue
        saved = state[key]
        if not isinstance(saved, torch.Tensor):
            raise CheckpointError(f"{path}: {key!r} is a {type(saved).__name__}, not a tensor")
        if tuple(saved.shape) != tuple(value.shape) and key not in adopt_shapes:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(saved.shape)} but the model expects {tuple(value.shape)}")
        if not _dtype_fits(saved.dtype, value.dtype):
            raise CheckpointError(
                f"{path}: tensor {key!r} is {str(saved.dtype).removeprefix('torch.')} but the model's is "
                f"{str(value.dtype).removeprefix('torch.')}; vitlab does not cast it (the file is damaged or belongs "
                "to another model or quantization layout)")
    unexpected = [k for k in state if k not in own]
    if unexpected and strict:
        raise CheckpointError(f"{path}: tensor {unexpected[0]!r} is not in the model ({len(unexpected)} unexpected)")


def load_weights(model: nn.Module, path: str | Path, *, allow_pickle: bool = False, strict: bool = True,
                 filter_fn=None) -> nn.Module:
    """Load weights into `model`; a missing, unexpected, mis-shaped or wrong-dtype tensor is an error naming it and
    the file (a float16 file may fill float32 parameters: a lossless widening; nothing else is cast).

    `filter_fn(state_dict, model) -> state_dict` converts another layout first (each zoo family's
    `checkpoint_filter_fn` maps its official checkpoints to vitlab's layout).
    """
    path = Path(path)
    state = _read_state_dict(path, allow_pickle, model)
    if filter_fn is not None:
        state = filter_fn(state, model)
    check_state_dict(state, model.state_dict(), path, strict=strict)
    model.load_state_dict(state, strict=False)
    return model


def create_model(name_or_checkpoint: str | Path, *, pretrained: bool = False, reapply: bool = True, **kwargs) -> nn.Module:
    """Create any timm or vitlab model by name, or rebuild one from a vitlab checkpoint folder.

    For a folder, `kwargs` override the saved constructor kwargs; the saved technique stack is re-applied where the
    technique asks for it (token reduction), unless `reapply=False`.
    """
    if Path(str(name_or_checkpoint)).is_dir() or "/" in str(name_or_checkpoint):
        directory = Path(name_or_checkpoint)
        config = load_config(directory)
        loaders = _registered(_FORMATS, (k for k in config if k not in BASE_KEYS))
        if loaders:  # a folder a technique package rebuilds whole (vitlab.quant: a quantized model, a deployed runner)
            return loaders[0][1](directory, **kwargs)
        model = _build_from_config(directory, config, kwargs)
        stack = techniques_from_config(directory, config)
        # a technique that adds modules (slim's TSMs, iared's interpreters) must be applied before its weights load
        early = reapply and any(getattr(t, "adds_parameters", False) for t in stack)
        # kwargs that change a tensor's shape (img_size, window_size): timm's own filter resamples position
        # embeddings and relative-position tables, as for pretrained weights at another resolution
        filter_fn = _resize_filter(model) if kwargs else None
        if not early:
            load_weights(model, checkpoint_file(directory, WEIGHTS), filter_fn=filter_fn)
        model.eval()
        if stack:
            update_record(model, techniques=tuple(t for t in stack if not reapply_on_load(t)))
            if reapply:
                model = apply_stack(model, [t for t in stack if reapply_on_load(t)])
        if early:
            load_weights(model, checkpoint_file(directory, WEIGHTS), filter_fn=filter_fn)
            model.eval()
        update_record(model, checkpoint={"path": str(directory), "config": config})
        return model
    name = str(name_or_checkpoint)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else "; `vitlab models PATTERN` lists names"
        raise UserError(f"unknown model {name!r} (not a timm/vitlab model name nor a checkpoint folder){hint}")
    try:
        model = _timm_create(name, pretrained, kwargs)
    except TypeError as e:
        # a keyword the constructor does not take, or a value of the wrong type (--model-kwargs, config.json)
        if not kwargs:
            raise
        raise UserError(f"{name} cannot be built with kwargs {json.dumps(_jsonable_or_repr(kwargs))}: {e}") from None
    update_record(model, spec={"name": name, "kwargs": dict(kwargs)})
    return model


def _timm_create(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """timm.create_model(name, **kwargs), where `kwargs` may also override the architecture kwargs the registry
    function fixes itself (timm's volo_d1_224 passes layers=, embed_dims=, num_heads= to the class, so passing them
    again is a TypeError "got multiple values"): those are merged over the function's own, at the
    `build_model_with_cfg` call every timm family makes. The model records all of `kwargs`, so it rebuilds the same."""

    rest, fixed = dict(kwargs), {}
    while True:
        try:
            with _arch_overrides(name, fixed):
                return timm.create_model(name, pretrained=pretrained, **rest)
        except (TypeError, KeyError) as e:
            # `dict(layers=..., **kwargs)` with "layers" in kwargs: a TypeError, or (CPython 3.11, while another
            # exception is being handled) the bare KeyError('layers')
            found = re.search(r"got multiple values for keyword argument '(\w+)'", str(e)) \
                if isinstance(e, TypeError) else None
            key = found.group(1) if found else (e.args[0] if isinstance(e, KeyError) and e.args else None)
            if not isinstance(key, str) or key not in rest:
                raise
            fixed[key] = rest.pop(key)


class _arch_overrides:
    """Within the block, the registry function of `name` builds its model with `overrides` merged over the kwargs it
    passes to timm's `build_model_with_cfg` (patched in the function's module only, restored on exit)."""

    def __init__(self, name: str, overrides: dict):
        self.name, self.overrides, self.used = name, overrides, False

    def __enter__(self):
        if not self.overrides:
            return self

        self.module = timm.models.model_entrypoint(self.name).__globals__
        self.original = self.module.get("build_model_with_cfg")
        if self.original is None:
            raise TypeError(f"{self.name} fixes {', '.join(self.overrides)} itself and does not build through "
                            "timm's build_model_with_cfg, so they cannot be overridden")

        def build(model_cls, variant, pretrained=False, **kw):
            self.used = True
            return self.original(model_cls, variant, pretrained, **{**kw, **self.overrides})

        self.module["build_model_with_cfg"] = build
        return self

    def __exit__(self, kind, value, tb):
        if self.overrides:
            self.module["build_model_with_cfg"] = self.original
            if kind is None and not self.used:
                raise TypeError(f"{self.name} fixes {', '.join(self.overrides)} itself and did not build through "
                                "timm's build_model_with_cfg, so they cannot be overridden")
        return False


def _jsonable_or_repr(value: Any) -> Any:
    try:
        return _jsonable(value)
    except CheckpointError:
        return repr(value)


def _resize_filter(model: nn.Module):
    """The `checkpoint_filter_fn` of the timm family module that defines `model`'s class (timm applies it to
    pretrained weights: position embeddings resampled to img_size, Swin's relative-position tables to window_size),
    run only on tensors whose shape differs from the model's; None for families timm does not ship."""
    module = sys.modules.get(type(model).__module__)
    timm_filter = getattr(module, "checkpoint_filter_fn", None)
    if timm_filter is None or not type(model).__module__.startswith("timm.models."):
        return None

    def resize(state: dict, model: nn.Module) -> dict:
        own = model.state_dict()
        differ = {k: v for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)}
        if not differ:
            return state
        try:
            with warnings.catch_warnings():   # timm's interpolation warns about its own indexing style
                warnings.simplefilter("ignore", UserWarning)
                resized = timm_filter(dict(differ), model)
        except Exception:   # a filter that needs tensors it was not given: the shape check names the tensor
            return state
        return {**state, **{k: v for k, v in resized.items() if k in differ}}

    return resize


def _build_from_config(directory: Path, config: dict, overrides: dict) -> nn.Module:
    """The model config.json names, built with its kwargs (and `overrides`); errors name config.json's keys."""
    name = config["model"]["name"]
    path = directory / CONFIG
    if not timm.is_model(name):
        raise CheckpointError(f"{path}: \"model.name\" {name!r} is not a model this vitlab knows (a newer vitlab or "
                              "a plugin made it, or the file was edited): upgrade vitlab or fix the name")
    try:
        model = create_model(name, **{**config["model"]["kwargs"], **overrides})
    except (UserError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: \"model.kwargs\" do not build {name}: {e}") from None
    # e.g. "resized" (pruned through the dependency graph, vitlab.prune): re-shape the base before its weights load
    for key, reshape in _registered(_LAYOUTS, (k for k in config["model"] if k not in ("name", "kwargs"))):
        reshape(model, config["model"][key], f'{path}: "model.{key}"')
    return model


def techniques_from_config(directory: str | Path, config: dict) -> list:
    """config.json's "techniques" as technique configs; a bad entry is a CheckpointError naming it."""
    stack = []
    for i, t in enumerate(config.get("techniques", [])):
        try:
            stack.append(technique_from_dict(t))
        except (UserError, TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{Path(directory) / CONFIG}: \"techniques\"[{i}] {json.dumps(t)[:120]} cannot be "
                                  f"read: {e}") from None
    return stack
