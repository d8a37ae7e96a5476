"""Training-speed engine flags: bf16 autocast chosen by measurement, `torch.compile` with a clean fallback,
channels-last memory format.

`--precision auto` does not guess from the CPU's name: on a CPU with native bf16 (AVX512_BF16 or AMX) it times a
few forward + backward passes of the run's own model on its first batch in float32 and under bf16 autocast, and
keeps bf16 only when it is at least `BF16_MIN_SPEEDUP` faster and its loss on that batch is within
`BF16_LOSS_RTOL` of float32's. Small GEMMs (a 96-wide ViT) often run slower in bf16 than in float32 on CPUs with
AMX, because of the casts; large ones faster. Elsewhere (no native bf16) `auto` is float32 and `bf16` is refused
with the CPU's flags. The trial runs under a forked RNG and leaves no gradients, so the run trains as it would
without it.

`--compile` wraps the training forward in `torch.compile`. Inductor needs a C++ compiler and fails on some
platforms; the first batch is tried under the compiled forward (RNG forked, gradients dropped) and on any error the
run continues eagerly with a warning that names the error. The checkpoint is the uncompiled model's.
"""
import statistics
import time
import warnings
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn as nn

from ..errors import UserError
from ..profiling.cpu import cpu_flags_text, has_bf16

__all__ = ["PRECISIONS", "BF16_MIN_SPEEDUP", "BF16_LOSS_RTOL", "autocast", "choose_precision", "compile_forward"]

PRECISIONS = ("fp32", "bf16", "auto")
BF16_MIN_SPEEDUP = 1.10
BF16_LOSS_RTOL = 0.05


def autocast(precision: str, device: torch.device):
    """The context a training forward runs in: bf16 autocast or nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _time_steps(forward_loss: Callable[[], torch.Tensor], model: nn.Module, rounds: int) -> tuple[float, float]:
    """Median seconds of one forward + backward (after one warm-up), and the loss of the last one."""
    times, loss = [], None
    for i in range(rounds + 1):
        start = time.perf_counter()
        loss = forward_loss()
        loss.backward()
        if i:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times), float(loss.detach())


def choose_precision(requested: str, model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
                     rounds: int = 3) -> tuple[str, dict]:
    """The precision to train in and why: `requested` fp32 | bf16 | auto, `loss_fn()` the loss of the first batch
    (called under the autocast being timed)."""
    if requested not in PRECISIONS:
        raise UserError(f"--precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    native = device.type == "cuda" or has_bf16()
    if requested == "fp32":
        return "fp32", {"how": "requested"}
    if requested == "bf16":
        if not native:
            raise UserError(f"--precision bf16: this CPU has no native bf16 (flags: {cpu_flags_text()}); bf16 would "
                            "be emulated and slow. Use --precision fp32 or auto")
        return "bf16", {"how": "requested"}
    if not native:
        return "fp32", {"how": "no native bf16", "cpu_flags": cpu_flags_text()}
    with torch.random.fork_rng(devices=[]):
        fp32_s, fp32_loss = _time_steps(loss_fn, model, rounds)
        with autocast("bf16", device):
            bf16_s, bf16_loss = _time_steps(loss_fn, model, rounds)
    speedup = fp32_s / bf16_s
    close = abs(bf16_loss - fp32_loss) <= BF16_LOSS_RTOL * abs(fp32_loss)
    choice = "bf16" if speedup >= BF16_MIN_SPEEDUP and close else "fp32"
    return choice, {"how": "trial", "fp32_ms": round(1e3 * fp32_s, 2), "bf16_ms": round(1e3 * bf16_s, 2),
                    "bf16_speedup": round(speedup, 3), "loss_fp32": fp32_loss, "loss_bf16": bf16_loss,
                    "cpu_flags": cpu_flags_text()}


def compile_forward(module: nn.Module, probe: Callable[[Callable], torch.Tensor]) -> tuple[Callable, str | None]:
    """`torch.compile(module)` when `probe(forward)` (a forward + backward on the first batch) runs with it, else
    the module itself; the second value is the error that made it fall back (None when compiled)."""
    compiled = torch.compile(module)
    try:
        with torch.random.fork_rng(devices=[]):
            probe(compiled).backward()
    except Exception as e:   # inductor's failures have many types (no compiler, unsupported op, ...)
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        warnings.warn(f"--compile: torch.compile failed on this model and platform ({reason}); training eagerly",
                      stacklevel=2)
        return module, reason
    finally:
        module.zero_grad(set_to_none=True)
    return compiled, None
