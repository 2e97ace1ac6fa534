"""The one error of training, and where input errors become it.

Notices that do not stop a run (a resume that disagrees with the checkpoint's config, a
precision fallback, checkpoints about to be overwritten) are ``logging`` warnings of the
``training`` loggers, which the `train` CLI prints as ``warning: ...`` lines.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class TrainingError(RuntimeError):
    """A training command cannot run or continue; ``step`` is the 1-based step it failed on, if any.

    The `train` CLI catches this one class and prints its message as one line (exit code 2).
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


@contextmanager
def input_errors(prefix: str = "") -> Iterator[None]:
    """Turn the errors that bad input raises (a missing file, a malformed manifest, a missing
    embedding key) into a TrainingError with the same message, optionally prefixed."""
    try:
        yield
    except (FileNotFoundError, ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise TrainingError(f"{prefix}{message}") from e
