"""Captioning engine: plan (cache, budget, cost), then answer offline, synchronously or by batch.

The contract with the caller is ``CaptionRequest`` and ``CaptionOptions`` in, cache rows out:
``run_captions`` fills the cache and returns counts; ``lookup`` reads the best row per slice
back. Every answer is committed to the cache as it arrives, so a killed run loses nothing that
was answered, and a rerun never asks for a cached key again. Only requests in flight at the kill
are asked again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from captions import batch as batchflow
from captions.budget import Budget
from captions.cache import CaptionCache
from captions.client import Answer, make_openai
from captions.errors import FatalAPIError
from captions.images import image_bytes
from captions.jobs import CacheItem, CaptionRequest, Job, cache_row, caption_job, fallback_version
from captions.models import completion_params
from captions.offline import offline_caption
from captions.options import CaptionOptions
from captions.plan import CaptionSummary, estimate, plan
from captions.prompts import build_messages
from captions.sync import run_sync

OFFLINE_CHUNK = 1000  # free answers: durable per chunk is enough


def lookup(requests: Sequence[CaptionRequest], options: CaptionOptions, *,
           cache: CaptionCache) -> dict[str, dict[str, Any]]:
    """Best cached row per slice_id: an accepted fallback answer, else the primary answer
    (which may be ``refused=True``: never use its text as a caption). Missing slices are absent."""
    pairs = [(req, caption_job(options, req).key,
              None if options.offline else caption_job(options, req, fallback_version(options)).key)
             for req in requests]
    rows = cache.get_many([k for _, p, f in pairs for k in (p, f) if k])
    out: dict[str, dict[str, Any]] = {}
    for req, primary, fallback in pairs:
        fb, pr = rows.get(fallback) if fallback else None, rows.get(primary)
        best = fb if fb is not None and not fb["refused"] else pr if pr is not None else fb
        if best is not None:
            out[req.slice_id] = best
    return out


def run_captions(
    requests: Sequence[CaptionRequest],
    options: CaptionOptions,
    *,
    cache: CaptionCache | str | Path,
    batch_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_update: Callable[[CaptionSummary], None] | None = None,
) -> CaptionSummary:
    """Caption every request that has no cached answer, within the budget of ``options``.

    Args:
        requests: slices in the order captions are bought.
        options: provider, model, mode, budget, limits... (see ``CaptionOptions``).
        cache: an open ``CaptionCache`` or the path of one.
        batch_dir: where batch state lives (``Workdir.batches``); needed in batch mode.
        progress: called as ``progress(done, total)`` after each answered request.
        on_update: called with the live summary right after ``progress`` (cache hits,
            failures, tokens and USD so far), for progress displays.

    Raises:
        FatalAPIError: auth, quota or bad-request errors; ``exc.summary`` holds the counts.
        ValueError: batch mode without ``batch_dir``.
    """
    started = time.monotonic()
    if not options.offline and not options.dry_run:
        options.request_key()  # no key and no local server: stop before anything is planned
    if options.mode == "batch" and batch_dir is None:
        raise ValueError("batch mode needs batch_dir (Workdir.batches)")
    budget = Budget.of(options)
    db, owned = (cache, False) if isinstance(cache, CaptionCache) else (CaptionCache(cache), True)
    try:
        store = batchflow.BatchStore(batch_dir) if options.mode == "batch" else None
        if store is not None and not options.dry_run:
            summary = asyncio.run(_run_batch(options, requests, db, store, budget))
        else:
            exclude = store.pending_keys() if store is not None else set()
            jobs, summary = plan(options, requests, db, budget, exclude)
            report = progress
            if progress is not None and on_update is not None:
                def report(done: int, total: int) -> None:
                    progress(done, total)
                    on_update(summary)
            if options.dry_run or not jobs:
                pass
            elif options.offline:
                _run_offline(jobs, db, summary, report)
            else:
                asyncio.run(run_sync(options, jobs, db, summary, budget, report))
        summary.elapsed_s = time.monotonic() - started
        return summary
    finally:
        if owned:
            db.close()


def collect_batches(options: CaptionOptions, *, cache: CaptionCache, batch_dir: str | Path) -> CaptionSummary:
    """Poll and ingest the submitted batches of ``batch_dir`` without sending anything new
    (their answers were paid: they belong in the cache whatever happens to the release)."""
    store = batchflow.BatchStore(batch_dir)
    summary = CaptionSummary(options.provider, options.model, options.mode)
    if not any(e.get("batch_id") for e in store.active()):
        return summary

    async def collect() -> batchflow.BatchReport:
        secret = options.request_key()
        client = make_openai(secret, options.base_url, options.timeout)
        try:
            return await batchflow.advance(client, store, cache, wait=False, poll_interval=options.poll_interval,
                                           policy=options.retry, secret=secret, prices=options.prices,
                                           submit=False, deadline=options.timeout)
        finally:
            await client.close()

    report = asyncio.run(collect())
    summary.succeeded, summary.refused, summary.pending = report.succeeded, report.refused, report.pending_requests
    summary.errors += report.errors
    return summary


def _run_offline(jobs: list[Job], db: CaptionCache, summary: CaptionSummary,
                 progress: Callable[[int, int], None] | None) -> None:
    rows = [cache_row(j.item, Answer(offline_caption(j.req.context), "stop", False, 0, 0, None, None), "offline")
            for j in jobs]
    for i in range(0, len(rows), OFFLINE_CHUNK):
        chunk = rows[i : i + OFFLINE_CHUNK]
        db.put_many(chunk)
        summary.sent += len(chunk)  # counted as they land, so a progress line reads true
        summary.succeeded += len(chunk)
        if progress is not None:
            progress(min(i + OFFLINE_CHUNK, len(rows)), len(rows))


async def _run_batch(options: CaptionOptions, requests: Sequence[CaptionRequest], db: CaptionCache,
                     store: batchflow.BatchStore, budget: Budget) -> CaptionSummary:
    """Resume saved batches first, then submit what is neither cached nor pending."""
    secret = options.request_key()
    client = make_openai(secret, options.base_url, options.timeout)
    flow = dict(poll_interval=options.poll_interval, policy=options.retry, secret=secret, prices=options.prices,
                token_limit=options.batch_token_limit, deadline=options.timeout)
    report = batchflow.BatchReport()
    try:
        # Batches of an earlier (possibly killed) run are polled and ingested, never resent.
        await batchflow.advance(client, store, db, wait=False, report=report, **flow)
        # A batch found lost just now is asked again by the next run, not this one.
        jobs, summary = plan(options, requests, db, budget, store.pending_keys() | report.lost_keys)
        unreadable = [j for j in jobs if not j.req.image_path.is_file()]
        for job in unreadable:
            summary.errors.append(f"{job.req.slice_id}: image not found: {job.req.image_path}")
        missing = {j.key for j in unreadable}
        by_key = {j.key: j for j in jobs if j.key not in missing}

        def body(item: CacheItem) -> dict[str, Any]:
            job = by_key[item.key]
            messages = build_messages(job.req, image_bytes(job.req.image_path, options.image_size), options.detail,
                                      version=options.template(job.version))
            return {"model": options.model, "messages": messages,
                    **completion_params(options.model, options.completion_cap, options.temperature,
                                        options.reasoning_effort)}

        tokens = None
        if options.batch_token_limit is not None:
            def tokens(item: CacheItem) -> int:
                return estimate(options, by_key[item.key]).input_tokens

        batchflow.write_inputs(store, (j.item for j in by_key.values()), body, tokens=tokens,
                               max_tokens=options.batch_token_limit)
        await batchflow.advance(client, store, db, wait=options.batch_wait, report=report, **flow)
    except FatalAPIError as exc:
        exc.summary = CaptionSummary(options.provider, options.model, options.mode, total=len(requests),
                                     stopped=str(exc))
        raise
    finally:
        await client.close()
    summary.sent = report.submitted_requests
    summary.pending = report.pending_requests
    summary.succeeded, summary.refused = report.succeeded, report.refused
    summary.failed = report.failed + report.lost + len(unreadable)
    summary.rejected = report.rejected + len(unreadable)
    summary.invalid, summary.broken = report.invalid, report.broken
    summary.prompt_tokens, summary.completion_tokens = report.prompt_tokens, report.completion_tokens
    summary.usd_actual = report.usd
    summary.errors += report.errors
    return summary
