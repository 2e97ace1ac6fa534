"""The sync run: a pool of workers sends planned jobs now, committing each answer as it arrives.

Each answer is durable in the cache before its worker counts it or moves on, so a killed run
loses nothing that was answered; only requests in flight at the kill (at most ``--concurrency``)
are asked again. Answers that come back empty because the completion cap ran out (a reasoning
model that spent it all reasoning) are kept, flagged, and stop the run after a few, with one line
naming the fix, instead of paying for every slice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from captions.answers import Answer, screen
from captions.budget import Budget
from captions.cache import CaptionCache
from captions.client import CaptionClient, Stopped, redact
from captions.cost import Estimate
from captions.errors import FatalAPIError
from captions.images import image_bytes
from captions.jobs import (
    Job,
    answer_usd,
    broken_answer,
    cache_row,
    caption_job,
    fallback_version,
    primary_version,
    with_estimated_usage,
)
from captions.options import CaptionOptions
from captions.plan import CaptionSummary, estimate
from captions.prompts import build_messages

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 20  # a run whose every request exhausts its retries stops
TRUNCATED_STOP = 3  # empty "length" answers that stop a run (when they are >= 1/4 of answers)


def truncation_stop(options: CaptionOptions, n: int) -> str:
    """The one line that stops a run whose answers come back empty at the completion cap."""
    if options.reasoning_effort is not None:
        fix = (f"lower --reasoning-effort (now {options.reasoning_effort}) or raise --max-tokens "
               f"(now {options.max_tokens})")
    else:
        fix = f"raise --max-tokens (now {options.max_tokens})"
    return (f"{n} answers came back empty with finish_reason=length: the model used all "
            f"{options.completion_cap} completion tokens before writing a caption; {fix}")


class GroupCommitter:
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


async def run_sync(options: CaptionOptions, jobs: list[Job], db: CaptionCache, summary: CaptionSummary,
                   budget: Budget, progress: Callable[[int, int], None] | None) -> None:
    """Send ``jobs`` with ``options.concurrency`` workers; fallback re-asks join the queue.

    Raises:
        FatalAPIError: auth, quota or bad request, or too many failures in a row;
            ``exc.summary`` holds the counts.
    """
    secret = options.request_key()
    client = CaptionClient(api_key=secret, base_url=options.base_url, model=options.model,
                           timeout=options.timeout, concurrency=options.concurrency, rpm=options.rpm,
                           tpm=options.tpm, retry=options.retry, reasoning_effort=options.reasoning_effort)
    queue = deque(jobs)
    committer = GroupCommitter(db)
    state: dict[str, Any] = {"fatal": None, "consecutive": 0, "done": 0}
    primary = primary_version(options)

    def count_usage(answer: Answer, usd: float | None) -> None:
        budget.spend(usd)
        summary.prompt_tokens += answer.prompt_tokens
        summary.completion_tokens += answer.completion_tokens
        summary.usage_estimated += int(answer.usage == "estimated")
        summary.usd_actual = None if usd is None or summary.usd_actual is None else summary.usd_actual + usd

    def error_line(job: Job, reason: str, what: str = "caption failed") -> None:
        if len(summary.errors) < 10:
            summary.errors.append(f"{job.req.slice_id}: {reason}")
        log.warning("%s for %s: %s", what, job.req.slice_id, reason)

    async def worker() -> None:
        while queue and state["fatal"] is None:
            job = queue.popleft()
            if not budget.may_send(job.estimate.usd if job.estimate else None):
                summary.over_budget += 1
                summary.stopped = budget.send_stop
                continue
            est = job.estimate or estimate(options, job)
            budget.reserve(est.usd)

            def on_broken(body: bytes | None, job: Job = job, est: Estimate = est) -> None:  # maybe paid
                spent = broken_answer(body, est.input_tokens, est.output_tokens)
                if spent is not None:
                    summary.broken += 1
                    count_usage(spent, answer_usd(job.item, spent, "sync", options.prices, any_price=True))

            try:
                messages = build_messages(job.req, image_bytes(job.req.image_path, options.image_size),
                                          options.detail, version=options.template(job.version))
                summary.sent += 1
                answer = await client.complete(messages, max_tokens=options.completion_cap,
                                               temperature=options.temperature,
                                               est_tokens=est.input_tokens + est.output_tokens,
                                               on_broken=on_broken)
            except FatalAPIError as exc:
                state["fatal"] = exc
                client.stop()
                return
            except Stopped:
                summary.sent -= 1
                return
            except Exception as exc:  # retries exhausted, a wait too long, unreadable image: this slice only
                summary.failed += 1
                summary.rejected += int(isinstance(exc, OSError))  # the image: a rerun would fail too
                state["consecutive"] += 1
                reason = redact(f"{type(exc).__name__}: {exc}", secret)
                error_line(job, reason)
                if state["consecutive"] >= MAX_CONSECUTIVE_FAILURES:
                    state["fatal"] = FatalAPIError(f"{state['consecutive']} requests in a row failed; last: {reason}")
                    client.stop()
                continue
            finally:
                budget.release(est.usd)
            state["consecutive"] = 0
            answer = with_estimated_usage(answer, est.input_tokens)
            answer, invalid = screen(answer, options.max_tokens)  # a runaway caption is never used
            if invalid is not None:
                summary.invalid += 1
                error_line(job, invalid, "caption flagged")
            row = cache_row(job.item, answer, "sync", prices=options.prices)
            await committer.commit(row)  # durable before this worker counts it or moves on
            count_usage(answer, row["cost_usd"])
            summary.refused += int(answer.refused and not answer.truncated)
            summary.truncated += int(answer.truncated)
            summary.succeeded += int(not answer.refused)
            state["done"] += 1
            if progress is not None:
                progress(state["done"], summary.to_send)
            if summary.truncated >= TRUNCATED_STOP and 4 * summary.truncated >= state["done"]:
                if state["fatal"] is None:
                    state["fatal"] = FatalAPIError(truncation_stop(options, summary.truncated))
                    client.stop()
                return
            if answer.refused and not answer.truncated and options.retry_refused and job.version == primary:
                retry_job = caption_job(options, job.req, fallback_version(options))
                if retry_job.key in db:
                    continue
                # The re-ask belongs to a slice already inside --budget; --max-usd still caps it.
                retry_job.estimate = estimate(options, retry_job)
                summary.to_send += 1
                queue.appendleft(retry_job)

    writer = asyncio.create_task(committer.run())
    try:
        await asyncio.gather(*(worker() for _ in range(options.concurrency)))
    finally:
        writer.cancel()
        summary.http_requests = client.attempts
        await client.aclose()
    if state["fatal"] is not None:
        exc = state["fatal"]
        summary.stopped = str(exc)
        exc.summary = summary
        raise exc
