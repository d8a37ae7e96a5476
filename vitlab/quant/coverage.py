"""How much of a model quantization covers: `quant_mac_fraction`, the MACs executed by quantized operations over
all MACs, the stem and the head left out of both (they stay float by design).

MACs are counted as `vitlab.profiling.flops` counts them (torch's FlopCounterMode with vitlab's formulas for fused
attention), per module, on one image of the model's input size. Quantized: every QuantLinear / QuantConv2d, the
attention matmuls run by the attention adapters (`vitlab.quant.sim`: the ops an adapter's forward runs itself,
outside its child layers) and the SDPA calls and activation matmuls QuantAttentionOps intercepts. Everything else
that multiplies (attention modules' einsums, functional linears, FFTs, Linear and Conv2d subclasses) counts as
float.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..profiling.flops import per_module_macs
from ..runner import example_shape
from .sim import (QuantAttentionOps, _QuantWeight, float_layer_names, quant_layers, quantizes_attention_matmuls,
                  unwrap_uncalled_)

__all__ = ["module_macs", "quant_mac_fraction", "settle_"]


def module_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, dict[str, int]]:
    """(total MACs, {module name: MACs of its calls, children included}) of `model(example)` in eval mode; a
    module that ran no counted op is absent."""
    was_training = model.training
    model.eval()
    try:
        total, per_module = per_module_macs(model, example)
    finally:
        model.train(was_training)
    per_module.pop("", None)
    return total, per_module


def _macs_of(name: str, module: nn.Module, macs: dict[str, int]) -> int:
    """MACs of `module` (named `name`): its own count, or its nearest counted descendants' (containers such as a
    ModuleList are never called, so they have no count of their own)."""
    if name in macs:
        return macs[name]
    return sum(_macs_of(f"{name}.{n}" if name else n, child, macs) for n, child in module.named_children())


def _own_macs(name: str, module: nn.Module, macs: dict[str, int]) -> int:
    """MACs a module's forward runs itself, outside its child modules (an attention adapter's matmuls)."""
    return macs.get(name, 0) - sum(_macs_of(f"{name}.{n}", child, macs) for n, child in module.named_children())


def quant_mac_fraction(model: nn.Module, total: int, macs: dict[str, int]) -> float | None:
    """Quantized MACs / all MACs of a wrapped model, stem and head excluded (`module_macs` gives total, macs);
    None for a model whose MACs are all in its stem and head."""
    stem, head = float_layer_names(model)
    modules = dict(model.named_modules())
    counted = total - sum(_macs_of(n, modules[n], macs) for n in stem + head)
    quantized = 0
    for name, module in modules.items():
        if isinstance(module, _QuantWeight):
            quantized += macs.get(name, 0)
        elif quantizes_attention_matmuls(module):
            quantized += _own_macs(name, module, macs)
        elif isinstance(module, QuantAttentionOps):
            quantized += module.quantized_macs     # its intercepted calls, during the same forward pass
    return quantized / counted if counted > 0 else None


def settle_(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """After `wrap_model`: one counted forward pass (quantizers off) on `example` (default: one zero image of the
    model's input size) that turns quantized layers the forward never calls back into float layers, fixes the
    attention call sites (`unwrap_uncalled_`) and sets `model.quant_mac_fraction` and `model.quant_input_size`.
    Without an example, a model whose input size is unknown, or whose forward refuses the size its config names (a model
    built for another img_size that does not say so), keeps its layers, gets no attention call sites and a
    quant_mac_fraction of None."""
    guessed = example is None
    try:
        if guessed:
            param = next(model.parameters())
            example = torch.zeros(1, *example_shape(model), device=param.device)
        for m in model.modules():
            if isinstance(m, QuantAttentionOps):
                m.quantized_macs = 0
        total, macs = module_macs(model, example)
    except Exception:   # noqa: BLE001 - only a guessed input: whatever the model raises at a size it was not built for
        if not guessed:
            raise
        unwrap_uncalled_(model, {name for name, _ in quant_layers(model)})
        model.quant_mac_fraction = model.quant_input_size = None
        return model
    unwrap_uncalled_(model, {name for name, _ in quant_layers(model) if macs.get(name, 0) > 0})
    model.quant_mac_fraction = quant_mac_fraction(model, total, macs)
    model.quant_input_size = tuple(example.shape[1:])
    return model
