"""What a model contract says: a `ModelSpec` of stages, blocks and their token mixers, by qualified module name (see
`vitlab.contract` for how techniques use it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch.nn as nn

__all__ = ["Mixer", "BlockSpec", "StageSpec", "ModelSpec", "MIXER_KINDS", "LAYOUTS", "ATTENTION_KINDS"]

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
