"""One entry point for every explanation method: `vitlab.explain(model, images, method=...)`.

A method is a function `fn(model, images, target, **options) -> saliency` registered with `register_method(name)`:
`model` is an nn.Module in eval mode (a runner's float or simulated module), `images` (B, C, H, W) preprocessed as
the model expects, `target` (B,) the class index explained per image; it returns a non-negative saliency (B, h, w)
at any resolution (a token grid, a feature map). `explain` resizes it to the image (bilinear), scales each map to
[0, 1] and returns an `Explanation`. A method that cannot explain a model raises `ExplainError` naming the model,
the method and what would work instead.
"""
from __future__ import annotations

import importlib
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["Explanation", "ExplainError", "register_method", "explain", "method_names", "explained_module"]

Method = Callable[..., torch.Tensor]
_METHODS: dict[str, Method] = {}


class ExplainError(UserError):
    """A method cannot explain this model (e.g. rollout on a model without attention)."""


@dataclass(frozen=True)
class Explanation:
    """maps: (B, H, W) saliency in [0, 1] aligned with the input pixels; target: (B,) the classes explained;
    probs: (B,) the model's probability of `target`; extras: what the method also returns (per-layer attention,
    per-head maps, ...)."""

    maps: torch.Tensor
    method: str
    target: torch.Tensor
    probs: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


def register_method(name: str) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        _METHODS[name] = fn
        return fn
    return wrap


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def _load_builtin_methods() -> None:
    for module in ("attention", "gradcam", "tame", "tokens", "iared"):
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{module}":
                raise


def explained_module(model_or_runner: Any) -> nn.Module:
    """The nn.Module a method looks into: the model itself, or a runner's simulated twin (int8: the fake-quant
    model whose numbers the engine reproduces) or its torch module."""
    if isinstance(model_or_runner, nn.Module):
        return model_or_runner
    engine = str(getattr(model_or_runner, "engine", ""))
    if "int8" in engine and getattr(model_or_runner, "sim_module", "absent") is None:
        raise ExplainError(f"{engine} runs a graph with no simulated twin (NNCF's calibration): its attention and "
                           "gradients cannot be read and its float module is not what it runs; deploy with vitlab's "
                           "calibration (--apply w8a8) to explain it through its twin, or explain the checkpoint "
                           "before deployment")
    for attr in ("sim_module", "module", "float_module"):
        module = getattr(model_or_runner, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise ExplainError(f"{type(model_or_runner).__name__} is not a model vitlab can look into: pass an nn.Module or "
                       "a vitlab runner")


def normalize_maps(saliency: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) non-negative saliency -> (B, H, W) bilinear to `size`, each map scaled to [0, 1] (a constant map
    becomes all zeros)."""
    maps = F.interpolate(saliency.detach().float()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = maps.flatten(1).amin(1)[:, None, None]
    hi = maps.flatten(1).amax(1)[:, None, None]
    return torch.where(hi > lo, (maps - lo) / (hi - lo).clamp(min=1e-12), torch.zeros_like(maps))


def explain(model: Any, images: torch.Tensor, method: str = "rollout", target: torch.Tensor | int | None = None,
            **options) -> Explanation:
    """Explain `model`'s decision on `images` (B, C, H, W) with `method` (see `method_names()`); `target`: the
    class per image (default: the model's top-1)."""
    _load_builtin_methods()
    if method not in _METHODS:
        raise ExplainError(f"--method {method!r} is not an explanation method; choose one of "
                           f"{', '.join(sorted(_METHODS))}")
    if images.dim() != 4:
        raise ExplainError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    module = explained_module(model).eval()
    with torch.no_grad():
        probs_all = module(images).softmax(-1)
    if target is None:
        target = probs_all.argmax(-1)
    elif isinstance(target, int):
        target = torch.full((len(images),), target, dtype=torch.long)
    saliency = _METHODS[method](module, images, target, **options)
    extras = {}
    if isinstance(saliency, tuple):
        saliency, extras = saliency
    if saliency.dim() != 3 or len(saliency) != len(images):
        raise RuntimeError(f"explanation method {method!r} returned shape {tuple(saliency.shape)}, not (B, h, w)")
    maps = normalize_maps(saliency.clamp(min=0), tuple(images.shape[-2:]))
    return Explanation(maps, method, target, probs_all.gather(1, target[:, None])[:, 0], extras)


class CallableModule(types.ModuleType):
    """The class of the `vitlab.explain` package: `vitlab.explain(model, images, method=...)` calls `explain`;
    `vitlab.explain.<name>` is the package."""

    def __call__(self, *args, **kwargs) -> Explanation:
        return explain(*args, **kwargs)
