"""kill -9 mid-run (sync and batch) loses no paid answer and never pays twice; Batch API flow."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from caption_driver import make_requests, write_pngs
from fake_openai import TEST_KEY as KEY
from fake_openai import FakeOpenAI

from captions import batch as batchflow
from captions.cache import CaptionCache
from captions.cost import cost_usd
from captions.engine import lookup, run_captions
from captions.jobs import CacheItem
from captions.options import CaptionOptions, RetryPolicy

DRIVER = Path(__file__).parent / "caption_driver.py"
N, CONCURRENCY = 40, 4


def options(fake: FakeOpenAI, **kw) -> CaptionOptions:
    return CaptionOptions(base_url=fake.base_url, api_key=KEY, **kw)


def start_driver(fake: FakeOpenAI, images: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    return subprocess.Popen(
        [sys.executable, str(DRIVER), "--base-url", fake.base_url, "--images", str(images),
         "--cache", str(cache), "--concurrency", str(CONCURRENCY), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def cached_rows(cache: Path) -> int:
    try:
        db = sqlite3.connect(cache, timeout=1.0)
        try:
            return db.execute("SELECT count(*) FROM captions").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:  # not created yet
        return 0


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"driver ended before the kill: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the driver"
        time.sleep(0.005)


def texts(cache: Path) -> dict[str, str]:
    with CaptionCache(cache) as db:
        return {row["key"]: row["text"] for row in db.rows()}


def test_sync_kill_9_loses_no_answer_and_never_pays_twice(tmp_path, start_fake_openai):
    images = write_pngs(tmp_path / "png", N)
    requests = make_requests(images)
    sync = dict(concurrency=CONCURRENCY, retry=RetryPolicy(initial_s=0.01))
    # Reference: an uninterrupted run against its own server.
    run_captions(requests, options(start_fake_openai(), **sync), cache=tmp_path / "ref.sqlite")
    reference = texts(tmp_path / "ref.sqlite")
    assert len(reference) == N

    cache = tmp_path / "captions.sqlite"
    fake = start_fake_openai(latency=0.1)
    proc = start_driver(fake, images, cache)
    wait_for(lambda: cached_rows(cache) >= 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with CaptionCache(cache) as db:  # opening recovers the WAL, as a rerun would
        committed = {row["image_sha256"] for row in db.rows()}
    assert 8 <= len(committed) < N, "the kill must land mid-run"
    time.sleep(0.15)  # let the server finish the requests that were in flight at the kill
    seen_before_rerun = len(fake.chat_log())

    summary = run_captions(requests, options(fake, **sync), cache=cache)
    rerun = fake.chat_log()[seen_before_rerun:]
    answered = Counter(r["signature"] for r in fake.answered())

    # 1. The rerun asked only for what was not committed at the kill, and nothing else.
    assert not {r["image_sha256"] for r in rerun} & committed
    assert summary.cached == len(committed) and summary.sent == N - len(committed) == len(rerun)
    # 2. The final cache equals an uninterrupted run's, key for key and text for text.
    assert texts(cache) == reference
    # 3. Over both runs every request was answered once, except requests in flight at the kill:
    #    at most CONCURRENCY duplicates, none of them a committed answer.
    duplicates = {sig: n - 1 for sig, n in answered.items() if n > 1}
    assert len(answered) == N and sum(duplicates.values()) <= CONCURRENCY
    assert all(n == 2 for n in answered.values() if n > 1)


def test_batch_kill_after_create_resumes_polling_and_submits_nothing_new(tmp_path, start_fake_openai):
    images = write_pngs(tmp_path / "png", N)
    requests = make_requests(images)
    cache, batch_dir = tmp_path / "captions.sqlite", tmp_path / "batches"
    fake = start_fake_openai(batch_delay=1.0)
    proc = start_driver(fake, images, cache, "--mode", "batch", "--batch-dir", str(batch_dir))
    state = batch_dir / batchflow.STATE_NAME

    def submitted() -> bool:
        entries = json.loads(state.read_text())["batches"] if state.exists() else []
        return any(e.get("batch_id") for e in entries)

    wait_for(submitted, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert fake.calls("POST", "/v1/batches") == 1 and fake.calls("POST", "/v1/files") == 1
    assert not fake.batches[next(iter(fake.batches))].get("output_file_id")  # killed before download
    assert [p["status"] for p in batchflow.status(batch_dir)] == ["submitted"]
    assert cached_rows(cache) == 0

    batch = options(fake, mode="batch", poll_interval=0.05)
    summary = run_captions(requests, batch, cache=cache, batch_dir=batch_dir)
    assert fake.calls("POST", "/v1/batches") == 1 and fake.calls("POST", "/v1/files") == 1
    assert fake.chat_log() == []
    assert summary.sent == 0 and summary.succeeded == N and summary.failed == 0
    assert batchflow.status(batch_dir) == []
    for path in [*batch_dir.iterdir(), *tmp_path.glob("captions.sqlite*")]:
        assert b"SECRET123" not in path.read_bytes()
    with CaptionCache(cache) as db:
        rows = lookup(requests, batch, cache=db)
    assert len(rows) == N
    for row in rows.values():  # joined by custom_id although the server reversed the order
        assert row["text"].startswith("Synthetic caption " + row["image_sha256"][:12])
        assert row["mode"] == "batch"
        assert row["cost_usd"] == pytest.approx(
            cost_usd("gpt-4o", row["prompt_tokens"], row["completion_tokens"]) / 2)


def test_batch_without_waiting_then_status_then_finish(tmp_path, start_fake_openai):
    images = write_pngs(tmp_path / "png", 6)
    (images / "img999.png").write_bytes(b"not a png")  # the server rejects it: error file
    requests = make_requests(images)
    cache, batch_dir = tmp_path / "c.sqlite", tmp_path / "batches"
    fake = start_fake_openai(batch_delay=0.2)
    batch = options(fake, mode="batch", poll_interval=0.05)
    first = run_captions(requests, replace(batch, batch_wait=False), cache=cache, batch_dir=batch_dir)
    assert (first.sent, first.pending, first.succeeded) == (7, 7, 0)
    pending = batchflow.status(batch_dir)
    assert len(pending) == 1 and pending[0]["n_requests"] == 7
    assert pending[0]["remote_status"] in ("validating", "in_progress")
    time.sleep(0.25)
    refreshed = batchflow.status(batch_dir, api_key=KEY, base_url=fake.base_url)
    assert refreshed[0]["remote_status"] == "completed" and refreshed[0]["status"] == "submitted"
    dry = run_captions(requests, replace(batch, dry_run=True), cache=cache, batch_dir=batch_dir)
    assert (dry.pending, dry.to_send) == (7, 0)  # never submitted twice, even in plans
    second = run_captions(requests, batch, cache=cache, batch_dir=batch_dir)
    # The old batch is ingested; its failed request is not cached, so this run submits it
    # once more (and the server rejects it again). Nothing answered is ever resubmitted.
    assert (second.sent, second.succeeded, second.failed) == (1, 6, 2)
    assert "Invalid request" in second.errors[0]
    assert fake.calls("POST", "/v1/batches") == 2
    lines = Counter(r["custom_id"] for r in fake.log if r["path"] == "batch-line")
    assert sorted(lines.values()) == [1] * 6 + [2]


def test_batch_created_but_id_not_saved_is_adopted_not_resubmitted(tmp_path, start_fake_openai):
    requests = make_requests(write_pngs(tmp_path / "png", 5))
    cache, batch_dir = tmp_path / "c.sqlite", tmp_path / "batches"
    fake = start_fake_openai(batch_delay=0.1)
    batch = options(fake, mode="batch", poll_interval=0.05)
    run_captions(requests, replace(batch, batch_wait=False), cache=cache, batch_dir=batch_dir)
    # Simulate a crash between batches.create returning and the state save.
    store = batchflow.BatchStore(batch_dir)
    entry = store.entries[0]
    entry["status"] = "uploaded"
    entry.pop("batch_id")
    store.save()
    summary = run_captions(requests, batch, cache=cache, batch_dir=batch_dir)
    assert fake.calls("POST", "/v1/batches") == 1 and fake.calls("POST", "/v1/files") == 1
    assert summary.succeeded == 5


def test_batch_mode_needs_a_batch_dir(tmp_path, fake_openai):
    with pytest.raises(ValueError, match="batch_dir"):
        run_captions([], options(fake_openai, mode="batch"), cache=tmp_path / "c.sqlite")


def test_jsonl_files_respect_request_and_size_limits(tmp_path):
    store = batchflow.BatchStore(tmp_path)
    items = [CacheItem(f"k{i}", f"s{i}", "sha", "openai", "gpt-4o", "v1", {}) for i in range(7)]
    entries = batchflow.write_inputs(store, items, lambda item: {"pad": "x" * 100}, max_requests=3)
    assert [e["n_requests"] for e in entries] == [3, 3, 1]
    entries = batchflow.write_inputs(store, items, lambda item: {"pad": "x" * 100}, max_bytes=450)
    sizes = [(tmp_path / e["input_file"]).stat().st_size for e in entries]
    assert max(sizes) <= 450 and sum(e["n_requests"] for e in entries) == 7
    lines = (tmp_path / entries[0]["input_file"]).read_text().splitlines()
    assert json.loads(lines[0])["custom_id"] == "k0" and json.loads(lines[0])["url"] == "/v1/chat/completions"
