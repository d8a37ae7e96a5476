"""What `vitlab.apply_` and `vitlab.deploy` run for each quantization config (registered by config type, `register_handler`).

`ptq`, in this order: wrap (quantizers off) -> `smooth` (vitlab.quant.mptq.smooth_) or `repq`
(vitlab.quant.repq.reparameterize_layernorm_), before any observation ->
calibrate -> `bits` (vitlab.quant.mptq.allocate_bits, on the calibrated model; it changes bit widths with
set_bits and re-finalizes); returns the model. `w8a8`, `w8` and `bf16` deploy to an engine (vitlab.quant.deploy)
and return a runner. A model whose graph changes per input is refused by name, and so is a refusal of the shared
machinery, under the technique's own name.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..record import record
from ..runner import example_shape
from ..techniques import TechniqueNotApplicable, format_technique, register_handler
from . import mptq, repq
from .calibration import CalibrationError, calibrate, prepare_
from .configs import BF16, PTQ, W8, W8A8, RepQ
from .deploy import deploy_bf16, deploy_w8, deploy_w8a8


def _require_calib(cfg: Any, calib: Any) -> None:
    if calib is None:
        raise CalibrationError(f"{format_technique(cfg)} calibrates on images: pass --data SPEC (calibration images, "
                               "from --calib-split train or val) or apply_(..., calib=[image batches])")


@contextlib.contextmanager
def _named(cfg) -> Iterator[None]:
    """Re-raise a refusal from the shared quantization machinery under this technique's own name."""
    try:
        yield
    except TechniqueNotApplicable as e:
        name = format_technique(cfg)
        if str(e).startswith(name):
            raise
        raise TechniqueNotApplicable(name, e.model_class, e.why) from None


def _refuse_dynamic(model: Any, cfg) -> None:
    """A model whose graph changes per input (`dynamic_graph`: why) is refused by name: calibration and tracing see
    one graph."""
    why = getattr(model, "dynamic_graph", None)
    if why:
        raise TechniqueNotApplicable(format_technique(cfg), model, f"{why}; quantization supports models with one "
                                     "static graph")


# How a dense model (dict outputs) goes through an engine: vitlab.dense.apply registers `deploy_dense` here when
# vitlab.dense loads, which it has whenever a dense model exists (dense sits above quant: it builds on the contract).
_DENSE: dict[str, Callable[[nn.Module, Callable[[nn.Module], Any], torch.Tensor], Any]] = {}


def register_dense_deploy(deploy: Callable[[nn.Module, Callable[[nn.Module], Any], torch.Tensor], Any]) -> None:
    """Deploy dense models with `deploy(model, engine_handler, example)` (the engine sees flat tensor outputs)."""
    _DENSE["deploy"] = deploy


def _dense(model: Any) -> bool:
    """Whether `model` is a dense-prediction model (its forward returns a dict: vitlab.dense)."""
    return isinstance(model, nn.Module) and record(model).dense is not None


@register_handler(PTQ)
def _apply_ptq(model: nn.Module, cfg: PTQ, calib=None) -> nn.Module:
    _refuse_dynamic(model, cfg)
    _require_calib(cfg, calib)
    calib = list(calib)
    with _named(cfg):
        prepare_(model, cfg, example=calib[0][:1])
    if cfg.smooth:
        mptq.smooth_(model, calib, cfg)
    if cfg.repq:
        with _named(cfg):
            repq.reparameterize_layernorm_(model, calib, cfg)
    calibrate(model, calib)
    if cfg.bits is not None:
        mptq.allocate_bits(model, calib, cfg)
    return model


@register_handler(RepQ)
def _apply_repq(model: nn.Module, cfg: RepQ, calib=None) -> nn.Module:
    _require_calib(cfg, calib)
    with _named(cfg):
        return _apply_ptq(model, cfg.ptq(), calib)


@register_handler(W8A8)
def _apply_w8a8(model: nn.Module, cfg: W8A8, calib=None):
    _require_calib(cfg, calib)
    _refuse_dynamic(model, cfg)
    with _named(cfg):
        if _dense(model):   # dict outputs: exported flat, the dict rebuilt (vitlab.dense.apply)
            return _DENSE["deploy"](model, lambda flat: deploy_w8a8(flat, cfg, list(calib)), list(calib)[0])
        return deploy_w8a8(model, cfg, list(calib))


@register_handler(W8)
def _apply_w8(model: nn.Module, cfg: W8, calib=None):
    _refuse_dynamic(model, cfg)
    with _named(cfg):
        if _dense(model):   # dict outputs: exported flat, the dict rebuilt (vitlab.dense.apply)
            return _DENSE["deploy"](model, lambda flat: deploy_w8(flat, cfg), torch.zeros(1, *example_shape(model)))
        return deploy_w8(model, cfg)


@register_handler(BF16)
def _apply_bf16(model: nn.Module, cfg: BF16):
    _refuse_dynamic(model, cfg)
    if _dense(model):   # dict outputs: exported flat, the dict rebuilt (vitlab.dense.apply)
        return _DENSE["deploy"](model, lambda flat: deploy_bf16(flat, cfg), torch.zeros(1, *example_shape(model)))
    return deploy_bf16(model, cfg)
