"""Dense-prediction heads: the registry, `DenseModel` (backbone + head), and the two baseline heads.

A head is an `nn.Module` class registered with the tasks it can do::

    @register_head("semantic-fpn", tasks=("semantic",))
    class SemanticFPN(nn.Module):
        def __init__(self, channels: list[int], strides: list[int], num_classes: int, dim: int = 64): ...
        def forward(self, features: list[Tensor], image: Tensor) -> dict: ...

`features` are the backbone's stage maps (NCHW, finest first, see `vitlab.dense.backbone.Backbone`). A head that
must change the backbone itself (ViT-CoMer, ViDT, ECO-M2F) registers a whole-model builder instead:
`register_model_head(name, tasks, build)` with `build(backbone_name, num_classes, **options) -> nn.Module` mapping
`image -> output dict`. Head options come from the command line as `--head NAME:key=value,...`, read with the
types of the constructor's (or builder's) annotations.

`num_classes` is K, the classes a head predicts: things + stuff for panoptic and semantic (11 on fmnist-scenes),
things for detection (10). Output dicts (docs/dense.md): mask classification `{"pred_logits" [B, Q, K+1],
"pred_masks" [B, Q, h, w], "aux"}`, per-pixel `{"sem_logits" [B, K, h, w]}`, boxes `{"pred_logits" [B, Q, K+1],
"pred_boxes" [B, Q, 4] (cx, cy, w, h in 0-1), "aux"}`; class K is "no object".
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import typing
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..record import update_record
from ..errors import UserError
from ..techniques import parse_options
from .backbone import Backbone

__all__ = [
    "TASKS", "HeadError", "HeadEntry", "register_head", "register_model_head", "head_names", "get_head",
    "parse_head", "format_head", "DenseModel", "build_dense_model", "SemanticFPN", "DetrLite",
]

TASKS = ("panoptic", "semantic", "detection")

# Modules that register vitlab's heads on import (each head owner adds its module here).
_BUILTIN_HEADS: list[str] = [
    "vitlab.dense.kmax",
    "vitlab.dense.vidt",
    "vitlab.dense.comer",
    "vitlab.dense.eco_m2f",
]


class HeadError(UserError):
    """An unknown head, a head asked for a task it does not do, or a bad head option; names the choices."""


@dataclasses.dataclass(frozen=True)
class HeadEntry:
    """One registered head: `target` is the head class, or (`wraps_model`) the whole-model builder."""

    name: str
    tasks: tuple[str, ...]
    target: Callable[..., nn.Module]
    wraps_model: bool
    help: str

    def options(self) -> dict[str, inspect.Parameter]:
        """The keyword options `--head NAME:key=value` may set (everything but the positional inputs)."""
        return {n: p for n, p in self._parameters().items() if n not in _FILLED}

    def _parameters(self) -> dict[str, inspect.Parameter]:
        fn = self.target.__init__ if inspect.isclass(self.target) else self.target
        return {n: p for n, p in inspect.signature(fn).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def fills(self, name: str) -> bool:
        """Whether the builder takes `name` (in_chans, img_size), which vitlab fills from the data."""
        return name in self._parameters()

    def hints(self) -> dict[str, Any]:
        fn = self.target.__init__ if inspect.isclass(self.target) else self.target
        return typing.get_type_hints(fn)


_REGISTRY: dict[str, HeadEntry] = {}
# constructor / builder arguments vitlab fills (from the backbone and the data), never --head options
_FILLED = frozenset({"self", "channels", "strides", "num_classes", "backbone_name", "in_chans", "img_size",
                     "backbone_kwargs"})


def _check_tasks(name: str, tasks: tuple[str, ...]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"head {name!r}: tasks must be a non-empty subset of {TASKS}, got {tasks}")
    return tasks


def _first_doc_line(obj: object) -> str:
    return (inspect.getdoc(obj) or "").strip().split("\n")[0]


def register_head(name: str, tasks: tuple[str, ...]) -> Callable[[type], type]:
    """Class decorator: register head class `cls(channels, strides, num_classes, **options)` as `name`."""
    name = name.lower()
    tasks = _check_tasks(name, tasks)

    def decorator(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].target is not cls:
            raise ValueError(f"head {name!r} is already registered by {_REGISTRY[name].target.__qualname__}")
        _REGISTRY[name] = HeadEntry(name, tasks, cls, False, _first_doc_line(cls))
        return cls

    return decorator


def register_model_head(name: str, tasks: tuple[str, ...], build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a head that builds the whole model: `build(backbone_name, num_classes, **options)` returns a module
    mapping `image -> output dict` (it owns its backbone, e.g. ViDT inside Swin)."""
    name = name.lower()
    tasks = _check_tasks(name, tasks)
    if name in _REGISTRY and _REGISTRY[name].target is not build:
        raise ValueError(f"head {name!r} is already registered by {_REGISTRY[name].target.__qualname__}")
    _REGISTRY[name] = HeadEntry(name, tasks, build, True, _first_doc_line(build))
    return build


