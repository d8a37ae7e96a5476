"""Wall-clock timing: median and spread over repeated calls after warm-up, plus the environment they ran in."""
import contextlib
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import timm
import torch

from .._version import __version__ as vitlab_version
from .allocator import allocator_state
from .cpu import cpu_flags_text, cpu_name

__all__ = ["Timing", "time_callable", "num_threads", "environment"]


@dataclass(frozen=True)
class Timing:
    """Per-call seconds: median, 10th and 90th percentile over `runs` timed calls after `warmup` untimed ones."""
    median_s: float
    p10_s: float
    p90_s: float
    runs: int
    warmup: int


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of an ascending list, q in [0, 100]."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_callable(
        fn: Callable[[], object],
        *,
        warmup: int = 3,
        min_runs: int = 5,
        max_runs: int = 50,
        min_time_s: float = 1.0,
        max_time_s: float = 10.0,
) -> Timing:
    """Time `fn()` with `time.perf_counter`: `warmup` untimed calls, then timed calls until both `min_runs` and
    `min_time_s` are reached, stopping early at `max_runs` calls or `max_time_s` seconds of timed calls.

    `max_time_s` wins over `min_runs` (so a slow `fn` is timed fewer times, at least once). `fn` must finish its work
    before returning: for CUDA, end it with `torch.cuda.synchronize()`.
    """
    if warmup < 0:
        raise ValueError(f"time_callable: warmup={warmup} must be >= 0")
    if min_runs < 1:
        raise ValueError(f"time_callable: min_runs={min_runs} must be >= 1")
    if max_runs < min_runs:
        raise ValueError(f"time_callable: max_runs={max_runs} must be >= min_runs={min_runs}")
    if max_time_s <= 0:
        raise ValueError(f"time_callable: max_time_s={max_time_s} must be > 0")

    for _ in range(warmup):
        fn()
    times: list[float] = []
    total = 0.0
    while len(times) < max_runs and total < max_time_s:
        if len(times) >= min_runs and total >= min_time_s:
            break
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        total += times[-1]

    times.sort()
    return Timing(
        median_s=statistics.median(times),
        p10_s=_percentile(times, 10),
        p90_s=_percentile(times, 90),
        runs=len(times),
        warmup=warmup,
    )


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run the block with `torch.set_num_threads(n)`, restoring the previous count after; None leaves it alone."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"num_threads: n={n} must be >= 1 (or None to keep the current {torch.get_num_threads()})")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cpu_name() -> str:
    return cpu_name()


def environment() -> dict:
    """Versions and hardware a measurement ran on, for storing next to the numbers."""
    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "vitlab": vitlab_version,
        "threads": torch.get_num_threads(),
        "allocator": allocator_state(),
        "cpu": _cpu_name(),
        "cpu_flags": cpu_flags_text(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
