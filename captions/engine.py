"""Captioning engine: plan (cache, budget, cost), then answer offline, synchronously or by batch.

The contract with the caller is ``CaptionRequest`` in, cache rows out: ``run_captions`` fills
the cache and returns counts; ``lookup`` reads the best row per slice back. Every answer is
committed to the cache as it arrives, so a killed run loses nothing that was answered, and a
rerun never asks for a cached key again. Only requests in flight at the kill are asked again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from captions import batch as batchflow
from captions.cache import CaptionCache, cache_key
from captions.client import (
    CaptionClient, FatalAPIError, RetryPolicy, Stopped, completion_params, make_openai, redact,
)
from captions.cost import (
    DEFAULT_MODEL, Estimate, cost_usd, estimate_request, png_size, price_per_million,
)
from captions.offline import OFFLINE_MODEL, OFFLINE_PROMPT_VERSION, OFFLINE_PROVIDER, offline_caption
from captions.prompts import (
    FALLBACK_PROMPT_VERSION, PROMPT_VERSION, build_messages, context_fields, prompt_digest, prompt_texts,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 300
DEFAULT_TEMPERATURE = 0.0
MAX_CONSECUTIVE_FAILURES = 20  # a run whose every request exhausts its retries stops


@dataclass
class CaptionRequest:
    """One slice to caption. ``context`` holds only coarse, PHI-free fields: modality, plane,
    position (0..1), body_region (str | None), labels_present (list[str]), dataset."""

    slice_id: str
    image_path: Path
    image_sha256: str
    context: dict[str, Any]


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
    failed: int = 0
    http_requests: int = 0  # attempts on the wire, retries included
    est_prompt_tokens: int = 0
    est_completion_tokens: int = 0
    usd_estimated: float | None = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd_actual: float | None = 0.0
    elapsed_s: float = 0.0
    stopped: str | None = None
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Options:
    """Everything one run needs besides requests and cache (the key is hidden from repr)."""

    provider: str
    model: str
    detail: str
    max_tokens: int
    temperature: float
    mode: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 8
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    budget: int | None = None
    max_usd: float | None = None
    retry_refused: bool = False
    poll_interval: float = 30.0
    batch_wait: bool = True


@dataclass
class _Job:
    key: str
    req: CaptionRequest
    version: str
    params: dict[str, Any]
    estimate: Estimate | None = None


def _params(s: _Options, context: dict[str, Any], version: str) -> dict[str, Any]:
    if s.provider == OFFLINE_PROVIDER:
        fields = json.dumps(context_fields(context), sort_keys=True)
        return {"context_sha256": hashlib.sha256(fields.encode()).hexdigest()}
    return {"detail": s.detail, "max_tokens": s.max_tokens, "temperature": s.temperature,
            "prompt_sha256": prompt_digest(context, version)}


def _job(s: _Options, req: CaptionRequest, version: str) -> _Job:
    params = _params(s, req.context, version)
    return _Job(cache_key(req.image_sha256, s.provider, s.model, version, params), req, version, params)


def _options(provider: str, model: str | None, detail: str, max_tokens: int, temperature: float,
             mode: str, **rest: Any) -> _Options:
    if provider == OFFLINE_PROVIDER:
        return _Options(OFFLINE_PROVIDER, OFFLINE_MODEL, "none", 0, 0.0, "offline", **rest)
    return _Options(provider, model or DEFAULT_MODEL, detail, max_tokens, temperature, mode, **rest)


def _primary_version(s: _Options) -> str:
    return OFFLINE_PROMPT_VERSION if s.provider == OFFLINE_PROVIDER else PROMPT_VERSION


def lookup(
    requests: Sequence[CaptionRequest],
    *,
    cache: CaptionCache,
    provider: str = "openai",
    model: str | None = DEFAULT_MODEL,
    detail: str = "low",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict[str, dict[str, Any]]:
    """Best cached row per slice_id: an accepted fallback answer, else the primary answer
    (which may be ``refused=True``: never use its text as a caption). Missing slices are absent."""
    s = _options(provider, model, detail, max_tokens, temperature, "sync")
    pairs = [(req, _job(s, req, _primary_version(s)).key,
              _job(s, req, FALLBACK_PROMPT_VERSION).key if provider != OFFLINE_PROVIDER else None)
             for req in requests]
    rows = cache.get_many([k for _, p, f in pairs for k in (p, f) if k])
    out: dict[str, dict[str, Any]] = {}
    for req, primary, fallback in pairs:
        fb, pr = rows.get(fallback) if fallback else None, rows.get(primary)
        best = fb if fb is not None and not fb["refused"] else pr if pr is not None else fb
        if best is not None:
            out[req.slice_id] = best
    return out


def _plan(s: _Options, requests: Sequence[CaptionRequest], cache: CaptionCache,
          exclude: set[str]) -> tuple[list[_Job], CaptionSummary]:
    """Which new requests to send, in the caller's order, within budget and max_usd."""
    budget, max_usd = s.budget, s.max_usd
    summary = CaptionSummary(s.provider, s.model, s.mode, total=len(requests))
    primary = [_job(s, req, _primary_version(s)) for req in requests]
    rows = cache.refused_flags(j.key for j in primary)
    if s.retry_refused and s.provider != OFFLINE_PROVIDER:
        retries = {j.key: _job(s, j.req, FALLBACK_PROMPT_VERSION) for j in primary if rows.get(j.key)}
        fallback_cached = cache.cached_keys(j.key for j in retries.values())
    else:
        retries, fallback_cached = {}, set()
    candidates: list[_Job] = []
    seen: set[str] = set()
    for job in primary:
        if job.key in rows:
            job = retries.get(job.key, job)
            if job.key in rows or job.key in fallback_cached:
                summary.cached += 1
                continue
        if job.key in seen:
            summary.duplicates += 1
        elif job.key in exclude:
            summary.pending += 1
        else:
            seen.add(job.key)
            candidates.append(job)
    if max_usd is not None and s.provider != OFFLINE_PROVIDER and price_per_million(s.model) is None:
        raise ValueError(f"--max-usd needs a known price, and model {s.model!r} has none")
    selected: list[_Job] = []
    usd = 0.0
    for job in candidates:
        if budget is not None and len(selected) >= budget:
            break
        if s.provider != OFFLINE_PROVIDER:
            job.estimate = _estimate(s, job)
            if max_usd is not None and usd + (job.estimate.usd or 0.0) > max_usd:
                summary.stopped = f"--max-usd {max_usd:g} reached by estimate"
                break
            usd += job.estimate.usd or 0.0
            summary.est_prompt_tokens += job.estimate.input_tokens
            summary.est_completion_tokens += job.estimate.output_tokens
            if job.estimate.usd is None:
                summary.usd_estimated = None
        selected.append(job)
    if summary.usd_estimated is not None:
        summary.usd_estimated = usd
    summary.to_send = len(selected)
    summary.over_budget = len(candidates) - len(selected)
    return selected, summary


