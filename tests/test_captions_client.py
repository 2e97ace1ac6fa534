"""The real openai client against a real local fake server (the `fake_openai` fixture): faults,
retries, limits, budget, refusals and secrets."""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter

import pytest
from caption_driver import make_requests, write_pngs
from fake_openai import TEST_KEY as KEY

from captions.cache import CaptionCache
from captions.engine import lookup, run_captions
from captions.errors import FatalAPIError
from captions.options import CaptionOptions, RetryPolicy

FAST = RetryPolicy(initial_s=0.01, max_wait_s=0.1)
OPTIONS = CaptionOptions(model="gpt-4o", api_key=KEY, concurrency=4, retry=FAST, timeout=5.0)


def caption(requests, server, cache, **kw):
    options = CaptionOptions(**{**vars(OPTIONS), "base_url": server.base_url, **kw})
    return run_captions(requests, options, cache=cache)


def answered_twice(server) -> dict[str, int]:
    counts = Counter(r["signature"] for r in server.answered())
    return {sig: n for sig, n in counts.items() if n > 1}


def test_mixed_faults_complete_and_nothing_is_answered_twice(tmp_path, fake_openai):
    fake_openai.config.faults = {"429_header": 0.1, "429_ms": 0.05, "429_message": 0.1, "500": 0.1,
                                 "503": 0.05, "slow": 0.05, "malformed": 0.05, "text_plain": 0.05}
    fake_openai.config.retry_after, fake_openai.config.slow_seconds = 0.05, 2.0
    requests = make_requests(write_pngs(tmp_path / "png", 30))
    cache = tmp_path / "captions.sqlite"
    summary = caption(requests, fake_openai, cache, timeout=1.0)  # a whole attempt, loaded machines too
    # A request the client gave up on (timeout) may still be queued in a server thread on a
    # loaded machine: let stragglers reach the server's log before counting.
    deadline = time.monotonic() + 5.0
    while len(fake_openai.chat_log()) < summary.http_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    faults = Counter(r["fault"] for r in fake_openai.chat_log())
    assert sum(n for f, n in faults.items() if f) >= 8, faults  # the faults really happened
    assert (summary.sent, summary.succeeded, summary.failed) == (30, 30, 0)
    assert summary.http_requests == len(fake_openai.chat_log()) > 30
    with CaptionCache(cache) as db:
        rows = lookup(requests, OPTIONS, cache=db)
    assert len(rows) == 30 and not any(r["refused"] for r in rows.values())
    assert all(r["text"].startswith("Synthetic caption " + r["image_sha256"][:12]) for r in rows.values())
    assert all(r["request_id"] and r["mode"] == "sync" and r["cost_usd"] > 0 for r in rows.values())
    before = len(fake_openai.chat_log())
    again = caption(requests, fake_openai, cache)
    assert (again.cached, again.sent, len(fake_openai.chat_log())) == (30, 0, before)
    assert not answered_twice(fake_openai)


@pytest.mark.parametrize("fault", ["429_header", "429_ms", "429_message"])
def test_server_requested_wait_is_honoured(tmp_path, fake_openai, fault):
    fake_openai.config.script, fake_openai.config.retry_after = [fault], 0.25
    requests = make_requests(write_pngs(tmp_path / "png", 1))
    summary = caption(requests, fake_openai, tmp_path / "c.sqlite", concurrency=1)
    first, second = fake_openai.chat_log()
    assert first["status"] == 429 and second["status"] == 200 and summary.succeeded == 1
    assert second["t0"] - first["t1"] >= 0.25  # backoff alone would be ~0.01 s


@pytest.mark.parametrize("fault,needle", [("insufficient_quota", "insufficient_quota"), ("401", "401")])
def test_fatal_errors_stop_fast_with_one_clean_line(tmp_path, fake_openai, caplog, capsys, fault, needle):
    caplog.set_level(logging.DEBUG)
    fake_openai.config.fatal = fault
    requests = make_requests(write_pngs(tmp_path / "png", 40))
    cache = tmp_path / "captions.sqlite"
    started = time.monotonic()
    with pytest.raises(FatalAPIError) as info:
        caption(requests, fake_openai, cache, concurrency=4)
    assert time.monotonic() - started < 3.0
    assert len(fake_openai.chat_log()) <= 4  # never retried, nothing new sent after the first fatal
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert info.value.summary.stopped == message
    # The key never leaks: not in the exception, its traceback, logs, stdout/stderr or the cache.
    shown = message + repr(info.value) + "".join(traceback.format_exception(info.value))
    captured = capsys.readouterr()
    assert "SECRET123" not in shown + caplog.text + captured.out + captured.err
    if fault == "401":
        assert "Incorrect API key provided: ***" in message  # the server echoed it; we redacted
    for path in tmp_path.glob("captions.sqlite*"):
        assert b"SECRET123" not in path.read_bytes()


