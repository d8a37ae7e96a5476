"""argparse flags generated from a config dataclass's fields, so a config option is written once.

A verb describes its flags with an ordered spec. `field name -> Flag(...)` is a config field: its default comes from
the field and its type, choices and action from the type hint, as `--apply`'s `key=value` grammar reads a technique
config's hints (vitlab.techniques.parse_technique); the Flag adds only what the command line needs beyond them (a
range-checked type from vitlab.utils.args, so a bad value gets the same one-line error as every other flag; help;
metavar; another flag name). `name -> callable(parser)` adds flags that are no config
field at that place, so `--help` lists them where they belong. A field the spec leaves out still gets a flag, from
its hint alone; `exclude` names the fields the command line does not set, each with the reason.

    flags = ConfigFlags(TrainConfig, {"epochs": Flag(type=positive_float), ...}, exclude={"log_every": "..."})
    flags.add_to(parser)
    cfg = TrainConfig(**flags.values(parser.parse_args(argv)))
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable

from .args import non_negative_float, non_negative_int

__all__ = ["Flag", "ConfigFlags", "arg"]


def arg(*names: str, **kwargs: Any) -> Callable[[argparse.ArgumentParser], None]:
    """A flag that is no config field, for a ConfigFlags spec: added with `parser.add_argument(*names, **kwargs)`."""
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*names, **kwargs)

    return add


FIELD_DEFAULT = object()   # Flag.default: the field's own


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one config field reads on the command line; what is left unset comes from the field and its hint.

    A bool field that defaults to True becomes `--no-NAME` (store_true; the field gets the opposite), one that
    defaults to False `--NAME` (store_true), one that may be None `--NAME/--no-NAME`."""
    help: str | None = None
    type: Callable[[str], Any] | None = None          # default: int/float hints get a >= 0 check (utils.args)
    metavar: str | None = None
    choices: tuple | None = None                      # default: a Literal hint's values
    names: tuple[str, ...] = ()                       # default: ("--kebab-name",) or ("--no-kebab-name",)
    default: Any = FIELD_DEFAULT                      # the flag's default when it is not the field's
    required: bool = False                            # the command line must give it (a field without default is)
    action: str | type[argparse.Action] | None = None
    nargs: str | None = None
    group: str | None = None                          # flags with the same group exclude each other
    to_field: Callable[[Any], Any] | None = None      # parsed value -> field value (e.g. JSON text -> dict)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _negate(value: bool) -> bool:
    return not value


class ConfigFlags:
    """The flags of one config dataclass for one verb, and the config fields read back from parsed arguments."""

    def __init__(self, cls: type, spec: dict[str, Flag | Callable[[argparse.ArgumentParser], None]],
                 exclude: dict[str, str] | None = None):
        self.cls = cls
        self.exclude = dict(exclude or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(k for k, v in spec.items() if isinstance(v, Flag) and k not in fields)
        unknown += sorted(k for k in self.exclude if k not in fields)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
        both = sorted(set(spec) & set(self.exclude))
        if both:
            raise TypeError(f"{cls.__name__}: {', '.join(both)} both given a flag and excluded")
        rest = {name: Flag() for name in fields if name not in spec and name not in self.exclude}
        self._entries: list[tuple[str | None, Any]] = []   # (group, (names, add_argument kwargs)) or (None, callable)
        self._to_field: dict[str, tuple[str, Callable[[Any], Any] | None]] = {}   # dest -> (field, to_field)
        for name, entry in {**spec, **rest}.items():
            if not isinstance(entry, Flag):
                self._entries.append((None, entry))
                continue
            names, kwargs, to_field = self._resolve(fields[name], hints[name], entry)
            dest = names[0].lstrip("-").replace("-", "_")
            self._entries.append((entry.group, (names, kwargs)))
            self._to_field[dest] = (name, to_field)

    def _resolve(self, f: dataclasses.Field, hint: Any, flag: Flag) -> tuple[tuple[str, ...], dict, Any]:
        """(names, add_argument kwargs, to_field) of field `f`: the Flag's settings over the hint's."""
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional and len(args) == 2 else hint
        default = _field_default(f)
        kebab = f.name.replace("_", "-")
        kwargs: dict[str, Any] = {}
        to_field = flag.to_field
        action, flag_type, choices = flag.action, flag.type, flag.choices
        names = flag.names
        if base is bool and action is None and flag_type is None:
            if optional:
                action = argparse.BooleanOptionalAction
            elif default is True:
                names, action, default = names or (f"--no-{kebab}",), "store_true", False
                to_field = to_field or _negate
            else:
                action = "store_true"
        elif typing.get_origin(base) is typing.Literal and choices is None:
            choices = typing.get_args(base)
        elif flag_type is None and action is None:
            flag_type = {int: non_negative_int, float: non_negative_float, str: None}.get(base, TypeError)
            if flag_type is TypeError:   # a dict, list, ... field: its flag's text needs reading
                if not (flag.to_field or flag.nargs):
                    raise TypeError(f"{self.cls.__name__}.{f.name}: give a Flag(to_field=...) that reads a {hint} "
                                    "from the flag's text")
                flag_type = None
        names = names or (f"--{kebab}",)
        if flag.default is not FIELD_DEFAULT:
            default = flag.default
        positional = not names[0].startswith("-")
        for key, value in (("action", action), ("nargs", flag.nargs), ("default", default), ("type", flag_type),
                           ("choices", choices), ("metavar", flag.metavar), ("help", flag.help)):
            if value is not None or key == "default" and not positional:
                kwargs[key] = value
        if kwargs.get("default") is dataclasses.MISSING:   # a required field
            if positional:
                del kwargs["default"]
            else:
                kwargs.update(default=None, required=True)
        elif flag.required:
            kwargs["required"] = True
        return names, kwargs, to_field

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add the flags to `parser` in the spec's order (then the fields the spec left out)."""
        groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
        for group, entry in self._entries:
            if callable(entry):
                entry(parser)
                continue
            names, kwargs = entry
            if group is not None and group not in groups:
                groups[group] = parser.add_mutually_exclusive_group()
            (parser if group is None else groups[group]).add_argument(*names, **kwargs)

    @property
    def dests(self) -> dict[str, str]:
        """argparse dest -> config field."""
        return {dest: name for dest, (name, _) in self._to_field.items()}

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The config fields read from parsed `args` (each through its Flag's to_field)."""
        out = {}
        for dest, (name, to_field) in self._to_field.items():
            value = getattr(args, dest)
            out[name] = to_field(value) if to_field else value
        return out