def _load_builtin_heads() -> None:
    """Import the modules that register vitlab's heads (they register on import)."""
    for module in _BUILTIN_HEADS:
        importlib.import_module(module)


def head_names(task: str | None = None) -> list[str]:
    """Registered head names (all, or those that do `task`)."""
    _load_builtin_heads()
    return sorted(n for n, e in _REGISTRY.items() if task is None or task in e.tasks)


def get_head(name: str, task: str | None = None) -> HeadEntry:
    """The entry of head `name`; a `HeadError` naming the choices if it is unknown or does not do `task`."""
    _load_builtin_heads()
    if task is not None and task not in TASKS:
        raise HeadError(f"unknown task {task!r}; tasks: classify, {', '.join(TASKS)}")
    entry = _REGISTRY.get(name.strip().lower())
    if entry is None:
        pool = head_names(task)
        raise HeadError(f"unknown head {name!r}; heads{f' for --task {task}' if task else ''}: "
                        f"{', '.join(pool) or 'none registered'}")
    if task is not None and task not in entry.tasks:
        raise HeadError(f"head {entry.name!r} supports --task {'/'.join(entry.tasks)}, not {task}; "
                        f"heads for --task {task}: {', '.join(head_names(task)) or 'none registered'}")
    return entry


def parse_head(text: str, task: str | None = None) -> tuple[HeadEntry, dict[str, Any]]:
    """Parse `NAME` or `NAME:key=value,...` into (entry, options), values typed by the constructor's annotations."""
    name, _, rest = text.strip().partition(":")
    entry = get_head(name, task)
    options, hints = entry.options(), entry.hints()
    return entry, parse_options(text, rest, f"head {entry.name}", list(options), hints, "--head", HeadError)