def test_key_never_reaches_logs_or_cache_on_success(tmp_path, fake_openai, caplog):
    caplog.set_level(logging.DEBUG)
    fake_openai.config.faults = {"500": 0.3}
    requests = make_requests(write_pngs(tmp_path / "png", 5))
    caption(requests, fake_openai, tmp_path / "c.sqlite")
    assert "SECRET123" not in caplog.text
    assert all(b"SECRET123" not in p.read_bytes() for p in tmp_path.glob("c.sqlite*"))


def test_refusals_are_flagged_and_retried_with_the_fallback_prompt(tmp_path, fake_openai):
    fake_openai.config.refuse = 0.5
    requests = make_requests(write_pngs(tmp_path / "png", 20))
    cache = tmp_path / "captions.sqlite"
    first = caption(requests, fake_openai, cache)
    refused = first.refused
    assert 0 < refused < 20 and first.succeeded == 20 - refused
    with CaptionCache(cache) as db:
        rows = lookup(requests, OPTIONS, cache=db)
    assert sum(r["refused"] for r in rows.values()) == refused  # kept, flagged, not a caption
    n = len(fake_openai.chat_log())
    second = caption(requests, fake_openai, cache, retry_refused=True)
    fallback = fake_openai.chat_log()[n:]
    assert second.sent == refused == len(fallback) and all(r["fallback"] for r in fallback)
    with CaptionCache(cache) as db:
        rows = lookup(requests, OPTIONS, cache=db)
    assert not any(r["refused"] for r in rows.values())
    assert sum(r["prompt_version"] == "v1-fallback" for r in rows.values()) == refused
    third = caption(requests, fake_openai, cache, retry_refused=True)
    assert third.sent == 0 and third.cached == 20


def test_retry_refused_on_a_first_run_re_asks_at_once(tmp_path, fake_openai):
    fake_openai.config.refuse = 0.5
    requests = make_requests(write_pngs(tmp_path / "png", 10))
    summary = caption(requests, fake_openai, tmp_path / "c.sqlite", retry_refused=True)
    assert summary.refused > 0 and summary.sent == 10 + summary.refused
    with CaptionCache(tmp_path / "c.sqlite") as db:
        assert not any(r["refused"] for r in lookup(requests, OPTIONS, cache=db).values())


def test_budget_and_max_usd(tmp_path, fake_openai):
    requests = make_requests(write_pngs(tmp_path / "png", 20))
    cache = tmp_path / "captions.sqlite"
    first = caption(requests, fake_openai, cache, budget=7)
    assert (first.to_send, first.sent, first.over_budget, len(fake_openai.chat_log())) == (7, 7, 13, 7)
    plan = caption(requests, fake_openai, cache, dry_run=True)
    per_request = plan.usd_estimated / plan.to_send
    second = caption(requests, fake_openai, cache, max_usd=per_request * 3.5)
    assert (second.cached, second.sent, second.over_budget) == (7, 3, 10)
    assert second.usd_actual <= per_request * 3.5 and "max-usd" in second.stopped
    assert len(fake_openai.chat_log()) == 10


def test_dry_run_makes_no_requests(tmp_path, fake_openai):
    requests = make_requests(write_pngs(tmp_path / "png", 6))
    summary = caption(requests, fake_openai, tmp_path / "c.sqlite", dry_run=True, api_key=None, detail="high")
    assert fake_openai.log == []
    assert summary.to_send == 6 and summary.sent == 0
    assert summary.est_prompt_tokens > 6 * 255 and summary.est_completion_tokens == 6 * 300
    assert summary.usd_estimated > 0


def test_concurrency_and_rate_limits_hold(tmp_path, fake_openai):
    fake_openai.config.latency = 0.05
    requests = make_requests(write_pngs(tmp_path / "png", 30))
    caption(requests, fake_openai, tmp_path / "a.sqlite", concurrency=3)
    assert fake_openai.max_in_flight == 3
    started = time.monotonic()
    caption(requests, fake_openai, tmp_path / "b.sqlite", concurrency=8, rpm=1200)  # 20/s, 1 s burst
    assert time.monotonic() - started >= 0.45  # 30 requests: 20 at once, then 10 at 20/s
    plan = caption(requests, fake_openai, tmp_path / "c.sqlite", dry_run=True)
    per_request = (plan.est_prompt_tokens + plan.est_completion_tokens) / 30
    started = time.monotonic()
    caption(requests, fake_openai, tmp_path / "c.sqlite", concurrency=8, tpm=per_request * 60 * 20)
    assert time.monotonic() - started >= 0.45


def test_retries_exhausted_fail_the_slice_not_the_run(tmp_path, fake_openai):
    fake_openai.config.faults, fake_openai.config.max_faults_per_key = {"500": 1.0}, 3
    requests = make_requests(write_pngs(tmp_path / "png", 3))
    cache = tmp_path / "c.sqlite"
    summary = caption(requests, fake_openai, cache, retry=RetryPolicy(max_attempts=2, initial_s=0.01))
    assert (summary.failed, summary.succeeded) == (3, 0) and summary.errors
    again = caption(requests, fake_openai, cache, retry=RetryPolicy(max_attempts=3, initial_s=0.01))
    assert again.succeeded == 3  # failures were not cached, so a rerun asks again
