"""Measurement sweeps and reports: `measure` rows (accuracy + speed), printed tables."""
from .measure import MeasureRow, measure, print_rows

__all__ = ["MeasureRow", "measure", "print_rows"]
