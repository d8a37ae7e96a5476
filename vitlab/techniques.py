"""Technique registry: CLI names -> frozen config dataclasses, the `--apply` parser, stack order, and `apply_`.

A technique is a frozen dataclass whose defaults are its paper's. It is registered with a CLI name and a kind;
the function that carries it out is registered separately, by config type (torchao's `quantize_` pattern)::

    @register_technique("tome", kind=Kind.TOKENS)
    @dataclass(frozen=True)
    class ToMe:
        r: int = 8

    @register_handler(ToMe)
    def _apply_tome(model, cfg): ...     # changes the model in place and returns it

    vitlab.apply_(model, parse_apply(["tome:r=13"]))
    runner = vitlab.deploy(model, W8A8(), calib=batches)   # deploys=True techniques give a runner (vitlab.loader)

Stacks apply in a fixed order of kinds: structure (pruning) -> tokens -> quantization/deployment. The stack
applied so far is recorded on the model (`model.vitlab.techniques`), saved in checkpoints and measurement rows.
"""
import dataclasses
import enum
import importlib
import inspect
import types
import typing
from typing import Any, Callable, Iterable, Sequence

from .errors import TechniqueNotApplicable as _NotApplicable
from .errors import UserError
from .record import record, update_record

__all__ = [
    "Kind", "TechniqueError", "TechniqueNotApplicable", "register_technique", "register_handler", "unregister_technique", "technique_names",
    "get_technique", "parse_technique", "parse_apply", "format_technique", "technique_to_dict",
    "technique_from_dict", "check_stack_order", "applied_techniques", "apply_", "apply_stack", "needs_calibration", "parse_options",
    "deploys",
]


class Kind(enum.IntEnum):
    """Kinds of technique, in the only order they may be stacked."""

    STRUCTURE = 0      # pruning: changes weights and widths, baked into the checkpoint
    TOKENS = 1         # token reduction: changes the forward pass, re-applied when a checkpoint loads
    QUANTIZATION = 2   # quantization / deployment to an inference engine: always last

    @property
    def label(self) -> str:
        return {0: "structure (pruning)", 1: "tokens", 2: "quantization/deployment"}[self.value]


ORDER_TEXT = " -> ".join(k.label for k in Kind)


class TechniqueError(UserError):
    """A technique name, option or stack that cannot be used; the message says what to do instead."""