def format_head(name: str, options: dict[str, Any]) -> str:
    """The `--head` text of a head and its options (inverse of `parse_head`)."""
    parts = [f"{k}={'/'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in options.items()]
    return name + (":" + ",".join(parts) if parts else "")


class DenseModel(nn.Module):
    """A backbone with stage features and a registered head: `image -> head(backbone(image), image)`."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, image: torch.Tensor) -> dict[str, Any]:
        return self.head(self.backbone(image), image)


def build_dense_model(backbone: str | nn.Module, head: str, task: str, num_classes: int, *, in_chans: int = 1,
                      img_size: int = 64, head_options: dict[str, Any] | None = None,
                      backbone_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Backbone + registered head for `task` (or the whole model a `register_model_head` head builds).

    The model records what rebuilds it: `vitlab.dense` = {task, head, head_options, backbone, backbone_kwargs,
    num_classes, in_chans, img_size}, with the backbone's architecture (name + kwargs) in place of a checkpoint
    folder it was initialised from, and a `pretrained_cfg` with its input size (vitlab's runners read it).
    """
    entry = get_head(head, task)
    options = dict(head_options or {})
    unknown = sorted(set(options) - set(entry.options()))
    if unknown:
        raise HeadError(f"head {entry.name}: unknown option {unknown[0]!r}; options are "
                        f"{', '.join(entry.options()) or 'none'}")
    backbone_kwargs = dict(backbone_kwargs or {})
    if entry.wraps_model:
        if not isinstance(backbone, str):
            raise HeadError(f"head {entry.name} builds its own backbone: pass the backbone's name, not a module")
        if backbone_kwargs and not entry.fills("backbone_kwargs"):
            raise HeadError(f"head {entry.name} builds its own backbone from its name: drop the backbone kwargs "
                            f"{sorted(backbone_kwargs)} (--model-kwargs)")
        filled = {k: v for k, v in (("in_chans", in_chans), ("img_size", img_size),
                                    ("backbone_kwargs", backbone_kwargs)) if entry.fills(k)}
        model = entry.target(backbone, num_classes, **filled, **options)
        # a builder that starts from a checkpoint folder records its architecture, so the dense checkpoint
        # rebuilds without the folder
        spec = getattr(model, "backbone_spec", None)
        arch = ({"backbone": spec["name"], "backbone_kwargs": spec["kwargs"]} if spec is not None
                else {"backbone": backbone, "backbone_kwargs": backbone_kwargs})
    else:
        stages = Backbone(backbone, in_chans=in_chans, img_size=img_size, model_kwargs=backbone_kwargs)
        model = DenseModel(stages, entry.target(stages.channels, stages.strides, num_classes, **options))
        arch = {"backbone": stages.spec["name"], "backbone_kwargs": stages.spec["kwargs"]}
    update_record(model, dense={"task": task, "head": entry.name, "head_options": options, **arch,
                                "num_classes": num_classes, "in_chans": in_chans, "img_size": img_size})
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}),
                            "input_size": (in_chans, img_size, img_size), "num_classes": num_classes}
    model.in_chans, model.num_classes = in_chans, num_classes
    return model


# ------------------------------------------------------------------------------------------------ baseline heads

def _gn(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, dim), dim)


@register_head("semantic-fpn", tasks=("semantic",))
class SemanticFPN(nn.Module):
    """Semantic FPN (Kirillov et al., 2019, "Panoptic Feature Pyramid Networks"): per-pixel class logits.

    FPN (Lin et al., 2017; detectron2 `modeling/backbone/fpn.py`): a lateral 1x1 conv per stage, a top-down path
    (nearest 2x upsampling, summed into the finer lateral) and a 3x3 output conv. Semantic branch (detectron2
    `modeling/meta_arch/semantic_seg.py`, `SemSegFPNHead`): each level goes through max(1, log2(stride / s0))
    3x3 conv + GroupNorm + ReLU stages, each but the level at the finest stride s0 followed by a bilinear 2x
    upsampling, so every level arrives at stride s0; the levels are summed and a 1x1 conv gives `sem_logits`
    [B, K, H/s0, W/s0] (the loss and inference upsample them to the image).
    """

    def __init__(self, channels: list[int], strides: list[int], num_classes: int, dim: int = 64, conv_dim: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.output = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in channels)
        s0 = min(strides)
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            ups = int(round(math.log2(stride / s0)))
            layers: list[nn.Module] = []
            for k in range(max(1, ups)):
                layers += [nn.Conv2d(dim if k == 0 else conv_dim, conv_dim, 3, padding=1, bias=False), _gn(conv_dim),
                           nn.ReLU(inplace=True)]
                if ups:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor], image: torch.Tensor) -> dict[str, torch.Tensor]:
        # top-down: coarsest first, each upsampled (nearest) to the next finer lateral and summed into it
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 2, -1, -1):
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
        pyramid = [conv(p) for conv, p in zip(self.output, laterals)]
        size = pyramid[0].shape[-2:]
        fused = 0
        for head, p in zip(self.scale_heads, pyramid):
            y = head(p)   # [B, conv_dim, ~H/s0, ~W/s0]; resized where a stage's map is not an exact power of 2
            fused = fused + (y if y.shape[-2:] == size else F.interpolate(y, size=size, mode="bilinear",
                                                                           align_corners=False))
        return {"sem_logits": self.predictor(fused)}   # [B, K, H/s0, W/s0]


