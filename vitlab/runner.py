"""Runners: anything that maps a batch of images to logits.

`eval`, `bench`, `predict` and `pareto` work on runners, so a model deployed to an inference engine (an int8
OpenVINO graph, say) is measured exactly like a PyTorch model. The contract:

    runner(images: float tensor (B, C, H, W), normalized as `runner.preprocessing` says) -> logits (B, num_classes)

plus the attributes `input_size` (C, H, W), `num_classes`, `techniques` (the applied stack), `engine` (a short
name: "torch", "openvino", ...) and `close()`. A runner owns its own threads and precision settings.
"""
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from .techniques import applied_techniques

__all__ = ["Runner", "TorchRunner", "as_runner", "example_shape", "item_shape", "model_input_size"]


@runtime_checkable
class Runner(Protocol):
    input_size: tuple[int, int, int]
    num_classes: int
    techniques: tuple
    engine: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) a timm model was built for, from its pretrained_cfg / patch_embed."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    in_chans = getattr(model, "in_chans", None) or getattr(getattr(model, "patch_embed", None), "in_chans", None)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        c = in_chans or cfg.get("input_size", (3,))[0]
        return int(c), int(h), int(w)
    if "input_size" in cfg:
        c, h, w = cfg["input_size"]
        return int(in_chans or c), int(h), int(w)
    raise ValueError(f"cannot tell the input size of {type(model).__name__}; pass img_size and in_chans explicitly")


def item_shape(runner) -> tuple[int, ...]:
    """Shape of one input item of a runner (or model): its (C, H, W), with the clip length inserted, (C, T, H, W),
    when the module is a video model (it has `num_frames`)."""
    c, h, w = runner.input_size if hasattr(runner, "input_size") else model_input_size(runner)
    frames = getattr(getattr(runner, "module", runner), "num_frames", None)
    return (c, int(frames), h, w) if frames else (c, h, w)


def example_shape(model: nn.Module) -> tuple[int, ...]:
    """Shape of one input item: (C, H, W), or (C, T, H, W) for a video model (one with `num_frames`, e.g. ViViT),
    for building example inputs (tracing, FLOP counts, calibration stand-ins)."""
    c, h, w = model_input_size(model)
    frames = getattr(model, "num_frames", None)
    return (c, int(frames), h, w) if frames else (c, h, w)


@dataclass
class TorchRunner:
    """A PyTorch module as a runner: eval mode, inference_mode, optional bf16 autocast / channels_last / compile."""

    module: nn.Module
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    engine: str = "torch"
    input_size: tuple[int, int, int] = field(init=False)
    num_classes: int = field(init=False)

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype {self.dtype!r} is not supported by the torch runner; use fp32 or bf16")
        self.module.eval()
        self.input_size = model_input_size(self.module)
        self.num_classes = int(getattr(self.module, "num_classes", 0))
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self._forward = torch.compile(self.module) if self.compile else self.module

    @property
    def techniques(self) -> tuple:
        return applied_techniques(self.module)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            out = self._forward(images)
        if isinstance(out, torch.Tensor):
            return out.float()
        # a dense model (vitlab.dense) returns a dict of tensors (and lists of dicts): each float, as logits are
        return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.float(), out)

    def close(self) -> None:
        pass


def as_runner(obj: Any, **options) -> Runner:
    """Wrap an nn.Module in a TorchRunner; pass a runner through unchanged (options then must be empty)."""
    if isinstance(obj, nn.Module):
        return TorchRunner(obj, **options)
    if isinstance(obj, Runner):
        if any(v for v in options.values()):
            raise ValueError(f"{type(obj).__name__} is already a runner; options {options} apply to PyTorch models only")
        return obj
    raise TypeError(f"expected an nn.Module or a runner (images -> logits), got {type(obj).__name__}")
