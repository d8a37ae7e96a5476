"""Post-training quantization as verbs: `quantize_` quantizes a model in one call; its two steps are `prepare_`,
which puts fake quantizers (mode "off") at every site a `PTQ` config asks for, and `calibrate`, which observes
images, finalizes every quantizer and switches them on.

    vitlab.quantize_(model, PTQ(w=6, a=6, quantizer="percentile"), calib=calib_batches)   # quantized, in place
    prepare_(model, PTQ(w=6, a=6))                                   # or in two steps: quantizers, mode "off"
    vitlab.calibrate(model, calib_batches, num_images=256)           # observe, finalize, switch to "quant"
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from ..record import update_record
from ..techniques import TechniqueError
from .configs import PTQ
from .coverage import settle_
from .sim import is_quantized, quant_layers, quantizers, set_quant_mode, wrap_model

__all__ = ["CalibrationError", "prepare_", "quantize_", "calibrate", "quant_mac_fraction_of"]


class CalibrationError(TechniqueError):
    """Calibration that cannot run (no images, a quantizer that saw nothing); the message says what to pass."""


def quant_mac_fraction_of(model_or_runner) -> float | None:
    """The `quant_mac_fraction` of a quantized model or deployed runner (MACs run by quantized ops over all MACs,
    stem and head excluded; `vitlab.quant.coverage`); None when it was not quantized by vitlab's sites (float,
    bf16, NNCF's own calibration)."""
    runner = model_or_runner
    for obj in (runner, getattr(runner, "sim_module", None), getattr(runner, "module", None)):
        if getattr(obj, "quant_mac_fraction", None) is not None:
            return float(obj.quant_mac_fraction)
    return None


def quantize_(model: nn.Module, cfg: PTQ | None = None, *, calib: Any, num_images: int | None = None,
              example: torch.Tensor | None = None) -> nn.Module:
    """Quantize `model` in place with `cfg` (default `PTQ()`): `prepare_` it, then `calibrate` it on `calib` (image
    batches, preprocessed for the model; up to `num_images` of them). Returns the model, computing in the quantized
    form. For an int8 engine instead of simulated quantization, `vitlab.deploy(model, W8A8(), calib=...)`."""
    if calib is None:
        raise CalibrationError("quantize_ calibrates on images: pass calib=[image batches] (preprocessed for the "
                               "model); to insert the quantizers alone, vitlab.quant.prepare_(model, cfg)")
    return calibrate(prepare_(model, cfg, example=example), calib, num_images=num_images)


def prepare_(model: nn.Module, cfg: PTQ | None = None, *, example: torch.Tensor | None = None) -> nn.Module:
    """Put fake quantizers at every site `cfg` (default `PTQ()`) asks for, in place, in mode "off" (the model
    still computes exactly what it did); then `calibrate` it. Returns the model, with `model.quant_mac_fraction`
    (the share of its MACs, stem and head excluded, that quantized ops run: `vitlab.quant.coverage`), counted on
    `example` (one image batch; default: zeros of the model's input size)."""
    cfg = PTQ() if cfg is None else cfg
    if not isinstance(cfg, PTQ):
        raise TechniqueError(f"quantize_ takes a PTQ config, got {type(cfg).__name__}; deploy with "
                             "vitlab.deploy(model, W8A8(), calib=...)")
    wrap_model(model, cfg)
    settle_(model, example)
    update_record(model, quant_config=cfg)
    return model


def _batches(loader_or_batches: Any) -> Iterable[torch.Tensor]:
    for item in loader_or_batches:
        if isinstance(item, (list, tuple)):  # (images, labels) from a DataLoader
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise CalibrationError(f"calibration batches must be image tensors (B, C, H, W), got {type(item).__name__}")
        yield item


@torch.no_grad()
def calibrate(model: nn.Module, loader_or_batches: Any, num_images: int | None = None) -> nn.Module:
    """Calibrate a `quantize_`d model: observe activations on up to `num_images` images (all, by default),
    compute every quantizer's parameters (weights from the weights themselves) and switch them to "quant".

    Refuses a model without quantizers, an empty image source, and a quantizer that observed nothing.
    """
    if not is_quantized(model):
        raise CalibrationError("calibrate: the model has no quantizers; call vitlab.quant.prepare_(model, PTQ(...)) "
                               "first (or quantize in one call: vitlab.quantize_(model, PTQ(...), calib=...))")
    if loader_or_batches is None:
        raise CalibrationError("calibration needs images: pass --data SPEC (calibration images come from its "
                               "--calib-split, default train) or calib=[image batches]")
    weight_quants = {id(m.weight_quant) for _, m in quant_layers(model)}
    was_training = model.training
    model.eval()
    for _, q in quantizers(model):
        q.reset_observations()
    set_quant_mode(model, "observe", weights=False)
    for _, m in quant_layers(model):
        m.weight_quant.mode = "off"
    seen = 0
    try:
        for batch in _batches(loader_or_batches):
            if num_images is not None:
                batch = batch[: max(0, num_images - seen)]
            if len(batch) == 0:
                break
            model(batch)
            seen += len(batch)
    finally:
        for _, q in quantizers(model):
            q.mode = "off"
        model.train(was_training)
    if seen == 0:
        raise CalibrationError("calibration saw no images: the calibration data is empty (pass --calib-images >= 1)")
    for name, m in quant_layers(model):
        m.weight_quant.observe(m.weight)
    named = list(quantizers(model))
    for name, q in named:
        if q.num_observed == 0:
            where = "weight" if id(q) in weight_quants else "activation"
            raise CalibrationError(f"quantizer {name} ({where}) observed nothing during calibration on {seen} images: "
                                   "that part of the model never ran")
    # quantizers whose search reads another quantizer (AdaLog's output objective reads V's / the weight's) go last
    for name, q in sorted(named, key=lambda item: bool(getattr(item[1], "finalize_last", False))):
        q.finalize()
    set_quant_mode(model, "quant")
    update_record(model, calibration={"images": seen})
    return model
