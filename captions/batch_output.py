"""Batch output files, line by line: which lines are answers, which are failures, which are junk.

Nothing in an output file is trusted: a line that is not JSON, not an object, has no
``custom_id``, or names one this batch never asked (or one already seen) is skipped (the caller
says so in one line); a 200 whose body is no chat completion fails that request (its tokens
still count when the body holds them); an answer far longer than ``--max-tokens`` allows is
flagged invalid (``captions.answers.screen``); a 400 about the image's content is flagged like a
refusal, as in sync mode. Everything else that answered becomes a cache row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from captions.answers import Answer, MalformedResponse, parse_completion, screen
from captions.client import CONTENT_ERROR_CODES, redact
from captions.cost import Prices
from captions.jobs import CacheItem, answer_usd, broken_answer, cache_row

log = logging.getLogger(__name__)
WARN_LINES = 5  # skipped lines warned about one by one, per file; the rest are counted


@dataclass
class BatchReport:
    """What a submit/resume pass did."""

    submitted_batches: int = 0
    submitted_requests: int = 0
    succeeded: int = 0
    refused: int = 0
    failed: int = 0
    rejected: int = 0  # of failed: lines the server rejected as invalid (4xx): a rerun fails them again
    invalid: int = 0  # answers far longer than --max-tokens allows (also in refused)
    broken: int = 0  # 200 lines whose body was not a usable completion (tokens counted)
    lost: int = 0  # requests of batches the server no longer knows (planned again next run)
    lost_keys: set[str] = field(default_factory=set)
    pending_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float | None = 0.0  # None once an answer of an unpriced model is ingested
    errors: list[str] = field(default_factory=list)


def read_lines(text: str, where: str, meta: dict[str, Any], seen: set[str], rows: list[dict[str, Any]],
               report: BatchReport, secret: str | None, prices: Prices | None) -> int:
    """Turn one output or error file into cache ``rows`` (appended) and ``report`` counts.

    Args:
        where: "batch <local id>: <file>", for the warnings.
        meta: the batch's items (custom_id -> CacheItem fields); ``seen`` collects the ids met.

    Returns:
        How many lines were skipped as unusable.
    """
    skipped = 0
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        record, why = _record(raw, meta, seen)
        if record is None:
            skipped += 1
            if skipped <= WARN_LINES:
                log.warning("%s: skipping line %d: %s", where, n, why)
            continue
        key = record["custom_id"]
        seen.add(key)
        response = _as_dict(record.get("response"))
        body, status = response.get("body"), response.get("status_code")
        item = CacheItem(key, **meta[key])
        if status == 200 and not record.get("error"):
            try:
                answer, invalid = screen(parse_completion(body), item.params.get("max_tokens"))
            except MalformedResponse:
                _count_broken(report, item, body, prices)
            else:
                report.invalid += int(invalid is not None)
                if invalid is not None and len(report.errors) < 5:
                    report.errors.append(f"{item.slice_id}: {invalid}")
                request_id = response.get("request_id")
                rows.append(cache_row(item, answer, "batch", request_id if isinstance(request_id, str) else None,
                                      prices=prices))
                continue
        if _content_refusal(status, body):
            rows.append(cache_row(item, Answer(_message(record, body) or "content filtered", "content_filter",
                                               True, 0, 0, None, None), "batch", prices=prices))
            continue
        report.failed += 1
        report.rejected += int(isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 429))
        if len(report.errors) < 5:
            error = _as_dict(record.get("error")) or _as_dict(_as_dict(body).get("error")) or record.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            report.errors.append(redact(str(message or error or f"status {status}")[:200], secret))
    return skipped


def count_rows(report: BatchReport, rows: list[dict[str, Any]]) -> None:
    """Count committed rows into the report (refused, ok, tokens, USD)."""
    for row in rows:
        report.refused += int(row["refused"])
        report.succeeded += int(not row["refused"])
        _count_usd(report, row["prompt_tokens"], row["completion_tokens"], row["cost_usd"])


def _record(raw: str, meta: dict[str, Any], seen: set[str]) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a usable output line, else (None, why it is skipped)."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None, "not JSON"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not a record"
    key = record.get("custom_id")
    if not isinstance(key, str) or not key:
        return None, "no custom_id"
    if key not in meta:
        return None, f"custom_id {key[:40]!r} was not asked in this batch"
    if key in seen:
        return None, f"custom_id {key[:40]!r} repeated (the first line counts)"
    return record, None


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _content_refusal(status: Any, body: Any) -> bool:
    """A 400 about this image's content: flagged like a refusal (as in sync), not failed."""
    code = _as_dict(_as_dict(body).get("error")).get("code")
    return status == 400 and code in CONTENT_ERROR_CODES


def _message(record: dict[str, Any], body: Any) -> str | None:
    message = _as_dict(_as_dict(body).get("error")).get("message") or _as_dict(record.get("error")).get("message")
    return message if isinstance(message, str) else None


def _count_usd(report: BatchReport, prompt: int, completion: int, usd: float | None) -> None:
    report.prompt_tokens += prompt
    report.completion_tokens += completion
    report.usd = None if usd is None or report.usd is None else report.usd + usd


def _count_broken(report: BatchReport, item: CacheItem, body: Any, prices: Prices | None) -> None:
    """A 200 line whose body is no completion: its tokens count when the body still holds them."""
    spent = broken_answer(json.dumps(body).encode() if body is not None else None, 0, 0)
    if spent is not None and spent.usage == "reported":
        report.broken += 1
        _count_usd(report, spent.prompt_tokens, spent.completion_tokens, answer_usd(item, spent, "batch", prices))
