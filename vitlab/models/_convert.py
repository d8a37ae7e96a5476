"""Converters from other implementations' weights to vitlab models.

`from_transformers(model_or_dir)` takes a Hugging Face transformers model (or a folder saved with
`save_pretrained`) and returns the equivalent vitlab model with its weights. Each family registers a converter for
the HF `model_type` it covers:

    @register_hf_converter("cvt")
    def _cvt_from_hf(hf_model) -> nn.Module: ...
"""
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

__all__ = ["from_transformers", "register_hf_converter"]

_HF_CONVERTERS: dict[str, Callable[[Any], nn.Module]] = {}


def register_hf_converter(model_type: str) -> Callable:
    def decorator(fn: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        _HF_CONVERTERS[model_type] = fn
        return fn

    return decorator


def from_transformers(model_or_dir: Any) -> nn.Module:
    """The vitlab model equivalent to a transformers image-classification model, with its weights copied."""
    if isinstance(model_or_dir, (str, Path)):
        try:
            from transformers import AutoModelForImageClassification
        except ImportError:
            raise ImportError("from_transformers needs the transformers package: pip install 'vitlab[hf]'") from None
        # use_safetensors: never unpickle a .bin from a folder of unknown origin
        model_or_dir = AutoModelForImageClassification.from_pretrained(str(model_or_dir), use_safetensors=True)
    model_type = getattr(getattr(model_or_dir, "config", None), "model_type", None)
    if model_type not in _HF_CONVERTERS:
        raise ValueError(f"no vitlab converter for transformers model_type {model_type!r}; "
                         f"supported: {', '.join(sorted(_HF_CONVERTERS)) or 'none'}")
    return _HF_CONVERTERS[model_type](model_or_dir).eval()
