"""Post-training quantization of ViTs: simulated low-bit PTQ and real int8 deployment.

The library form::

    from vitlab.quant import PTQ, W8A8, prepare_
    vitlab.quantize_(model, PTQ(w=6, a=6, quantizer="percentile"), calib=calib_batches)   # simulated, in place
    runner = vitlab.deploy(model, W8A8(), calib=calib_batches)       # real int8 (ONNX Runtime or OpenVINO): a runner

    prepare_(model, PTQ(w=6, a=6))                                   # quantize_ in two steps: quantizers, mode "off"
    vitlab.calibrate(model, calib_batches, num_images=256)           # observe, finalize, switch to "quant"

or the technique form, as `--apply` does: `vitlab.apply_(model, PTQ(w=4, a=4, quantizer="adalog"),
calib=calib_batches)`.

`calib` is a list of preprocessed image batches (`vitlab.data.calibration_batches` takes a seeded subset of a
train / val split; the test split is refused). Configs are registered techniques of kind quantization:
`ptq` (simulated, any bit width; the model stays a PyTorch module), `w8a8` (weights and activations in int8 on a
real engine; returns a runner) and `w8` (weight-only int8 on the engine).

Where things live: configs.py (PTQ, W8A8, W8, BF16), calibration.py (`quantize_`, `prepare_`, `calibrate`),
handlers.py (what `apply_` and `deploy` run for each config), base.py / logquant.py / twin.py (quantizers), sim.py
(the fake-quant modules), deploy.py (engines), export.py (save / load / export; registers the "quantization"
checkpoint format), mptq.py, qhyvit.py, shiftadd.py (techniques built on them).
"""
from .base import (QUANTIZERS, MSEQuantizer, MinMaxQuantizer, PercentileQuantizer, Quantizer, QuantizerError,
                   UniformQuantizer, get_quantizer_class, make_quantizer, quantizer_names, register_quantizer)
from .calibration import CalibrationError, calibrate, prepare_, quant_mac_fraction_of, quantize_
from .configs import BF16, PTQ, W8, W8A8, RepQ
from .export import load_quantized, save_quantized
from .sim import (QuantAttention, QuantAttentionOps, QuantConv2d, QuantLinear, QuantWindowAttention,
                  QuantWindowAttentionV2, is_quantized, quant_layers, quant_linears, quantizers, set_quant_mode,
                  wrap_model)
from . import handlers  # noqa: F401  (registers what apply_ runs for ptq, w8a8, w8 and bf16)
from . import qhyvit  # noqa: F401  (registers the `qhyvit` technique: Q-HyViT for hybrid ViTs)
from . import shiftadd  # noqa: F401  (registers `shiftadd`: ShiftAddViT's shift / add reparameterization)

__all__ = [
    "PTQ", "RepQ", "W8A8", "W8", "BF16", "calibrate", "prepare_", "quantize_", "Quantizer", "UniformQuantizer", "MinMaxQuantizer",
    "PercentileQuantizer", "MSEQuantizer", "QUANTIZERS", "register_quantizer", "make_quantizer", "quantizer_names",
    "QuantizerError", "QuantLinear", "QuantConv2d", "QuantAttention", "QuantWindowAttention", "QuantWindowAttentionV2",
    "QuantAttentionOps", "quantizers", "quant_layers", "set_quant_mode", "is_quantized", "CalibrationError",
    "save_quantized", "load_quantized", "quant_mac_fraction_of",
]