def _estimate(s: _Options, job: _Job) -> Estimate:
    try:
        width, height = png_size(job.req.image_path)
    except OSError:
        width, height = 512, 512  # unreadable now; the send will report it
    system, user = prompt_texts(job.req.context, job.version)
    return estimate_request(s.model, text_chars=len(system) + len(user), width=width, height=height,
                            detail=s.detail, max_tokens=s.max_tokens, batch=s.mode == "batch")


def _row(job: _Job, s: _Options, **answer: Any) -> dict[str, Any]:
    return {"key": job.key, "slice_id": job.req.slice_id, "image_sha256": job.req.image_sha256,
            "provider": s.provider, "prompt_version": job.version, "params": job.params, **answer}


def _open_cache(cache: CaptionCache | str | Path) -> tuple[CaptionCache, bool]:
    return (cache, False) if isinstance(cache, CaptionCache) else (CaptionCache(cache), True)


def run_captions(
    requests: Sequence[CaptionRequest],
    *,
    provider: str = "openai",
    model: str | None = DEFAULT_MODEL,
    base_url: str | None = None,
    api_key: str | None = None,
    cache: CaptionCache | str | Path,
    budget: int | None = None,
    max_usd: float | None = None,
    concurrency: int = 8,
    rpm: float | None = None,
    tpm: float | None = None,
    mode: str = "sync",
    detail: str = "low",
    dry_run: bool = False,
    retry_refused: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_update: Callable[[CaptionSummary], None] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    timeout: float = 60.0,
    retry: RetryPolicy | None = None,
    batch_dir: str | Path | None = None,
    poll_interval: float = 30.0,
    batch_wait: bool = True,
) -> CaptionSummary:
    """Caption every request that has no cached answer, within ``budget`` and ``max_usd``.

    Args:
        provider: "openai" (any OpenAI-compatible ``base_url``) or "offline".
        mode: "sync" (chat completions now) or "batch" (Batch API; ``batch_wait`` polls every
            ``poll_interval`` s until done, else submits/advances and returns).
        budget: at most this many new requests. max_usd: stop before the estimate exceeds it.
        dry_run: plan only: counts, tokens and USD, zero requests.
        retry_refused: re-ask refused slices with the fallback prompt.
        progress: called as ``progress(done, total)`` after each answered request.
        on_update: called with the live summary right after ``progress`` (cache hits,
            failures, tokens and USD so far), for progress displays.
        batch_dir: where batch state lives (default: ``<cache dir>/batches``).

    Raises:
        FatalAPIError: auth, quota or bad-request errors; ``exc.summary`` holds the counts.
    """
    started = time.monotonic()
    if provider not in ("openai", OFFLINE_PROVIDER) or mode not in ("sync", "batch"):
        raise ValueError(f"unknown provider {provider!r} or mode {mode!r}")
    if detail not in ("low", "high", "auto"):
        raise ValueError(f"--detail must be low, high or auto, not {detail!r}")
    if provider != OFFLINE_PROVIDER and not dry_run and not api_key:
        if base_url is None:
            raise FatalAPIError("OPENAI_API_KEY is not set; use --provider offline or set the key")
        api_key = "not-needed"  # local OpenAI-compatible servers often take any key
    o = _options(provider, model, detail, max_tokens, temperature, mode, base_url=base_url,
                 api_key=api_key, concurrency=max(1, concurrency), rpm=rpm, tpm=tpm, timeout=timeout,
                 retry=retry or RetryPolicy(), budget=budget, max_usd=max_usd,
                 retry_refused=retry_refused, poll_interval=poll_interval, batch_wait=batch_wait)
    db, owned = _open_cache(cache)
    try:
        store = batchflow.BatchStore(batch_dir or db.path.parent / "batches") if o.mode == "batch" else None
        if store is not None and not dry_run:
            summary = asyncio.run(_run_batch(o, requests, db, store))
        else:
            exclude = store.pending_keys() if store is not None else set()
            jobs, summary = _plan(o, requests, db, exclude)
            report = progress
            if progress is not None and on_update is not None:
                def report(done: int, total: int) -> None:
                    progress(done, total)
                    on_update(summary)
            if dry_run or not jobs:
                pass
            elif o.provider == OFFLINE_PROVIDER:
                _run_offline(o, jobs, db, summary, report)
            else:
                asyncio.run(_run_sync(o, jobs, db, summary, report))
        summary.elapsed_s = time.monotonic() - started
        return summary
    finally:
        if owned:
            db.close()


