"""argparse `type=` helpers: every numeric flag of every verb is checked here, once, before any work starts.

Each helper raises `argparse.ArgumentTypeError` with the allowed range and the value given, so argparse prints
one line that names the flag: "vitlab bench: error: argument --batch: must be an integer >= 1, got '0'".
"""
from __future__ import annotations

import argparse
import math

__all__ = [
    "positive_int", "non_negative_int", "positive_float", "non_negative_float", "fraction", "probability",
    "below_one",
]


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _checked(kind: type, what: str, ok) -> callable:
    def parse(text: str):
        value = _number(text, kind, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _checked(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _checked(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _checked(float, "a number > 0", lambda v: v > 0)
non_negative_float = _checked(float, "a number >= 0", lambda v: v >= 0)
fraction = _checked(float, "a fraction in (0, 1]", lambda v: 0 < v <= 1)        # keep this much: 0 keeps nothing
probability = _checked(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
below_one = _checked(float, "a number in [0, 1)", lambda v: 0 <= v < 1)          # EMA decay, drop-path, smoothing