class TechniqueNotApplicable(TechniqueError, _NotApplicable):
    """A technique asked of a model it does not support; the message names the technique, the model class and
    what the technique supports (`vitlab.errors.TechniqueNotApplicable`)."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    cls: type
    kind: Kind
    reapply_on_load: bool
    help: str
    needs_calibration: bool | Callable[[Any], bool] = False
    deploys: bool = False


_REGISTRY: dict[str, _Entry] = {}
_BY_CLASS: dict[type, _Entry] = {}
_HANDLERS: dict[type, Callable] = {}


def register_technique(name: str, kind: Kind, *, reapply_on_load: bool | None = None,
                       needs_calibration: bool | Callable[[Any], bool] = False,
                       deploys: bool = False) -> Callable[[type], type]:
    """Class decorator: register a frozen dataclass as technique `name` (a CLI name) of `kind`.

    `reapply_on_load`: whether `create_model(checkpoint)` re-applies it (default: tokens yes; structure no, since
    pruning is baked into the saved widths and weights; quantization no, its own issue saves its state).
    `needs_calibration`: whether applying it reads calibration images (`apply_(..., calib=)`): a bool, or a function
    of the config where that depends on its fields (a pruning criterion that scores on images); see
    `needs_calibration(cfg)`.
    `deploys`: applying it hands the model to an inference engine and gives back a runner (w8a8, w8, bf16), so it
    runs through `vitlab.deploy` (or `vitlab.load_runner`), never `apply_`, which changes a model in place.
    """
    name = name.lower()

    def decorator(cls: type) -> type:
        if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
            raise TypeError(f"technique {name!r}: {cls.__name__} must be a frozen dataclass")
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise TechniqueError(f"technique name {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        reapply = (kind == Kind.TOKENS) if reapply_on_load is None else reapply_on_load
        entry = _Entry(name, cls, Kind(kind), reapply, (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
                       needs_calibration, deploys)
        _REGISTRY[name] = entry
        _BY_CLASS[cls] = entry
        return cls

    return decorator


def register_handler(cls: type) -> Callable[[Callable], Callable]:
    """Function decorator: `fn(model, cfg) -> model_or_runner` carries out configs of type `cls`."""

    def decorator(fn: Callable) -> Callable:
        _HANDLERS[cls] = fn
        return fn

    return decorator


def unregister_technique(name: str) -> None:
    """Remove a registered technique (tests use this to keep the registry clean)."""
    entry = _REGISTRY.pop(name.lower(), None)
    if entry is not None:
        _BY_CLASS.pop(entry.cls, None)
        _HANDLERS.pop(entry.cls, None)


def technique_names() -> list[str]:
    """Every registered technique name (vitlab's built-in ones included)."""
    _load_builtin_techniques()
    return sorted(_REGISTRY)


def _entry_for(cfg: Any) -> _Entry:
    entry = _BY_CLASS.get(type(cfg))
    if entry is None:
        raise TechniqueError(
            f"{type(cfg).__name__} is not a registered technique config; registered: {', '.join(technique_names()) or 'none'}")
    return entry


def get_technique(name: str) -> _Entry:
    _load_builtin_techniques()
    entry = _REGISTRY.get(name.lower())
    if entry is None:
        raise TechniqueError(
            f"unknown technique {name!r}; available: {', '.join(technique_names()) or 'none registered'}")
    return entry


def _load_builtin_techniques() -> None:
    """Import the packages that register vitlab's techniques (they register on import)."""
    for module in ("vitlab.tokens", "vitlab.quant", "vitlab.prune"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


# ----------------------------------------------------------------------------------------------- parsing

def _coerce(text: str, annotation: Any, key: str, name: str) -> Any:
    """Convert the text of one `key=value` to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(text, arg, key, name)
            except TechniqueError as e:
                errors.append(str(e))
        raise TechniqueError(errors[0])
    if origin is typing.Literal:
        if text in [str(a) for a in args]:
            return next(a for a in args if str(a) == text)
        raise TechniqueError(f"{name}: {key}={text!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        item_type = args[0] if args else str
        parts = [p for p in text.replace("/", " ").replace(";", " ").split() if p]
        return tuple(_coerce(p, item_type, key, name) for p in parts)
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation is str or annotation is Any:
            return text
    except ValueError:
        pass
    else:
        raise TechniqueError(f"{name}: cannot read {key}={text!r} (field type {annotation})")
    type_name = getattr(annotation, "__name__", str(annotation))
    raise TechniqueError(f"{name}: {key}={text!r} is not a valid {type_name}")


def parse_options(text: str, rest: str, label: str, options: Sequence[str], hints: dict[str, Any], flag: str,
                  error: type[UserError] = TechniqueError) -> dict[str, Any]:
    """The `key=value,...` part of `NAME:key=value,...` (`rest`, from the whole `text`) -> {option: typed value}:
    the grammar `--apply`, `--recipe` and `--head` share. `options` are the keys allowed (listed in this order when
    one is unknown); values are coerced to `hints[key]` (str when absent). Every mistake raises `error`, starting
    with `label` and ending with `(in FLAG 'TEXT')`."""
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise error(f"{label}: option {item!r} has no value; write key=value (in {flag} {text!r})")
        if key not in options:
            raise error(f"{label}: unknown option {key!r}; options are {', '.join(options) or 'none'} "
                        f"(in {flag} {text!r})")
        if key in kwargs:
            raise error(f"{label}: option {key!r} given twice (in {flag} {text!r})")
        try:
            kwargs[key] = _coerce(value.strip(), hints.get(key, str), key, label)
        except TechniqueError as e:
            raise error(f"{e} (in {flag} {text!r})") from None
    return kwargs


def parse_technique(text: str) -> Any:
    """Parse one `NAME` or `NAME:key=value,key=value` into a config instance (validated by its __post_init__)."""
    text = text.strip()
    name, _, rest = text.partition(":")
    if not name:
        raise TechniqueError(f"empty technique in --apply {text!r}; expected NAME or NAME:key=value,...")
    entry = get_technique(name)
    fields = [f.name for f in dataclasses.fields(entry.cls) if f.init]
    kwargs = parse_options(text, rest, entry.name, fields, typing.get_type_hints(entry.cls), "--apply")
    try:
        return entry.cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise TechniqueError(f"{entry.name}: {e} (in --apply {text!r})") from None


def parse_apply(items: Iterable[str] | None) -> list:
    """Parse repeated `--apply` values (in order) and check the stack order."""
    configs = [parse_technique(item) for item in (items or [])]
    check_stack_order(configs)
    return configs


def format_technique(cfg: Any) -> str:
    """The `--apply` text of a config; fields left at their defaults are omitted."""
    entry = _entry_for(cfg)
    parts = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if value != default:
            value = "/".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            parts.append(f"{f.name}={value}")
    return entry.name + (":" + ",".join(parts) if parts else "")


def technique_to_dict(cfg: Any) -> dict:
    """JSON-able dict: {"name": CLI name, **fields}."""
    entry = _entry_for(cfg)
    out = {"name": entry.name}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def technique_from_dict(data: dict) -> Any:
    data = dict(data)
    entry = get_technique(data.pop("name"))
    hints = typing.get_type_hints(entry.cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise TechniqueError(f"{entry.name}: unknown option {key!r} in saved technique {data}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return entry.cls(**kwargs)


def technique_kind(cfg: Any) -> Kind:
    return _entry_for(cfg).kind


def reapply_on_load(cfg: Any) -> bool:
    return _entry_for(cfg).reapply_on_load


def needs_calibration(cfg: Any) -> bool:
    """Whether applying `cfg` reads calibration images (its registration's `needs_calibration`), so a caller knows
    to pass `apply_(..., calib=)` without testing names or kinds."""
    flag = _entry_for(cfg).needs_calibration
    return bool(flag(cfg) if callable(flag) else flag)


def deploys(cfg: Any) -> bool:
    """Whether applying `cfg` turns the model into an engine runner (its registration's `deploys`)."""
    return _entry_for(cfg).deploys


def check_stack_order(configs: Sequence[Any]) -> None:
    """Raise if kinds are out of order (structure -> tokens -> quantization/deployment)."""
    for prev, cfg in zip(configs, configs[1:]):
        prev_kind, kind = technique_kind(prev), technique_kind(cfg)
        if kind < prev_kind:
            raise TechniqueError(
                f"--apply {format_technique(cfg)} ({kind.label}) cannot come after {format_technique(prev)} "
                f"({prev_kind.label}): stack techniques in the order {ORDER_TEXT}")
    quant = [c for c in configs if technique_kind(c) == Kind.QUANTIZATION]
    if len(quant) > 1:
        raise TechniqueError(
            f"only one quantization/deployment technique per stack, got {', '.join(map(format_technique, quant))}")


def applied_techniques(model: Any) -> tuple:
    """The techniques applied to `model` so far, in order (empty for an untouched model)."""
    return tuple(record(model).techniques)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _as_list(configs: Any | Sequence[Any] | None) -> list:
    return [] if configs is None else list(configs) if isinstance(configs, (list, tuple)) else [configs]


def apply_(model: Any, configs: Any | Sequence[Any], *, calib: Any = None) -> Any:
    """Apply one config or a list of configs to `model` in order, in place; return the same model.

    The stack already applied to the model counts: adding tokens after quantization is refused. A technique that
    deploys the model to an inference engine (w8a8, w8, bf16) gives a runner, not a changed model: it is refused
    here, naming `vitlab.deploy`, which runs it.
    `calib`: calibration images for techniques that need them (post-training quantization): an iterable of image
    batches (tensors already preprocessed for the model), passed to every handler that takes a `calib` argument.
    """
    configs = _as_list(configs)
    for cfg in configs:
        if deploys(cfg):
            text = " + ".join(map(format_technique, configs))
            raise TechniqueError(
                f"{format_technique(cfg)} deploys the model to an inference engine and returns a runner, while apply_ "
                f"changes a model in place: runner = vitlab.deploy(model, {text!r}, calib=...) (or "
                "vitlab.load_runner(source, stack, calibration=...))")
    return apply_stack(model, configs, calib=calib)


def apply_stack(model: Any, configs: Any | Sequence[Any], *, calib: Any = None) -> Any:
    """`apply_` for a stack that may end in a deployment: returns the model, or the runner the last technique
    deployed. What `vitlab.deploy`, the loader and checkpoint loading run; users call `apply_` or `vitlab.deploy`."""
    configs = _as_list(configs)
    stack = list(applied_techniques(model))
    check_stack_order(stack + configs)
    for cfg in configs:
        handler = _HANDLERS.get(type(cfg))
        if handler is None:
            raise TechniqueError(f"technique {_entry_for(cfg).name!r} has no handler registered")
        result = handler(model, cfg, calib=calib) if _accepts(handler, "calib") else handler(model, cfg)
        model = model if result is None else result
        stack.append(cfg)
        try:
            update_record(model, techniques=tuple(stack))
        except AttributeError:  # a runner that does not take attributes keeps its own record
            pass
    return model
