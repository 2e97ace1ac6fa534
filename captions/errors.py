"""The errors a caption run stops with, importable without the openai SDK (the CLI catches them)."""


class FatalAPIError(RuntimeError):
    """Non-retryable API failure (auth, quota, bad request): the whole run must stop.

    Raised by a run, it carries the counts so far in ``summary`` (a ``CaptionSummary``).
    """


class CacheError(RuntimeError):
    """The caption cache cannot be read or written; one line naming the file and the fault."""


class RunLocked(RuntimeError):
    """Another paying caption run holds the workdir's lock; the message names the holder."""
