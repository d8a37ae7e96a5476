"""The model contract: how techniques see a model, whatever its family.

    spec = vitlab.contract.describe(model)
    spec.stages[i].blocks[j].mixers[0].kind   # "attention", "window_attention", "conv", "pool", "spectral", ...
    spec.blocks                               # every block in execution order

A `ModelSpec` names, by qualified module name, a model's stem (the layers that see pixels), its head (the
classifier), its stages and their blocks; each block its token mixers (attention with q/k/v and heads, windowed,
neighborhood, spatial-reduction, conv or pooling mixers, spectral filters, ...), its MLPs, the layout of the
tensor it takes ("sequence" (B, N, C) with prefix tokens first; "nhwc"; "nchw") and whether it needs the H x W
grid (a depthwise conv in its MLP, a conv position embedding, spatial reduction): token reduction needs a sequence
block with global attention that does not. Techniques read the spec instead of testing class names; a new family
gets them by registering one adapter (`register_adapter`). Adapters for timm's families and vitlab's zoo live in
`vitlab.contract.families`; `tests/test_contract.py` checks every adapter's claims (module names exist, layouts
match what a forward pass feeds each block, heads and dims match the weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch.nn as nn

from ..techniques import TechniqueNotApplicable

__all__ = ["Mixer", "BlockSpec", "StageSpec", "ModelSpec", "NoAdapter", "describe", "register_adapter",
           "has_adapter", "adapter_families", "MIXER_KINDS", "LAYOUTS", "ATTENTION_KINDS"]

MIXER_KINDS = ("attention", "window_attention", "neighborhood_attention", "sra_attention", "conv_attention",
               "group_attention", "positional_attention", "retention", "class_attention", "outlook_attention",
               "conv", "pool", "spectral", "gnconv")
ATTENTION_KINDS = frozenset(MIXER_KINDS[:10])   # mixers computing softmax(q k^T) v over some neighbourhood
LAYOUTS = ("sequence", "nhwc", "nchw")


@dataclass
class Mixer:
    """One token mixer of a block. `name` is relative to the block; `qkv` and `proj` relative to the mixer."""

    kind: str
    name: str
    module: nn.Module
    num_heads: int | None = None
    head_dim: int | None = None
    qkv: tuple[str, ...] = ()          # ("qkv",) fused, ("q", "kv"), ("q", "k", "v"), ("qk", "v"), ...
    proj: str | None = None
    global_tokens: bool = False        # every token of the block's sequence attends to every other token

    def __post_init__(self):
        if self.kind not in MIXER_KINDS:
            raise ValueError(f"mixer kind {self.kind!r} is not one of {MIXER_KINDS}")


@dataclass
class BlockSpec:
    """One block: `name` is its qualified name; `mlps` are relative names of its channel MLPs."""

    name: str
    module: nn.Module
    mixers: tuple[Mixer, ...]
    mlps: tuple[str, ...]
    layout: str
    needs_grid: bool                   # it uses the H x W arrangement of its tokens (conv, window, grid reshape)
    num_prefix_tokens: int = 0         # class/distillation/register tokens at the front of the sequence
    residual: bool = True              # x + f(x) around every mixer and MLP: the whole block can be dropped

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"block layout {self.layout!r} is not one of {LAYOUTS}")

    @property
    def mixer(self) -> Mixer | None:
        return self.mixers[0] if self.mixers else None

    @property
    def token_reducible(self) -> bool:
        """True when merging or dropping tokens of its input keeps the block well defined (ToMe, EViT, ...)."""
        return (self.layout == "sequence" and not self.needs_grid and bool(self.mixers)
                and all(m.global_tokens for m in self.mixers))


@dataclass
class StageSpec:
    name: str
    blocks: list[BlockSpec]
    downsample: str | None = None      # qualified name of the module that changes resolution before the blocks


@dataclass
class ModelSpec:
    family: str
    model: nn.Module
    stages: list[StageSpec]
    stem: tuple[str, ...]              # modules that see pixels (the patch embedding's first layer(s))
    head: tuple[str, ...]              # classifier layers
    num_prefix_tokens: int = 0
    notes: str = ""

    @property
    def blocks(self) -> list[BlockSpec]:
        return [b for s in self.stages for b in s.blocks]

    def mixers(self, *kinds: str) -> Iterator[tuple[BlockSpec, Mixer]]:
        """(block, mixer) for every mixer, or only those of the given kinds."""
        for b in self.blocks:
            for m in b.mixers:
                if not kinds or m.kind in kinds:
                    yield b, m

    def qualified(self, block: BlockSpec, relative: str) -> str:
        return f"{block.name}.{relative}" if relative else block.name


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
    from . import families  # noqa: F401  (registers the built-in adapters)

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
