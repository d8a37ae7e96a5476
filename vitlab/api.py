"""The verbs of the top-level `vitlab` namespace that live in heavier subpackages (`vitlab.measure`, `quantize_`,
`calibrate`, `prune_`, `from_transformers`): thin wrappers that import their package on first call, so that
`import vitlab` does not pull in the profiling, quantization and pruning stacks."""
from .models import from_transformers as _from_transformers


__all__ = ["measure", "quantize_", "calibrate", "prune_", "from_transformers"]



def measure(*args, **kwargs):
    """See `vitlab.bench.measure.measure` (imported lazily: it pulls in the profiling stack)."""
    from .bench.measure import measure as _measure

    return _measure(*args, **kwargs)


def quantize_(model, cfg=None, *, calib, num_images=None):
    """See `vitlab.quant.quantize_`: quantize a model in place (fake quantizers at every site `cfg` asks for,
    calibrated on the image batches `calib`)."""
    from .quant import quantize_ as _quantize_

    return _quantize_(model, cfg, calib=calib, num_images=num_images)


def calibrate(model, loader_or_batches, num_images=None):
    """See `vitlab.quant.calibrate`: observe calibration images, finalize every quantizer, switch them on."""
    from .quant import calibrate as _calibrate

    return _calibrate(model, loader_or_batches, num_images=num_images)


def prune_(model, cfg=None, *, calib=None):
    """See `vitlab.prune.prune_`: structured pruning to a FLOPs / params target (imported lazily)."""
    from .prune import prune_ as _prune_

    return _prune_(model, cfg, calib=calib)


def from_transformers(model_or_dir):
    """See `vitlab.models.from_transformers`: a HF transformers image model -> the vitlab model, weights copied."""
    return _from_transformers(model_or_dir)
