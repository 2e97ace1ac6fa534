"""Batch API flow: JSONL in, poll, output and error files back into the cache.

Each JSONL file holds at most 50,000 requests and 200 MB; ``custom_id`` is the cache key, and
results are joined by ``custom_id``, never by position. Local state (``batch_state.json``,
written atomically) records each step *before* the next one starts: prepared -> uploaded
(input file id) -> submitted (batch id, saved right after ``batches.create`` returns) ->
ingested. A rerun after a crash resumes from the saved step: it polls a submitted batch instead
of submitting again, and adopts a batch created from an uploaded file whose id was not yet
saved (found by input file id), so no request is paid twice.

Output files are not trusted line by line (``captions.batch_output``): a line that is not a
usable record is skipped with one warning, and every other line is ingested (those answers
were paid). A batch the server no longer knows (404 on retrieve) is
marked ``lost`` with one line; its requests are planned again by the next run.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import openai

from captions.batch_output import BatchReport, count_rows, read_lines
from captions.cache import CaptionCache
from captions.client import EndpointMissing, call_with_retry, make_openai, redact
from captions.cost import Prices
from captions.errors import FatalAPIError
from captions.jobs import CacheItem
from captions.options import RetryPolicy
from curation.store.fsutil import atomic_write_text

log = logging.getLogger(__name__)

MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1024 * 1024
ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
DONE = ("ingested", "lost")  # local states that hold no pending request
NOT_FOUND_TRIES = 3  # 404s in a row (with backoff) before a batch counts as lost
DOWNLOAD_DEADLINE_FACTOR = 10  # an output file download may take 10 x --timeout as a whole
STATE_NAME = "batch_state.json"


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text, fsync=True)


class BatchStore:
    """Local batch state: a JSON list of entries plus per-batch JSONL and item files."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / STATE_NAME
        data = json.loads(self.path.read_text()) if self.path.exists() else {"batches": []}
        self.entries: list[dict[str, Any]] = data["batches"]

    def save(self) -> None:
        _atomic_write(self.path, json.dumps({"version": 1, "batches": self.entries}, indent=1))

    def active(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["status"] not in DONE]

    def items(self, entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return json.loads((self.dir / entry["items_file"]).read_text())

    def pending_keys(self) -> set[str]:
        """Keys inside batches that are not ingested yet (must not be submitted again)."""
        keys: set[str] = set()
        for entry in self.active():
            keys.update(self.items(entry))
        return keys


def status(directory: str | Path, *, api_key: str | None = None, base_url: str | None = None,
           timeout: float = 60.0) -> list[dict[str, Any]]:
    """Pending (not yet ingested) batches from the local state; with ``api_key``, each one's
    remote status is refreshed first (nothing is ingested, submitted or written)."""
    store = BatchStore(directory)
    if api_key and store.active():
        asyncio.run(_refresh(store, api_key, base_url, timeout))  # status only: never marks lost
    return [
        {k: e.get(k) for k in ("local_id", "status", "batch_id", "remote_status", "n_requests",
                               "request_counts", "created_at")}
        for e in store.active()
    ]


async def _refresh(store: BatchStore, api_key: str, base_url: str | None, timeout: float) -> None:
    client = make_openai(api_key, base_url, timeout)
    try:
        for entry in store.active():
            if entry.get("batch_id"):
                try:
                    batch = await _retrieve(client, entry, RetryPolicy(), api_key, timeout)
                except _Unknown:
                    entry["remote_status"] = "not found (404)"
                    continue
                except FatalAPIError as exc:
                    entry["remote_status"] = f"unknown: {exc}"
                    continue
                entry["remote_status"] = batch.status
                entry["request_counts"] = batch.request_counts.model_dump() if batch.request_counts else None
        # Not saved: a paying run may hold this state now (status takes no lock), and a stale
        # copy written over its newer one could have an ingested batch ingested again.
    finally:
        await client.close()


def write_inputs(
    store: BatchStore,
    items: Iterable[CacheItem],
    make_body: Callable[[CacheItem], dict[str, Any]],
    *,
    max_requests: int = MAX_REQUESTS_PER_FILE,
    max_bytes: int = MAX_BYTES_PER_FILE,
    tokens: Callable[[CacheItem], int] | None = None,
    max_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Write JSONL files within the limits; register each as a 'prepared' entry (saved).

    ``tokens`` estimates a request's input tokens; with ``max_tokens`` (the enqueued-token
    limit) a file holds at most that many, so each batch alone fits the limit.
    """
    entries: list[dict[str, Any]] = []
    fh = None
    size = 0
    est = 0
    meta: dict[str, dict[str, Any]] = {}

    def close() -> None:
        nonlocal fh
        if fh is None:
            return
        fh.close()
        entry = entries[-1]
        entry["n_requests"] = len(meta)
        entry["est_tokens"] = est
        _atomic_write(store.dir / entry["items_file"], json.dumps(meta))
        store.entries.append(entry)
        store.save()
        fh = None

    for item in items:
        line = (json.dumps({"custom_id": item.key, "method": "POST", "url": ENDPOINT,
                            "body": make_body(item)}, separators=(",", ":")) + "\n").encode()
        if len(line) > max_bytes:
            raise ValueError(f"one batch request is larger than {max_bytes} bytes: {item.slice_id}")
        cost = int(tokens(item)) if tokens is not None else 0
        full = max_tokens is not None and meta and est + cost > max_tokens
        if fh is not None and (len(meta) >= max_requests or size + len(line) > max_bytes or full):
            close()
        if fh is None:
            local_id = uuid.uuid4().hex[:12]
            entries.append({"local_id": local_id, "status": "prepared", "input_file": f"{local_id}.jsonl",
                            "items_file": f"{local_id}.items.json",
                            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat()})
            fh = open(store.dir / f"{local_id}.jsonl", "wb")
            size, est, meta = 0, 0, {}
        fh.write(line)
        size += len(line)
        est += cost
        # The items file holds each key's CacheItem fields; _ingest rebuilds the item from them.
        meta[item.key] = {"slice_id": item.slice_id, "image_sha256": item.image_sha256,
                          "provider": item.provider, "model": item.model,
                          "prompt_version": item.prompt_version, "params": item.params}
    close()
    return entries


async def _create(client: openai.AsyncOpenAI, store: BatchStore, entry: dict[str, Any],
                  policy: RetryPolicy, secret: str | None) -> None:
    """Advance a 'prepared' or 'uploaded' entry to 'submitted', saving after each step."""
    no_api = (f"the server at {client.base_url} has no Batch API (its Files/Batches endpoints answer "
              "404/405); use --mode sync")
    if entry["status"] == "prepared":
        path = store.dir / entry["input_file"]
        uploaded = await call_with_retry(
            lambda: client.files.create(file=(path.name, path.read_bytes(), "application/jsonl"),
                                        purpose="batch"), policy, secret, missing=no_api)
        entry.update(status="uploaded", input_file_id=uploaded.id)
        store.save()
    if entry["status"] == "uploaded":
        # A crash between batches.create and the save below leaves a batch we do not know:
        # find it by its input file before creating another.
        batch = None
        try:
            listing = await call_with_retry(lambda: client.batches.list(limit=100), policy, secret,
                                            missing="batches.list unsupported")
        except EndpointMissing:
            log.info("batches.list is not supported by this server; orphan adoption skipped")
            listing = None
        for candidate in listing.data if listing is not None else ():
            if candidate.input_file_id == entry["input_file_id"]:
                batch = candidate
                break
        if batch is None:
            batch = await call_with_retry(
                lambda: client.batches.create(input_file_id=entry["input_file_id"], endpoint=ENDPOINT,
                                              completion_window="24h",
                                              metadata={"local_id": entry["local_id"]}),
                policy, secret, missing=no_api)
        entry.update(status="submitted", batch_id=batch.id, remote_status=batch.status,
                     base_url=str(client.base_url))
        store.save()  # first thing after creation: a rerun now polls instead of resubmitting


class _Unknown(Exception):
    """The server answers 404/405 for a batch we submitted."""


async def _retrieve(client: openai.AsyncOpenAI, entry: dict[str, Any], policy: RetryPolicy,
                    secret: str | None, deadline: float | None) -> Any:
    """The batch of ``entry``; ``_Unknown`` when the server does not know it.

    Raises:
        FatalAPIError: the batch was submitted to another server (``--base-url`` changed): it
            may still be alive there, so it is neither marked lost nor submitted again.
    """
    for attempt in range(NOT_FOUND_TRIES):  # a fresh batch may read as 404 for a moment
        try:
            return await call_with_retry(lambda: client.batches.retrieve(entry["batch_id"]), policy, secret,
                                         missing="unknown batch", deadline=deadline)
        except EndpointMissing:
            if attempt + 1 < NOT_FOUND_TRIES:
                await asyncio.sleep(policy.initial_s * 2**attempt)
    try:  # the listing is a second witness, where the server has one
        listing = await call_with_retry(lambda: client.batches.list(limit=100), policy, secret, missing="no list",
                                        deadline=deadline)
        for candidate in listing.data:
            if candidate.id == entry["batch_id"]:
                return candidate
    except EndpointMissing:
        pass
    where = entry.get("base_url")
    if where and where.rstrip("/") != str(client.base_url).rstrip("/"):
        raise FatalAPIError(f"batch {entry['local_id']} ({entry['batch_id']}) was submitted to {where}, "
                            f"which is not this --base-url; rerun with --base-url {where} to collect it")
    raise _Unknown()


def _mark_lost(store: BatchStore, entry: dict[str, Any], report: BatchReport, secret: str | None) -> None:
    """A batch the server no longer knows: its requests are planned again by the next run."""
    line = (f"batch {entry['local_id']} ({entry['batch_id']}) is unknown to the server (404): marked lost; "
            f"its {entry.get('n_requests', 0)} requests are planned again on the next run")
    log.warning(line)
    report.errors.append(redact(line, secret))
    report.lost += entry.get("n_requests", 0)
    report.lost_keys.update(store.items(entry))
    entry.update(status="lost", remote_status="not found")
    store.save()


def batch_errors_line(batch: Any) -> str | None:
    """One line from a batch's ``errors`` (e.g. "token_limit_exceeded: Enqueued token limit...")."""
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) if errors is not None else None
    if not data:
        return None
    parts = []
    for err in data[:3]:
        code, message = getattr(err, "code", None), getattr(err, "message", None)
        parts.append(": ".join(str(p) for p in (code, message) if p))
    more = f" (+{len(data) - 3} more)" if len(data) > 3 else ""
    return " ".join("; ".join(parts).split()) + more


