"""One loader: a model name, a checkpoint folder or a model already built + a technique stack -> the model the stack
made (or the engine runner it deployed), calibrated on images where the stack needs them.

    model = vitlab.load("checkpoints/fashion-mnist-reference-v2", ["tome:r=4"])
    runner = vitlab.load_runner("checkpoints/fashion-mnist-reference-v2", ["w8a8"],
                                calibration=Calibration("fashion-mnist"))
    runner = vitlab.deploy(model, W8A8(), calib=batches)        # a model in hand + its own calibration batches

Every verb of the CLI and the Python API that loads a model with `--apply` goes through `load`: what a stack means,
which images a calibrating stack sees and what a missing `--data` says are decided here once. Calibration images are
a seeded subset of the train or val split, never test (`vitlab.data.calibration_batches`); a stack that scores with
labels (pruning criteria) asks for (images, labels) batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from torch import nn

from .checkpoint import create_model
from .data.calibration import calibration_batches
from .runner import Runner, as_runner
from .techniques import apply_stack, format_technique, needs_calibration, parse_apply

__all__ = ["Calibration", "deploy", "load", "load_runner", "stack_needs_calibration"]


@dataclass(frozen=True)
class Calibration:
    """Where a calibrating stack takes its images: `images` seeded images of `data`/`split` (train or val; the test
    split is refused, naming `split_flag`), in batches of `batch_size`; `labelled` gives (images, labels) batches."""

    data: str | None
    split: str = "train"
    images: int = 256
    data_dir: str | None = None
    batch_size: int = 32
    labelled: bool = False
    split_flag: str = "--calib-split"

    def batches(self, model: nn.Module) -> list:
        """The batches this names, preprocessed for `model`."""
        return calibration_batches(model, self.data, self.split, self.images, labels=self.labelled,
                                   batch_size=self.batch_size, data_dir=self.data_dir, split_flag=self.split_flag)


# where a stack's calibration images come from: a Calibration, or a function of the loaded model giving batches
CalibrationSource = Union[Calibration, Callable[[nn.Module], list]]


def stack_needs_calibration(apply: Sequence[Any]) -> bool:
    """Whether a technique stack (configs or `--apply` text) contains a technique that reads calibration images
    (the registry's `needs_calibration` flag of each)."""
    return any(needs_calibration(c) for c in _configs(apply))


def _configs(apply: Sequence[Any]) -> list:
    apply = list(apply or [])
    return parse_apply(apply) if apply and isinstance(apply[0], str) else apply


def _missing_data(stack: str) -> Exception:
    return ValueError(f"{stack} calibrates on images: give --data SPEC (calibration images come from the train or "
                      "val split)")


def load(source: str | nn.Module, apply: Sequence[Any] = (), *, calibration: CalibrationSource | None = None,
         model_kwargs: dict | None = None, missing_data: Callable[[str], Exception] = _missing_data) -> Any:
    """`source` (a model name, a checkpoint folder or an `nn.Module`) with the technique stack `apply` (configs or
    `--apply` text) applied in place: the model, or the runner an engine technique deploys (w8a8, w8).

    A stack that calibrates takes its images from `calibration`; without one (or without its `data`) it raises
    `missing_data(stack text)`, the caller's message naming its own flag."""
    model = source if isinstance(source, nn.Module) else create_model(source, **(model_kwargs or {}))
    configs = _configs(apply)
    calib = None
    if any(needs_calibration(c) for c in configs):
        if calibration is None or (isinstance(calibration, Calibration) and calibration.data is None):
            raise missing_data(" + ".join(map(format_technique, configs)))
        calib = calibration.batches(model) if isinstance(calibration, Calibration) else calibration(model)
    return apply_stack(model, configs, calib=calib)


def load_runner(source: str | nn.Module, apply: Sequence[Any] = (), *, calibration: CalibrationSource | None = None,
                model_kwargs: dict | None = None, missing_data: Callable[[str], Exception] = _missing_data,
                **runner_options) -> Runner:
    """`load`, then a runner: a PyTorch model is wrapped with `runner_options` (dtype, channels_last, compile); a
    deployed engine runner is returned as it is."""
    result = load(source, apply, calibration=calibration, model_kwargs=model_kwargs, missing_data=missing_data)
    return as_runner(result, **runner_options) if isinstance(result, nn.Module) else as_runner(result)


def deploy(model: nn.Module, apply: Any | Sequence[Any] = (), *, calib: Any = None, **runner_options) -> Runner:
    """Turn `model` into a runner with the stack `apply` (configs or `--apply` text; one config alone is fine): a
    stack ending in an engine technique (w8a8, w8, bf16) gives that engine's runner, any other stack the model with
    it applied in place, wrapped as a `TorchRunner` with `runner_options`. `calib`: calibration image batches, for
    stacks that need them. The verb beside `apply_`, which only ever changes a model in place."""
    configs = _configs(apply if isinstance(apply, (list, tuple)) else [apply])
    return load_runner(model, configs, calibration=None if calib is None else (lambda m: calib),
                       missing_data=_missing_calib, **runner_options)


def _missing_calib(stack: str) -> Exception:
    return ValueError(f"{stack} calibrates on images: pass calib=[image batches] (preprocessed for the model), or use "
                      "vitlab.load_runner(source, stack, calibration=vitlab.Calibration(DATA))")
