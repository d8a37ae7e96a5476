"""vitlab's error types. A `UserError` is a mistake in what the user asked for (a bad value, a damaged or foreign
file, a technique that does not fit the model): the CLI prints its message as one line on stderr and exits with
code 2. Its message names the bad value and the fix. Any other exception is a bug in vitlab: a traceback, exit 1.

Subclasses live beside the code that raises them (`TechniqueError`, `CheckpointError`, `DataError`, ...) and all
derive from `UserError` (which derives from `ValueError`, so `except ValueError` keeps working).
"""
from __future__ import annotations

__all__ = ["UserError", "TechniqueNotApplicable"]


class UserError(ValueError):
    """A mistake in the user's input; the message says what was wrong and what to do instead."""


class TechniqueNotApplicable(UserError):
    """A technique asked of a model it does not support: names the technique, the model class and what it
    supports. (Defined here so that `vitlab.techniques.TechniqueError` and it share one root.)"""

    def __init__(self, technique: str, model: object, why: str):
        self.technique = technique
        self.model_class = model if isinstance(model, str) else type(model).__name__
        self.why = why
        super().__init__(f"{technique} does not apply to {self.model_class}: {why}")