def download_deadline(deadline: float | None) -> float | None:
    """Seconds one output/error file download may take as a whole: ``DOWNLOAD_DEADLINE_FACTOR`` x
    ``--timeout`` (600 s at the default 60 s: a 200 MB file at ~340 KB/s). The client's read timeout
    restarts with every chunk, so without it a server that drips the file would hold the run forever."""
    return None if deadline is None else DOWNLOAD_DEADLINE_FACTOR * deadline


async def _ingest(client: openai.AsyncOpenAI, store: BatchStore, entry: dict[str, Any],
                  cache: CaptionCache, report: BatchReport, policy: RetryPolicy,
                  secret: str | None, prices: Prices | None = None, deadline: float | None = None) -> None:
    """Download output and error files, join by custom_id, commit rows, mark ingested.

    A line that cannot be used is skipped with one warning; the others are all ingested. Each
    download is bounded by ``download_deadline(deadline)``; one that keeps failing raises
    ``FatalAPIError`` and leaves the entry submitted, so the next run downloads it again.
    """
    meta = store.items(entry)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    skipped = 0
    for file_key in ("output_file_id", "error_file_id"):
        file_id = entry.get(file_key)
        if not file_id:
            continue
        name = file_key.removesuffix("_id").replace("_", " ")
        try:
            content = await call_with_retry(lambda file_id=file_id: client.files.content(file_id), policy, secret,
                                            missing="gone", deadline=download_deadline(deadline))
        except EndpointMissing:
            log.warning("batch %s: its %s %s is gone from the server (404); its requests are planned again",
                        entry["local_id"], name, file_id)
            continue
        skipped += read_lines(content.text, f"batch {entry['local_id']}: {name}", meta, seen, rows, report,
                              secret, prices)
    if skipped:
        line = f"batch {entry['local_id']}: skipped {skipped} output line(s) that were not usable records"
        log.warning("%s; every other line was ingested", line)
        report.errors.append(line)
    for i in range(0, len(rows), 1000):
        cache.put_many(rows[i : i + 1000])
    count_rows(report, rows)
    missing = len(meta) - len(seen)
    report.failed += missing  # expired, cancelled or failed before they ran: planned again next time
    entry.update(status="ingested", n_succeeded=len(rows), n_missing=missing)
    store.save()
    await _delete_files(client, entry, secret)