def sine_position_embedding(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """DETR's normalised 2-D sine position embedding [h*w, dim] (facebookresearch/detr
    `models/position_encoding.py`, `PositionEmbeddingSine(normalize=True)`, temperature 10000, scale 2*pi):
    half the channels encode y, half x, sin and cos interleaved."""
    npf = dim // 2
    y = (torch.arange(h, device=device, dtype=torch.float32) + 1) / (h + 1e-6) * 2 * math.pi
    x = (torch.arange(w, device=device, dtype=torch.float32) + 1) / (w + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(npf, device=device) // 2) / npf)
    pos_y = y[:, None] / dim_t                                       # [h, npf]
    pos_x = x[:, None] / dim_t                                       # [w, npf]
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    return torch.cat((pos_y[:, None].expand(h, w, npf), pos_x[None].expand(h, w, npf)), dim=2).flatten(0, 1)


class _DecoderLayer(nn.Module):
    """DETR's decoder layer, post-norm (detr `models/transformer.py`, `TransformerDecoderLayer.forward_post`): the
    query position is added to queries and keys of self-attention and to the queries of cross-attention, the
    memory position to the keys of cross-attention."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor,
                pos: torch.Tensor) -> torch.Tensor:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0])
        return self.norm3(tgt + self.mlp(tgt))


@register_head("detr-lite", tasks=("detection",))
class DetrLite(nn.Module):
    """DETR-style box head (Carion et al., 2020): `num_queries` learned queries, a `depth`-layer transformer decoder
    over the flattened finest and coarsest stage maps, class and box MLPs after every layer.

    "Lite": no transformer encoder (the backbone is the encoder) and two levels instead of one stride-32 map, so
    small items are seen at the finest stride; a learned level embedding tells the levels apart. As in DETR
    (`models/detr.py`): tgt starts at zero, query embeddings are positions, a shared final LayerNorm precedes the
    heads, the class head has K+1 outputs (K = no object), the box MLP has 3 layers and a sigmoid (cx, cy, w, h
    in 0-1), and every earlier layer's prediction goes to `aux` for the auxiliary losses.
    """

    def __init__(self, channels: list[int], strides: list[int], num_classes: int, num_queries: int = 20,
                 dim: int = 64, depth: int = 3, heads: int = 4, ffn: int = 128):
        super().__init__()
        self.levels = sorted({0, len(channels) - 1})   # finest and coarsest
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(channels[i], dim, 1), _gn(dim)) for i in self.levels)
        self.level_embed = nn.Parameter(torch.zeros(len(self.levels), dim))
        nn.init.normal_(self.level_embed, std=0.02)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.layers = nn.ModuleList(_DecoderLayer(dim, heads, ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.bbox_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                        nn.ReLU(inplace=True), nn.Linear(dim, 4))

    def forward(self, features: list[torch.Tensor], image: torch.Tensor) -> dict[str, Any]:
        memory, pos = [], []
        for k, (i, proj) in enumerate(zip(self.levels, self.input_proj)):
            f = proj(features[i])                                  # [B, dim, h, w]
            h, w = f.shape[-2:]
            memory.append(f.flatten(2).transpose(1, 2))            # [B, h*w, dim]
            pos.append(sine_position_embedding(h, w, f.shape[1], f.device) + self.level_embed[k])
        memory_t, pos_t = torch.cat(memory, 1), torch.cat(pos, 0)[None]   # [B, L, dim], [1, L, dim]
        query_pos = self.query_embed.weight[None].expand(memory_t.shape[0], -1, -1)   # [B, Q, dim]
        tgt = torch.zeros_like(query_pos)
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory_t, pos_t)
            hs = self.norm(tgt)
            outputs.append({"pred_logits": self.class_embed(hs), "pred_boxes": self.bbox_embed(hs).sigmoid()})
        return {**outputs[-1], "aux": outputs[:-1]}
