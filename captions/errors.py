"""The error a caption run stops with, importable without the openai SDK (the CLI catches it)."""


class FatalAPIError(RuntimeError):
    """Non-retryable API failure (auth, quota, bad request): the whole run must stop.

    Raised by a run, it carries the counts so far in ``summary`` (a ``CaptionSummary``).
    """