async def _delete_files(client: openai.AsyncOpenAI, entry: dict[str, Any], secret: str | None) -> None:
    """Delete the batch's uploaded input and its output/error files: everything is in the cache."""
    for file_key in ("input_file_id", "output_file_id", "error_file_id"):
        file_id = entry.get(file_key)
        if not file_id:
            continue
        try:
            await client.files.delete(file_id)
        except openai.APIError as exc:  # best effort: a file left behind costs storage, not money
            log.info("could not delete batch file %s: %s", file_id, redact(str(exc), secret))


async def advance(
    client: openai.AsyncOpenAI,
    store: BatchStore,
    cache: CaptionCache,
    *,
    wait: bool,
    poll_interval: float,
    policy: RetryPolicy,
    secret: str | None = None,
    report: BatchReport | None = None,
    on_poll: Callable[[list[dict[str, Any]]], None] | None = None,
    prices: Prices | None = None,
    token_limit: int | None = None,
    submit: bool = True,
    deadline: float | None = None,
) -> BatchReport:
    """Drive every unfinished entry forward: create, poll, ingest. ``wait=False`` polls once.

    ``submit=False`` only polls and ingests (nothing new is sent); ``deadline`` bounds each
    status request as a whole (``--timeout``).

    With ``token_limit`` (the enqueued-token limit) a prepared file is submitted only while the
    estimated input tokens of unfinished batches plus its own stay within it (a file alone is
    always allowed); the rest wait for earlier batches to finish, in this run or the next.
    """
    report = report or BatchReport()

    async def submit_ready() -> None:
        enqueued = sum(e.get("est_tokens", 0) for e in store.active() if e["status"] == "submitted")
        for entry in store.active():
            if entry["status"] not in ("prepared", "uploaded"):
                continue
            need = entry.get("est_tokens", 0)
            if token_limit is not None and enqueued and enqueued + need > token_limit:
                continue  # waits until enough of the queue has finished
            await _create(client, store, entry, policy, secret)
            enqueued += need
            report.submitted_batches += 1
            report.submitted_requests += entry["n_requests"]

    while True:
        if submit:
            await submit_ready()
        for entry in [e for e in store.active() if e["status"] == "submitted"]:
            try:
                batch = await _retrieve(client, entry, policy, secret, deadline)
            except _Unknown:
                _mark_lost(store, entry, report, secret)
                await _delete_files(client, entry, secret)  # its input file, if the server still has it
                continue
            counts = batch.request_counts.model_dump() if batch.request_counts else None
            changed = (batch.status, counts) != (entry.get("remote_status"), entry.get("request_counts"))
            entry.update(remote_status=batch.status, request_counts=counts,
                         output_file_id=batch.output_file_id, error_file_id=batch.error_file_id)
            if batch.status in TERMINAL:
                line = batch_errors_line(batch)
                if line is not None:
                    entry["errors"] = line
                    report.errors.append(redact(f"batch {entry['local_id']} {batch.status}: {line}", secret))
                await _ingest(client, store, entry, cache, report, policy, secret, prices, deadline)
            elif changed:
                store.save()
        active = store.active()
        if on_poll is not None:
            on_poll(active)
        if not active or not wait:
            report.pending_requests = sum(e["n_requests"] for e in active)
            return report
        await asyncio.sleep(poll_interval)
