"""Training recipes: named changes to what one training step computes, `vitlab train --recipe NAME:key=value,...`.

A recipe is a dataclass whose typed fields are its options (the same `key=value` grammar as `--apply`), registered
with `@register_recipe("name")`. The engine builds it once per run (and again on `--resume`, from the same text),
calls `setup` before the optimizer is built, trains `parameters()` beside the model's (heads a recipe adds but the
checkpoint does not keep), and takes each step's loss from `loss(step)`; `step.default_loss()` is the loss the
engine would have used (cross-entropy with label smoothing or mixup targets, distillation, L1).

    @register_recipe("double")
    @dataclass
    class Double(Recipe):
        weight: float = 2.0

        def loss(self, step: Step) -> torch.Tensor:
            return self.weight * step.default_loss()

Which images a step holds is fixed by (seed, epoch, step) — `step.indices` are their dataset indices and their
augmentation is seeded per image — so a recipe can precompute something per image and replay it (TinyViT's stored
teacher logits).
"""
import dataclasses
import importlib
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import UserError
from .techniques import parse_options

__all__ = ["Recipe", "RecipeError", "Step", "format_recipe", "parse_recipe", "recipe_class", "recipe_names",
           "register_recipe"]

_RECIPES: dict[str, type] = {}


class RecipeError(UserError):
    """An unknown recipe, or a recipe option that is unknown or has a bad value."""


@dataclass
class Step:
    """What a recipe sees of one training step (this process's share of the global batch under DDP)."""

    model: nn.Module              # the model being trained (not DDP-wrapped)
    train_model: nn.Module        # what to call for a forward that synchronises gradients (DDP under torchrun)
    images: torch.Tensor          # (B, C, H, W) augmented, normalised
    targets: torch.Tensor         # (B,) class indices
    soft: torch.Tensor | None     # (B, classes) mixup/cutmix targets, else None
    indices: list[int]            # dataset index of each image
    epoch: int
    step: int                     # step within the epoch
    global_step: int
    default_loss: Callable[[], torch.Tensor]


class Recipe:
    """Base class; subclasses are dataclasses whose fields are the recipe's options."""

    name: str = ""

    def setup(self, model: nn.Module, train_set: Any, cfg: Any, rt: Any) -> None:
        """Called once before the optimizer is built (`cfg`: the TrainConfig, `rt`: the runtime)."""

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters (not saved in the checkpoint)."""
        return []

    def loss(self, step: Step) -> torch.Tensor:
        return step.default_loss()


def register_recipe(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if not dataclasses.is_dataclass(cls) or not issubclass(cls, Recipe):
            raise TypeError(f"recipe {name!r}: {cls.__name__} must be a dataclass subclassing Recipe")
        if name in _RECIPES and _RECIPES[name] is not cls:
            raise ValueError(f"recipe {name!r} is already registered by {_RECIPES[name].__name__}")
        cls.name = name
        _RECIPES[name] = cls
        return cls

    return decorator


def _load_builtin_recipes() -> None:
    """Import the modules that register vitlab's own recipes."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module, __package__)


_BUILTIN_MODULES: list[str] = [   # modules under vitlab that call register_recipe
    ".engine.fastkd",
    ".tokens.sparsifiner",
    ".tokens.slim",        # frd (Self-slimmed ViT)
    ".tokens.iared",       # iared (IA-RED² REINFORCE)
    ".engine.deit_lt",
    ".engine.resformer",
    ".engine.ecl",         # ecl (EventTransAct's Event-Contrastive Loss)
    ".models.paab",        # paat (PoseAwareVT's auxiliary joint-in-patch task)
    ".quant.shiftadd",     # shiftadd (ShiftAddViT's latency-aware load balance)
]


def recipe_names() -> list[str]:
    _load_builtin_recipes()
    return sorted(_RECIPES)


def recipe_class(name: str) -> type:
    _load_builtin_recipes()
    if name not in _RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; recipes are {', '.join(sorted(_RECIPES)) or 'none'}")
    return _RECIPES[name]


def parse_recipe(text: str) -> Recipe:
    """`NAME` or `NAME:key=value,...` -> a recipe instance (options coerced to their annotated types)."""
    name, _, rest = text.strip().partition(":")
    try:
        cls = recipe_class(name)
    except RecipeError as e:
        raise RecipeError(f"{e} (in --recipe {text!r})") from None
    fields = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    kwargs = parse_options(text, rest, name, fields, typing.get_type_hints(cls), "--recipe", RecipeError)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{name}: {e} (in --recipe {text!r})") from None


def format_recipe(recipe: Recipe) -> str:
    """The `--recipe` text of an instance; options at their defaults are omitted."""
    parts = []
    for f in dataclasses.fields(recipe):
        if not f.init:
            continue
        value = getattr(recipe, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if value != default:
            parts.append(f"{f.name}={'/'.join(map(str, value)) if isinstance(value, (tuple, list)) else value}")
    return recipe.name + (":" + ",".join(parts) if parts else "")
