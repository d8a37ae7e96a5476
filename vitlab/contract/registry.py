"""The adapter registry: which function describes a model class (`register_adapter`), and `describe`, which finds
it through the class's MRO (the built-in adapters of `vitlab.contract.families` register on first use)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..techniques import TechniqueNotApplicable
from .spec import ModelSpec

__all__ = ["NoAdapter", "describe", "register_adapter", "has_adapter", "adapter_families"]


class NoAdapter(TechniqueNotApplicable):
    """No contract adapter describes this model's class."""

    def __init__(self, technique: str, model: nn.Module):
        super().__init__(technique, model, "no model-contract adapter describes it; it supports the families in "
                         f"vitlab.contract.adapter_families() ({', '.join(adapter_families())}); register one with "
                         "vitlab.contract.register_adapter")


_ADAPTERS: dict[type, Callable[[nn.Module], ModelSpec]] = {}


def register_adapter(*classes: type):
    """Decorator: `fn(model) -> ModelSpec` describes models of these classes (and their subclasses)."""
    def decorator(fn):
        for cls in classes:
            _ADAPTERS[cls] = fn
        return fn
    return decorator


def _adapter(model: nn.Module):
    from . import families  # noqa: F401  (registers the built-in adapters; here, not on top: it imports this module)

    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


def has_adapter(model: nn.Module) -> bool:
    return _adapter(model) is not None


def adapter_families() -> list[str]:
    from . import families  # noqa: F401

    return sorted({cls.__name__ for cls in _ADAPTERS})


def describe(model: nn.Module, technique: str = "this technique") -> ModelSpec:
    """The model's `ModelSpec`; `NoAdapter` (a TechniqueNotApplicable naming `technique`) when none describes it."""
    fn = _adapter(model)
    if fn is None:
        raise NoAdapter(technique, model)
    return fn(model)
