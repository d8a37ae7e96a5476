"""RepQ-ViT's scale reparameterization (Li et al., "RepQ-ViT: Scale Reparameterization for Post-Training
Quantization of Vision Transformers", ICCV 2023), as a PTQ baseline: `--apply repq:w=4,a=4` (the same as
`ptq:w=4,a=4,repq=true,quantizer=logsqrt2,post_gelu=false`).

Semantics read from the official code (github.com/zkkli/RepQ-ViT, `classification/test_quant.py`, the
`scale_reparam` step) and re-written here:

* **Post-LayerNorm activations** vary strongly between channels, so they are calibrated per channel: asymmetric
  min-max at `a` bits, step d_c and zero point z_c of channel c (range widened to include 0). Then the per-channel
  quantizer is turned into a per-tensor one with step mean(d) and zero point mean(z) by rescaling: r_c = d_c /
  mean(d) and b_c = -z_c d_c / r_c + mean(z) mean(d); the LayerNorm's affine becomes gamma / r, beta / r - b and
  the Linear that reads it W diag(r), bias + W diag(r) b. The float model computes exactly what it did, and the
  per-tensor grid (mean(d), mean(z)) on the new activations is the per-channel grid on the old ones
  (`repq_factors`; tests/quant/test_quant_repq.py checks both). vitlab then calibrates that site's per-tensor
  quantizer on the reparameterized activations as usual (min-max recovers mean(d) up to the rounding of the zero
  point; `act_quantizer` chooses).
* **Post-softmax activations** use a log-sqrt(2) quantizer (`quantizer=logsqrt2`: levels 2 ** (-k / 2)), which RepQ
  turns into a log2 quantizer at deployment by splitting odd and even codes (the same values); in simulation the
  two are the same numbers, so vitlab simulates log-sqrt(2). Post-GELU stays uniform in RepQ-ViT:
  `post_gelu=false` gives fc2's input `act_quantizer`.

Where it applies: every LayerNorm whose output only one Linear reads (`norm1 -> attn.qkv`, `norm2 -> mlp.fc1` of
timm blocks, the pairs MPTQ's smoothing uses, each checked by folding a random rescaling in and comparing the
model's output: a post-norm block such as Swin V2's is skipped); a model without such a pair is refused. RepQ-ViT also rescales Swin's
patch-merging `norm -> reduction`; vitlab does not (those stay per-tensor quantized as calibrated).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..record import update_record
from ..techniques import TechniqueNotApplicable
from .base import QuantizerError
from .mptq import _pairs, observe_calibration, smooth_pair_
from .sim import quantizers

__all__ = ["repq_factors", "reparameterize_layernorm_"]


def repq_factors(x_min: Tensor, x_max: Tensor, bits: int) -> tuple[Tensor, Tensor, float, float]:
    """RepQ-ViT's per-channel -> per-tensor factors for activations with per-channel ranges [x_min, x_max].

    Returns (shift, scale, step, zero_point): the new activations are X' = (X - shift) / scale (per channel), and
    the per-tensor grid (step, zero_point) on X' equals the per-channel asymmetric min-max grid on X:
    X' / step + zero_point = X / d_c + z_c exactly. Channels with an empty range keep shift 0 and scale 1.
    """
    levels = 2 ** bits - 1
    lo, hi = x_min.clamp(max=0), x_max.clamp(min=0)
    live = (hi - lo) > 1e-8
    step_c = torch.where(live, (hi - lo) / levels, torch.ones_like(lo))
    zero_c = torch.where(live, torch.round(-lo / step_c), torch.zeros_like(lo))
    step, zero = float(step_c[live].mean()) if live.any() else 1.0, float(zero_c[live].mean()) if live.any() else 0.0
    scale = torch.where(live, step_c / step, torch.ones_like(lo))                      # r_c
    bias = torch.where(live, -zero_c * step_c / scale + zero * step, torch.zeros_like(lo))   # b_c: X' = X / r - b
    return bias * scale, scale, step, zero


@torch.no_grad()
def _channel_ranges(model: nn.Module, calib: Iterable[Tensor], pairs) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel (min, max) of each pair's Linear input over the calibration batches (running, not stored)."""
    ranges: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str):
        def observe(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            lo, hi = x.amin(dim=0), x.amax(dim=0)
            if name in ranges:
                lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
            ranges[name] = (lo, hi)
        return observe

    observe_calibration(model, calib, [linear.register_forward_pre_hook(hook(name)) for name, _, linear in pairs])
    return ranges


@torch.no_grad()
def reparameterize_layernorm_(model: nn.Module, calib: Iterable[Tensor], cfg: Any) -> nn.Module:
    """RepQ-ViT's post-LayerNorm scale reparameterization at `cfg.a` bits on every LayerNorm -> Linear pair, in place
    (float function unchanged). Call before calibration (quantizers in mode "off"). Records {layer: mean |log r|}
    (how unequal the channels' steps were) in `model.vitlab.repq`."""
    if any(q.mode != "off" for _, q in quantizers(model)):
        raise QuantizerError("repq reparameterizes before calibration (quantizers in mode 'off'): it changes the "
                             "weights and activations the quantizers would be calibrated on")
    calib = list(calib)
    if not calib:
        raise QuantizerError("repq: saw no calibration tokens; pass calibration images")
    pairs = _pairs(model, calib[0][:8])
    if not pairs:
        raise TechniqueNotApplicable("repq", model, "it has no LayerNorm -> Linear pair to reparameterize; repq "
                                     "supports blocks whose norm1 feeds attn.qkv or whose norm2 feeds mlp.fc1 "
                                     "(timm's ViT / Swin blocks): use ptq")
    ranges = _channel_ranges(model, calib, pairs)
    spread = {}
    for name, norm, linear in pairs:
        if name not in ranges:
            raise QuantizerError(f"repq: {name} saw no calibration tokens; pass calibration images")
        shift, scale, _, _ = repq_factors(*ranges[name], cfg.a)
        smooth_pair_(norm, linear, shift.to(linear.weight.dtype), scale.to(linear.weight.dtype))
        spread[name] = round(float(scale.log().abs().mean()), 4)
    update_record(model, repq=spread)
    return model
