"""The accuracy/speed Pareto front and the recommendation rule, as pure functions over plain numbers.

A point dominates another when it is at least as good on both axes and strictly better on one. The front is the set
of points no other point dominates; exact duplicates do not dominate each other, so both stay on the front.
"""
from typing import Sequence

__all__ = ["pareto_front", "recommend"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """`points`: (accuracy, speed) pairs, both to maximise. Returns one flag per point: True if on the front.

    A point with a missing (None) coordinate is never on the front and never dominates.
    """
    valid = [p[0] is not None and p[1] is not None for p in points]
    flags = []
    for i, (a, s) in enumerate(points):
        if not valid[i]:
            flags.append(False)
            continue
        dominated = any(
            valid[j] and a2 >= a and s2 >= s and (a2 > a or s2 > s)
            for j, (a2, s2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def recommend(points: Sequence[tuple[float, float]], base_accuracy: float, max_drop: float) -> int | None:
    """Index of the fastest point whose accuracy is within `max_drop` of `base_accuracy` (same units), or None.

    Ties on speed go to the more accurate point, then to the earlier one (the sweep's fixed order). Accuracies here
    must be validation accuracies: the caller reports the test accuracy of the chosen point afterwards.
    """
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    floor = base_accuracy - max_drop - 1e-12
    best = None
    for i, (a, s) in enumerate(points):
        if a is None or s is None or a < floor:
            continue
        if best is None or (s, a) > (points[best][1], points[best][0]):
            best = i
    return best
