"""vitlab's error types. A `UserError` is a mistake in what the user asked for (a bad value, a damaged or foreign
file, a technique that does not fit the model): the CLI prints its message as one line on stderr and exits with
code 2. Its message names the bad value and the fix. Any other exception is a bug in vitlab: a traceback, exit 1.

Subclasses live beside the code that raises them (`TechniqueError`, `CheckpointError`, `DataError`, ...) and all
derive from `UserError` (which derives from `ValueError`, so `except ValueError` keeps working).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["UserError", "TechniqueNotApplicable", "is_user_error", "one_line"]

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


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


def one_line(message: object) -> str:
    """`message` as one line: line breaks (and the blanks around them) become "; ", so an error is one stderr line."""
    text = str(message).strip()
    return re.sub(r"\s*[\r\n]+\s*", "; ", text)


def is_user_error(exc: BaseException) -> bool:
    """True for a mistake in the user's input or environment: a `UserError`, a missing file or a path that cannot
    be used (`FileNotFoundError`, `PermissionError`, `IsADirectoryError`, `NotADirectoryError`: their message names
    the path), or (until every check raises a `UserError`) a plain `ValueError` raised by a `raise` statement in
    vitlab's own code. A `ValueError` raised inside torch, PIL, numpy ... is a bug in how vitlab called them."""
    if isinstance(exc, (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    if type(exc) is not ValueError:
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE)
