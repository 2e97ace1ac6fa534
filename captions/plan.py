"""The plan of a run: which requests to send, in the caller's order, and the run's counts.

A request whose answer is cached, that repeats an earlier request's key, or that waits inside a
pending batch is free; the others are admitted by the run's ``Budget`` (--budget, then
--max-usd by estimate) until it refuses one. Planning reads no image for a cached key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from captions.budget import Budget
from captions.cache import CaptionCache
from captions.cost import Estimate, estimate_request, png_size
from captions.images import scaled_size
from captions.jobs import CaptionRequest, Job, caption_job, fallback_version
from captions.options import CaptionOptions
from captions.prompts import prompt_texts


@dataclass
class CaptionSummary:
    """Counts of one run (all counts are requests, i.e. unique cache keys, unless noted)."""

    provider: str
    model: str
    mode: str
    total: int = 0  # slices given
    cached: int = 0  # answered before (including the first slice of duplicate images)
    duplicates: int = 0  # slices sharing a key with an earlier slice of this run
    pending: int = 0  # inside submitted batches that are not back yet
    to_send: int = 0  # new requests planned within --budget and --max-usd
    over_budget: int = 0  # new requests left out by --budget or --max-usd
    sent: int = 0
    succeeded: int = 0
    refused: int = 0
    truncated: int = 0  # empty answers cut by the completion cap (reasoning used it all)
    failed: int = 0
    rejected: int = 0  # of failed: refused by the server as invalid (4xx) or unreadable; not retried by a rerun
    invalid: int = 0  # answers far longer than --max-tokens allows: flagged (in refused), not used
    broken: int = 0  # 200s whose body was not a usable completion; their tokens still count
    http_requests: int = 0  # attempts on the wire, retries included
    est_prompt_tokens: int = 0
    est_completion_tokens: int = 0
    usd_estimated: float | None = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd_actual: float | None = 0.0
    usage_estimated: int = 0  # answers without usage from the server: tokens estimated
    elapsed_s: float = 0.0
    stopped: str | None = None
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def incomplete(self) -> str | None:
        """Why a release would miss slices a rerun can still answer (pending batches, failures
        a rerun retries), in one line; None when the run is complete."""
        retry = self.failed - self.rejected
        parts = ([f"{self.pending} requests are still in batches"] if self.pending else []) + (
            [f"{retry} requests failed for this run"] if retry > 0 else [])
        return "; ".join(parts) or None


def estimate(options: CaptionOptions, job: Job) -> Estimate:
    """Tokens and USD of one request, from the PNG header and the rendered prompt."""
    try:
        width, height = png_size(job.req.image_path)
    except OSError:
        width, height = 512, 512  # unreadable now; the send will report it
    width, height = scaled_size(width, height, options.image_size)
    system, user = prompt_texts(job.req.context, options.template(job.version))
    return estimate_request(options.model, text_chars=len(system) + len(user), width=width, height=height,
                            detail=options.detail, max_tokens=options.completion_cap,
                            batch=options.mode == "batch", prices=options.prices)


def plan(
    options: CaptionOptions,
    requests: Sequence[CaptionRequest],
    cache: CaptionCache,
    budget: Budget,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[Job], CaptionSummary]:
    """Which new requests to send, in the caller's order.

    Args:
        budget: the run's budget; every request is offered to it in order.
        exclude: keys inside pending batches (never planned twice).

    Returns:
        The jobs to send (each with its estimate unless offline) and the summary so far.
    """
    summary = CaptionSummary(options.provider, options.model, options.mode, total=len(requests))
    primary = [caption_job(options, req) for req in requests]
    reask = options.retry_refused and not options.offline
    refused = cache.refused_flags(j.key for j in primary)
    # With --retry-refused a refused answer is replaced by its fallback request.
    retries = {j.key: caption_job(options, j.req, fallback_version(options))
               for j in primary if reask and refused.get(j.key)}
    fallback_cached = cache.cached_keys(j.key for j in retries.values()) if retries else set()
    selected: list[Job] = []
    seen: set[str] = set()
    usd_known = True
    for job in primary:
        job = retries.get(job.key, job)
        free = ("cached" if job.key in refused or job.key in fallback_cached
                else "duplicates" if job.key in seen else "pending" if job.key in exclude else None)
        if free is not None:
            if budget.take(free=True):
                setattr(summary, free, getattr(summary, free) + 1)
            else:
                summary.over_budget += 1
            continue
        seen.add(job.key)
        if not budget.room():
            summary.over_budget += 1
            continue
        if not options.offline:
            job.estimate = estimate(options, job)
        if not budget.take(usd=job.estimate.usd if job.estimate else None):
            summary.over_budget += 1
            continue
        if job.estimate is not None:
            summary.est_prompt_tokens += job.estimate.input_tokens
            summary.est_completion_tokens += job.estimate.output_tokens
            usd_known = usd_known and job.estimate.usd is not None
        selected.append(job)
    summary.usd_estimated = budget.planned_usd if usd_known else None
    summary.to_send = len(selected)
    summary.stopped = budget.stopped
    return selected, summary
