"""Caption options: one typed object from `curate caption` through the release to the engine.

The CLI builds a ``CaptionOptions`` once; ``run_release`` and ``run_captions`` read it unchanged.
Every default lives here, the retry policy's too (the CLI's flags take theirs from here).
Building one validates it and resolves what depends on the provider: ``model`` becomes the model
that answers (``--model``, default gpt-4o; the offline template for the offline provider) and
``mode`` becomes "offline" for the offline provider, and ``reasoning_effort`` becomes "low" for
a reasoning model (gpt-5*, o*) unless given, so the cache key, the plan and the summary read the
fields as they are. Fields added later enter the cache key only when they differ from their
defaults (``captions.jobs``), so a cache written before them still hits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from captions.cost import DEFAULT_MODEL, ModelPrice, price_per_million
from captions.errors import FatalAPIError
from captions.models import DEFAULT_REASONING_EFFORT, REASONING_EFFORTS, completion_cap, is_reasoning_model
from captions.offline import OFFLINE_MODEL, OFFLINE_PROVIDER
from captions.prompts import CONTEXTS, TEMPLATES, PromptTemplate, builtin_version

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
    # Longest server-requested wait (Retry-After, "try again in ...") we sleep; a longer one
    # fails that request for this run (one line) instead: the next run asks again.
    max_hint_s: float = 60.0
    max_malformed: int = 2  # retries of a 200 whose body is not a usable chat completion


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
    budget: int | None = None  # the first N slices of the selection order; see captions.budget
    max_usd: float | None = None  # stop before the estimated spend exceeds this
    concurrency: int = 8
    rpm: float | None = None  # client-side requests per minute
    tpm: float | None = None  # client-side tokens per minute
    mode: str = "sync"  # "sync" or "batch"; "offline" once built for the offline provider
    detail: str = "low"  # image detail: low, high or auto
    image_size: int | None = None  # longest image side sent (client-side resize); None: as rendered
    reasoning_effort: str | None = None  # None: "low" for reasoning models, unset for others
    prices: Mapping[str, ModelPrice] | None = None  # --prices FILE entries (cost.load_prices)
    context: str = "labels"  # what ground truth a prompt carries: labels, metadata or none
    prompt: PromptTemplate | None = None  # --prompt-file (prompts.load_prompt_file); None: built-in
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
    # The organisation's enqueued-token limit for the model (Batch API): files are cut and
    # submitted so that the estimated input tokens of unfinished batches stay within it.
    batch_token_limit: int | None = None
    # Another run holds the workdir: wait for it (True) or stop with one line naming it.
    wait: bool = False

    def __post_init__(self) -> None:
        offline = self.provider == OFFLINE_PROVIDER
        if self.provider not in PROVIDERS or self.mode not in (*MODES, *(("offline",) if offline else ())):
            raise ValueError(f"unknown provider {self.provider!r} or mode {self.mode!r}")
        if self.detail not in DETAILS:
            raise ValueError(f"--detail must be low, high or auto, not {self.detail!r}")
        if self.context not in CONTEXTS:
            raise ValueError(f"--context must be none, metadata or labels, not {self.context!r}")
        if self.reasoning_effort is not None and self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(f"--reasoning-effort must be one of {', '.join(REASONING_EFFORTS)}, "
                             f"not {self.reasoning_effort!r}")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"--image-size must be at least 16 pixels, not {self.image_size}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"--budget must be 0 or more, not {self.budget}")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be positive, not {self.max_tokens}")
        # Frozen: resolved values are set once, here, and never change afterwards.
        resolve = object.__setattr__
        resolve(self, "concurrency", max(1, self.concurrency))
        if offline:
            if self.context == "none":
                raise ValueError("--context none leaves the offline captioner nothing to say; "
                                 "use --context metadata or labels, or a model")
            if self.prompt is not None:
                raise ValueError("--prompt-file needs a model: the offline captioner uses no prompt")
            resolve(self, "model", OFFLINE_MODEL)
            resolve(self, "mode", "offline")
            return
        resolve(self, "model", self.model or DEFAULT_MODEL)
        if self.reasoning_effort is None and is_reasoning_model(self.model):
            resolve(self, "reasoning_effort", DEFAULT_REASONING_EFFORT)
        if self.max_usd is not None and price_per_million(self.model, self.prices) is None:
            raise ValueError(f"--max-usd needs a known price, and model {self.model!r} has none "
                             "(pass --prices FILE)")

    @property
    def offline(self) -> bool:
        return self.provider == OFFLINE_PROVIDER

    @property
    def completion_cap(self) -> int:
        """Completion tokens a request may use: the caption's, plus reasoning for reasoning models."""
        return completion_cap(self.model or DEFAULT_MODEL, self.max_tokens, self.reasoning_effort)

    @property
    def primary_template(self) -> PromptTemplate:
        """The template asked first: ``--prompt-file``'s, else the built-in one of ``context``."""
        return self.prompt or TEMPLATES[builtin_version(self.context)]

    @property
    def fallback_template(self) -> PromptTemplate:
        """The template of --retry-refused re-asks (built-in, of ``context``)."""
        return TEMPLATES[builtin_version(self.context, fallback=True)]

    def template(self, version: str) -> PromptTemplate:
        """The template of a prompt version this run asks with."""
        if self.prompt is not None and version == self.prompt.version:
            return self.prompt
        return TEMPLATES[version]

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
