"""Interleaved A/B timing for the `*_vs_reference.py` scripts: a ratio that a neighbour's load hits on both sides.

Each round times the reference and vitlab back to back in A B B A order (the order alternates within the round, so
a drift in machine speed, turbo or a neighbour starting up, lands on both), `calls` forward passes per slot, and
takes ratio = reference time / vitlab time for that round. The result is the median of the per-round ratios, with
the per-model medians for the img/s lines. Rounds are short (one or two forward passes per slot), so a burst of load
spoils one round's ratio instead of one model's whole measurement.
"""
import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Interleaved:
    ratio: float  # median over rounds of reference seconds / vitlab seconds (> 1: vitlab faster)
    ratios: tuple  # every round's ratio
    reference_s: float  # median seconds per call of the reference
    vitlab_s: float  # median seconds per call of vitlab


def _seconds(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved_ratio(reference: Callable[[], object], vitlab: Callable[[], object], rounds: int,
                      calls: int = 1, warmup: int = 2) -> Interleaved:
    """Time `reference` and `vitlab` in `rounds` A B B A rounds of `calls` calls per slot (after `warmup` calls each)."""
    if rounds < 1 or calls < 1:
        raise ValueError(f"interleaved_ratio: rounds={rounds} and calls={calls} must be >= 1")
    for _ in range(warmup):
        reference()
        vitlab()
    ratios, ref_times, ours_times = [], [], []
    for _ in range(rounds):
        ref_a = _seconds(reference, calls)
        ours_a = _seconds(vitlab, calls)
        ours_b = _seconds(vitlab, calls)
        ref_b = _seconds(reference, calls)
        ratios.append((ref_a + ref_b) / (ours_a + ours_b))
        ref_times += [ref_a, ref_b]
        ours_times += [ours_a, ours_b]
    return Interleaved(statistics.median(ratios), tuple(ratios), statistics.median(ref_times),
                       statistics.median(ours_times))


def report(result: Interleaved, batch: int, reference_name: str = "official") -> str:
    """The lines the scripts print; `zoo_vs_reference.py` parses the `ratio vitlab / ...` one."""
    spread = sorted(result.ratios)
    return "\n".join([
        f"{reference_name:9s} {batch / result.reference_s:8.1f} img/s  (median {result.reference_s * 1e3:.1f} ms / "
        f"batch {batch})",
        f"{'vitlab':9s} {batch / result.vitlab_s:8.1f} img/s  (median {result.vitlab_s * 1e3:.1f} ms / batch {batch})",
        f"per-round ratios ({len(spread)} A-B-B-A rounds): min {spread[0]:.2f}, max {spread[-1]:.2f}",
    ])
