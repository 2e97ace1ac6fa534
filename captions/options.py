"""Caption options: one typed object from `curate caption` through the release to the engine.

The CLI builds a ``CaptionOptions`` once; ``run_release`` and ``run_captions`` read it unchanged.
Every default lives here, the retry policy's too (the CLI's flags take theirs from here).
Building one validates it and resolves what depends on the provider: ``model`` becomes the model
that answers (``--model``, default gpt-4o; the offline template for the offline provider) and
``mode`` becomes "offline" for the offline provider, so the cache key, the plan and the summary
read the fields as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from captions.cost import DEFAULT_MODEL, price_per_million
from captions.errors import FatalAPIError
from captions.offline import OFFLINE_MODEL, OFFLINE_PROVIDER

PROVIDERS = ("openai", OFFLINE_PROVIDER)
MODES = ("sync", "batch")
DETAILS = ("low", "high", "auto")
LOCAL_SERVER_KEY = "not-needed"  # local OpenAI-compatible servers (vLLM, Ollama) take any key


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff settings for the single retry layer (``captions.client``)."""

    max_attempts: int = 8
    initial_s: float = 0.5
    max_wait_s: float = 30.0
    max_hint_s: float = 300.0  # longest server-requested wait we honour


def default_provider(api_key: str | None, base_url: str | None) -> str:
    """openai when a key or a server is given, else the offline captioner (no key needed)."""
    return "openai" if (api_key or base_url) else OFFLINE_PROVIDER


@dataclass(frozen=True)
class CaptionOptions:
    """How to caption one run. The API key is never shown (``repr``) nor stored.

    ``dataclasses.replace`` keeps resolved values: change the provider by building a new one.
    """

    provider: str = "openai"  # "openai" (any OpenAI-compatible base_url) or "offline"
    model: str | None = None  # None: gpt-4o; resolved to a str when built
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    budget: int | None = None  # at most this many new (uncached) requests; see captions.budget
    max_usd: float | None = None  # stop before the estimated spend exceeds this
    concurrency: int = 8
    rpm: float | None = None  # client-side requests per minute
    tpm: float | None = None  # client-side tokens per minute
    mode: str = "sync"  # "sync" or "batch"; "offline" once built for the offline provider
    detail: str = "low"  # image detail: low, high or auto
    dry_run: bool = False  # plan only: counts, tokens and USD, zero requests
    retry_refused: bool = False  # re-ask refused slices with the fallback prompt
    # The release: which slices, rendered how, written where.
    all_slices: bool = False  # every slice in slice order instead of the ranked order
    out: Path | None = None  # release manifest; None: the workdir's first release path
    size: int = 512  # PNG size in pixels
    chunk: int = 2048  # slices rendered per step while the budget fills
    # Each request.
    timeout: float = 60.0
    max_tokens: int = 300
    temperature: float = 0.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Batch mode: poll every poll_interval s until done, or submit/advance and return.
    batch_wait: bool = True
    poll_interval: float = 30.0

    def __post_init__(self) -> None:
        offline = self.provider == OFFLINE_PROVIDER
        if self.provider not in PROVIDERS or self.mode not in (*MODES, *(("offline",) if offline else ())):
            raise ValueError(f"unknown provider {self.provider!r} or mode {self.mode!r}")
        if self.detail not in DETAILS:
            raise ValueError(f"--detail must be low, high or auto, not {self.detail!r}")
        # Frozen: resolved values are set once, here, and never change afterwards.
        resolve = object.__setattr__
        resolve(self, "concurrency", max(1, self.concurrency))
        if offline:
            resolve(self, "model", OFFLINE_MODEL)
            resolve(self, "mode", "offline")
            return
        resolve(self, "model", self.model or DEFAULT_MODEL)
        if self.max_usd is not None and price_per_million(self.model) is None:
            raise ValueError(f"--max-usd needs a known price, and model {self.model!r} has none")

    @property
    def offline(self) -> bool:
        return self.provider == OFFLINE_PROVIDER

    def request_key(self) -> str:
        """The key to send: ``api_key``, or a placeholder when a local ``base_url`` is set.

        Raises:
            FatalAPIError: no key and no local server (OpenAI itself needs a key).
        """
        if self.api_key:
            return self.api_key
        if self.base_url is None:
            raise FatalAPIError("OPENAI_API_KEY is not set; use --provider offline or set the key")
        return LOCAL_SERVER_KEY