def _run_offline(s: _Options, jobs: list[_Job], db: CaptionCache, summary: CaptionSummary,
                 progress: Callable[[int, int], None] | None) -> None:
    rows = [_row(j, s, text=offline_caption(j.req.context), model=s.model, finish_reason="stop",
                 refused=False, prompt_tokens=0, completion_tokens=0, cost_usd=0.0, request_id=None,
                 mode="offline") for j in jobs]
    for i in range(0, len(rows), 1000):  # free answers: durable per chunk is enough
        db.put_many(rows[i : i + 1000])
        if progress is not None:
            progress(min(i + 1000, len(rows)), len(rows))
    summary.sent = summary.succeeded = len(rows)


class _GroupCommitter:
    """Commits answers as they arrive: each waits until its own transaction is durable.

    Answers that arrive while a commit is in flight share the next transaction (group
    commit). One commit per answer from many threads measured ~60 answers/s here (fsync plus
    GIL hand-offs under a busy event loop); a single writer never falls behind the network.
    """

    def __init__(self, db: CaptionCache) -> None:
        self.db = db
        self.queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[None]]] = asyncio.Queue()

    async def commit(self, row: dict[str, Any]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.queue.put((row, done))
        await done

    async def run(self) -> None:
        while True:
            group = [await self.queue.get()]
            while not self.queue.empty():
                group.append(self.queue.get_nowait())
            try:
                await asyncio.to_thread(self.db.put_many, [row for row, _ in group])
            except Exception as exc:  # a full disk must stop the run, not hang it
                for _, done in group:
                    done.set_exception(exc)
            else:
                for _, done in group:
                    done.set_result(None)


async def _run_sync(s: _Options, jobs: list[_Job], db: CaptionCache, summary: CaptionSummary,
                    progress: Callable[[int, int], None] | None) -> None:
    """A pool of ``concurrency`` workers; each answer is committed before it is counted."""
    assert s.api_key is not None
    client = CaptionClient(api_key=s.api_key, base_url=s.base_url, model=s.model, timeout=s.timeout,
                           concurrency=s.concurrency, rpm=s.rpm, tpm=s.tpm, retry=s.retry)
    queue = deque(jobs)
    max_usd = s.max_usd
    budget_left = None if s.budget is None else s.budget - len(jobs)  # left for fallback re-asks
    committer = _GroupCommitter(db)
    reserved = {"usd": 0.0}  # estimates of requests in flight, for the run-time max_usd guard
    state: dict[str, Any] = {"fatal": None, "consecutive": 0, "done": 0}

    def admit(job: _Job) -> bool:
        spent = (summary.usd_actual or 0.0) + reserved["usd"]
        est = job.estimate.usd if job.estimate else None
        return max_usd is None or est is None or spent + est <= max_usd

    async def worker() -> None:
        nonlocal budget_left
        while queue and state["fatal"] is None:
            job = queue.popleft()
            if not admit(job):
                summary.over_budget += 1
                summary.stopped = f"--max-usd {max_usd:g} reached"
                continue
            est = job.estimate or _estimate(s, job)
            reserved["usd"] += est.usd or 0.0
            try:
                messages = build_messages(job.req, job.req.image_path.read_bytes(), s.detail, version=job.version)
                summary.sent += 1
                answer = await client.complete(messages, max_tokens=s.max_tokens, temperature=s.temperature,
                                               est_tokens=est.input_tokens + est.output_tokens)
            except FatalAPIError as exc:
                state["fatal"] = exc
                client.stop()
                return
            except Stopped:
                summary.sent -= 1
                return
            except Exception as exc:  # retries exhausted or unreadable image: this slice only
                summary.failed += 1
                state["consecutive"] += 1
                reason = redact(f"{type(exc).__name__}: {exc}", s.api_key)
                if len(summary.errors) < 10:
                    summary.errors.append(f"{job.req.slice_id}: {reason}")
                log.warning("caption failed for %s: %s", job.req.slice_id, reason)
                if state["consecutive"] >= MAX_CONSECUTIVE_FAILURES:
                    state["fatal"] = FatalAPIError(f"{state['consecutive']} requests in a row failed; last: {reason}")
                    client.stop()
                continue
            finally:
                reserved["usd"] -= est.usd or 0.0
            state["consecutive"] = 0
            usd = cost_usd(s.model, answer.prompt_tokens, answer.completion_tokens)
            row = _row(job, s, text=answer.text, model=answer.model or s.model,
                       finish_reason=answer.finish_reason, refused=answer.refused,
                       prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                       cost_usd=usd, request_id=answer.request_id, mode="sync")
            await committer.commit(row)  # durable before this worker counts it or moves on
            summary.prompt_tokens += answer.prompt_tokens
            summary.completion_tokens += answer.completion_tokens
            summary.usd_actual = None if usd is None or summary.usd_actual is None else summary.usd_actual + usd
            summary.refused += int(answer.refused)
            summary.succeeded += int(not answer.refused)
            state["done"] += 1
            if progress is not None:
                progress(state["done"], summary.to_send)
            if answer.refused and s.retry_refused and job.version == PROMPT_VERSION:
                retry_job = _job(s, job.req, FALLBACK_PROMPT_VERSION)
                if retry_job.key not in db and (budget_left is None or budget_left > 0):
                    budget_left = None if budget_left is None else budget_left - 1
                    retry_job.estimate = _estimate(s, retry_job)
                    summary.to_send += 1
                    queue.appendleft(retry_job)
                elif retry_job.key not in db:
                    summary.over_budget += 1

    writer = asyncio.create_task(committer.run())
    try:
        await asyncio.gather(*(worker() for _ in range(s.concurrency)))
    finally:
        writer.cancel()
        summary.http_requests = client.attempts
        await client.aclose()
    if state["fatal"] is not None:
        exc = state["fatal"]
        summary.stopped = str(exc)
        exc.summary = summary
        raise exc


async def _run_batch(s: _Options, requests: Sequence[CaptionRequest], db: CaptionCache,
                     store: batchflow.BatchStore) -> CaptionSummary:
    """Resume saved batches first, then submit what is neither cached nor pending."""
    assert s.api_key is not None
    client = make_openai(s.api_key, s.base_url, s.timeout)
    flow = dict(poll_interval=s.poll_interval, policy=s.retry, secret=s.api_key)
    report = batchflow.BatchReport()
    try:
        # Batches of an earlier (possibly killed) run are polled and ingested, never resent.
        await batchflow.advance(client, store, db, wait=False, report=report, **flow)
        jobs, summary = _plan(s, requests, db, store.pending_keys())
        unreadable = [j for j in jobs if not j.req.image_path.is_file()]
        for job in unreadable:
            summary.errors.append(f"{job.req.slice_id}: image not found: {job.req.image_path}")
        missing = {j.key for j in unreadable}
        by_key = {j.key: j for j in jobs if j.key not in missing}

        def body(item: batchflow.BatchItem) -> dict[str, Any]:
            job = by_key[item.key]
            messages = build_messages(job.req, job.req.image_path.read_bytes(), s.detail, version=job.version)
            return {"model": s.model, "messages": messages,
                    **completion_params(s.model, s.max_tokens, s.temperature)}

        items = (batchflow.BatchItem(j.key, j.req.slice_id, j.req.image_sha256, s.provider, s.model,
                                     j.version, j.params) for j in by_key.values())
        batchflow.write_inputs(store, items, body)
        await batchflow.advance(client, store, db, wait=s.batch_wait, report=report, **flow)
    except FatalAPIError as exc:
        exc.summary = CaptionSummary(s.provider, s.model, s.mode, total=len(requests), stopped=str(exc))
        raise
    finally:
        await client.close()
    summary.sent = report.submitted_requests
    summary.pending = report.pending_requests
    summary.succeeded, summary.refused = report.succeeded, report.refused
    summary.failed = report.failed + len(unreadable)
    summary.prompt_tokens, summary.completion_tokens = report.prompt_tokens, report.completion_tokens
    summary.usd_actual = report.usd
    summary.errors += report.errors
    return summary
