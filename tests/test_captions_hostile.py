"""Trust under attack: servers that drip, ask for a day's wait, send broken or absurd 200s, write
junk into batch output files or forget batches, and two runs at once. A run must stay bounded,
say what happened in one line, never lose a paid answer and never pay twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from caption_driver import make_requests, write_pngs
from fake_openai import TEST_KEY as KEY
from test_caption_release import make_ranked
from typer.testing import CliRunner

from captions import batch as batchflow
from captions.cache import CaptionCache
from captions.engine import lookup, run_captions
from captions.options import CaptionOptions, RetryPolicy
from captions.testing.server import JUNK_LINES
from curation.store.manifest import read_manifest
from med3dinsight.curate import app

FAST = RetryPolicy(initial_s=0.01, max_wait_s=0.1)


def opts(server, **kw) -> CaptionOptions:
    return CaptionOptions(**{"api_key": KEY, "base_url": server.base_url, "concurrency": 1, "retry": FAST,
                             "timeout": 5.0, **kw})


# -- sync: a bounded attempt, a bounded wait, bounded trust in a 200 ---------------------------------
def test_a_drip_fed_answer_times_out_as_a_whole_and_is_retried(tmp_path, start_fake_openai):
    # One byte every 50 ms: httpx's per-read timeout (1 s) never fires; --timeout must.
    server = start_fake_openai(script=["drip"], drip_interval=0.05, drip_seconds=8.0)
    requests = make_requests(write_pngs(tmp_path / "png", 2))
    started = time.monotonic()
    summary = run_captions(requests, opts(server, timeout=1.0), cache=tmp_path / "c.sqlite")
    assert time.monotonic() - started < 5.0
    assert (summary.succeeded, summary.failed) == (2, 0) and summary.http_requests >= 3
    assert server.chat_log()[0]["fault"] == "drip"
    # Every attempt drips: the slice fails for this run with one line, bounded by attempts x timeout.
    server = start_fake_openai(faults={"drip": 1.0}, max_faults_per_key=99, drip_interval=0.05)
    started = time.monotonic()
    summary = run_captions(requests[:1], opts(server, timeout=0.3, retry=replace(FAST, max_attempts=2)),
                           cache=tmp_path / "d.sqlite")
    assert time.monotonic() - started < 3.0
    assert (summary.failed, summary.http_requests) == (1, 2)
    assert "within --timeout 0.3 s" in summary.errors[0] and "\n" not in summary.errors[0]


@pytest.mark.parametrize("fault,asked", [("429_huge", "100,000 s"), ("429_huge_message", "99,999 s")])
def test_a_retry_after_of_a_day_fails_the_slice_for_this_run_instead_of_sleeping(
        tmp_path, start_fake_openai, fault, asked):
    server = start_fake_openai(script=[fault])
    requests = make_requests(write_pngs(tmp_path / "png", 3))
    cache = tmp_path / "c.sqlite"
    started = time.monotonic()
    summary = run_captions(requests, opts(server), cache=cache)
    assert time.monotonic() - started < 3.0  # not min(100000, 300) s
    assert (summary.succeeded, summary.failed, len(server.chat_log())) == (2, 1, 3)
    line = summary.errors[0]
    assert asked in line and "60 s" in line and "next run" in line and "\n" not in line
    again = run_captions(requests, opts(server), cache=cache)  # the next run asks it again
    assert (again.cached, again.sent, again.succeeded) == (2, 1, 1)


@pytest.mark.parametrize("fault,reported", [("truncated", True), ("invalid_json", False), ("cut_off", False)])
def test_a_broken_200_is_retried_a_few_times_and_its_tokens_still_count(
        tmp_path, start_fake_openai, fault, reported):
    server = start_fake_openai(faults={fault: 1.0}, max_faults_per_key=99)
    requests = make_requests(write_pngs(tmp_path / "png", 2))
    cache = tmp_path / "c.sqlite"
    summary = run_captions(requests, opts(server), cache=cache)
    policy = RetryPolicy()
    per_slice = policy.max_malformed + 1
    assert (summary.failed, summary.succeeded) == (2, 0)
    assert summary.http_requests == 2 * per_slice < 2 * policy.max_attempts
    assert summary.broken == 2 * per_slice
    assert "not a usable chat completion" in summary.errors[0] and "next run" in summary.errors[0]
    # The answers were produced and billed: the summary counts their tokens and cost.
    assert summary.prompt_tokens > 0 and summary.completion_tokens > 0 and summary.usd_actual > 0
    assert summary.usage_estimated == (0 if reported else 2 * per_slice)
    with CaptionCache(cache) as db:
        assert db.to_dataframe().empty  # nothing unusable was cached as an answer
    server.config.faults = {}
    again = run_captions(requests, opts(server), cache=cache)
    assert again.succeeded == 2


def test_an_absurd_caption_is_flagged_and_never_used(tmp_path, start_fake_openai):
    server = start_fake_openai(script=["huge_caption"], huge_chars=2_000_000)
    requests = make_requests(write_pngs(tmp_path / "png", 2))
    options = opts(server)
    summary = run_captions(requests, options, cache=tmp_path / "c.sqlite")
    assert (summary.invalid, summary.refused, summary.succeeded, summary.failed) == (1, 1, 1, 0)
    assert "1,999,999 characters, over the 2,400 that --max-tokens 300 allows" in summary.errors[0]
    with CaptionCache(tmp_path / "c.sqlite") as db:
        rows = lookup(requests, options, cache=db)
    bad = [r for r in rows.values() if r["refused"]]
    assert len(bad) == 1 and bad[0]["finish_reason"] == "invalid_length" and len(bad[0]["text"]) < 400
    assert summary.completion_tokens > 0  # the tokens were paid and are counted
    # The same screen guards batch output.
    batch_server = start_fake_openai(batch_huge=1, huge_chars=50_000, batch_delay=0.02)
    summary = run_captions(requests, opts(batch_server, mode="batch", poll_interval=0.02),
                           cache=tmp_path / "b.sqlite", batch_dir=tmp_path / "batches")
    assert (summary.invalid, summary.refused, summary.succeeded) == (1, 1, 1)


# -- batch: junk lines, forgotten batches -------------------------------------------------------------
def test_junk_lines_in_a_batch_output_are_skipped_and_every_other_answer_is_ingested(tmp_path, start_fake_openai):
    server = start_fake_openai(batch_junk=list(JUNK_LINES), batch_delay=0.02)
    requests = make_requests(write_pngs(tmp_path / "png", 6))
    options = opts(server, mode="batch", poll_interval=0.02)
    summary = run_captions(requests, options, cache=tmp_path / "c.sqlite", batch_dir=tmp_path / "b")
    assert (summary.succeeded, summary.failed) == (6, 0)
    assert any(f"skipped {len(JUNK_LINES)} output line(s)" in e for e in summary.errors)
    assert batchflow.status(tmp_path / "b") == []  # ingested, not stuck
    with CaptionCache(tmp_path / "c.sqlite") as db:
        assert len(lookup(requests, options, cache=db)) == 6


def test_a_drip_fed_batch_output_download_is_bounded_and_the_next_run_collects_it(tmp_path, start_fake_openai):
    server = start_fake_openai(batch_delay=0.02, drip_downloads=True, drip_interval=0.05, drip_seconds=30.0)
    requests = make_requests(write_pngs(tmp_path / "png", 3))
    cache, batch_dir = tmp_path / "c.sqlite", tmp_path / "b"
    options = opts(server, mode="batch", poll_interval=0.02, timeout=0.2)  # a download may take 2 s
    started = time.monotonic()
    with pytest.raises(Exception, match="kept failing"):
        run_captions(requests, options, cache=cache, batch_dir=batch_dir)
    assert time.monotonic() - started < 20  # attempts x 2 s, not the 30 s (or forever) of the drip
    assert [e["status"] for e in batchflow.BatchStore(batch_dir).active()] == ["submitted"]  # kept, not lost
    server.config.drip_downloads = False
    second = run_captions(requests, options, cache=cache, batch_dir=batch_dir)
    assert (second.succeeded, second.sent) == (3, 0) and server.calls("POST", "/v1/batches") == 1  # paid once


def test_a_batch_the_server_forgot_is_marked_lost_and_asked_again(tmp_path, start_fake_openai):
    server = start_fake_openai(batch_delay=0.2)
    requests = make_requests(write_pngs(tmp_path / "png", 4))
    cache, batch_dir = tmp_path / "c.sqlite", tmp_path / "b"
    options = opts(server, mode="batch", poll_interval=0.02)
    first = run_captions(requests, replace(options, batch_wait=False), cache=cache, batch_dir=batch_dir)
    assert first.pending == 4
    server.forget_batches()
    second = run_captions(requests, options, cache=cache, batch_dir=batch_dir)
    lost = [e for e in second.errors if "unknown to the server" in e]
    assert len(lost) == 1 and "planned again" in lost[0] and "--model" not in " ".join(second.errors)
    assert second.failed == 4 and second.sent == 0 and batchflow.status(batch_dir) == []
    third = run_captions(requests, options, cache=cache, batch_dir=batch_dir)
    assert (third.sent, third.succeeded) == (4, 4)
    assert server.calls("POST", "/v1/batches") == 2


# -- the CLI: --no-wait batches converge; a second run at once is one line ------------------------------
@pytest.fixture(scope="module")
def ranked(tmp_path_factory) -> Path:
    return make_ranked(tmp_path_factory.mktemp("hostile"))


def test_no_wait_batches_cut_by_the_token_limit_converge_to_one_release(ranked, tmp_path, monkeypatch,
                                                                        start_fake_openai):
    w = shutil.copytree(ranked, tmp_path / "w")
    server = start_fake_openai(batch_delay=0.05)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    # --batch-token-limit 1: one request per batch, one batch in flight at a time.
    args = ["caption", "--workdir", str(w), "--base-url", server.base_url, "--mode", "batch", "--no-wait",
            "--batch-token-limit", "1", "--budget", "4"]
    runner = CliRunner()
    release = w / "manifests/v1.parquet"
    for _ in range(12):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        if release.exists():
            break
        assert "not written yet" in res.output and "rerun the same command" in res.output, res.output
        time.sleep(0.1)
    rel = read_manifest(release)
    assert len(rel) == 4 and rel["caption"].notna().all()
    lines = Counter(r["custom_id"] for r in server.log if r["path"] == "batch-line")
    assert len(lines) == rel["image_sha256"].nunique() and set(lines.values()) == {1}  # each paid once
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "already holds this release" in res.output, res.output
    assert server.calls("POST", "/v1/batches") == len(lines)


def test_a_second_run_at_once_is_one_line_and_leaves_the_first_alone(ranked, tmp_path, start_fake_openai):
    w = shutil.copytree(ranked, tmp_path / "w")
    server = start_fake_openai(latency=0.25)
    env = {**os.environ, "OPENAI_API_KEY": KEY, "COLUMNS": "200"}
    first = subprocess.Popen([sys.executable, "-c", "from med3dinsight.curate import app; app()", "caption",
                              "--workdir", str(w), "--base-url", server.base_url, "--budget", "6",
                              "--concurrency", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = w / "cache" / "captions.lock"
    deadline = time.monotonic() + 30
    while not server.chat_log():  # the first run holds the lock and is paying
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    held = lock.read_text()
    state = sorted(p.name for p in (w / "cache").iterdir())
    res = CliRunner().invoke(app, ["caption", "--workdir", str(w), "--base-url", server.base_url,
                                   "--budget", "6"], env={"OPENAI_API_KEY": KEY})
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    line = " ".join(res.output.split())
    assert f"pid {first.pid} on " in line and "--wait" in line and "Traceback" not in line
    assert first.poll() is None, "the second run must not end the first"
    assert lock.read_text() == held and json.loads(held)["pid"] == first.pid
    assert sorted(p.name for p in (w / "cache").iterdir()) == state
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, out + err
    assert len(read_manifest(w / "manifests/v1.parquet")) == 6
    assert max(Counter(r["signature"] for r in server.answered()).values()) == 1


def test_paid_batches_reach_the_cache_even_when_the_release_is_refused(ranked, tmp_path, monkeypatch,
                                                                       start_fake_openai):
    w = shutil.copytree(ranked, tmp_path / "w")
    server = start_fake_openai(batch_delay=0.05)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    runner = CliRunner()
    args = ["caption", "--workdir", str(w), "--base-url", server.base_url, "--mode", "batch", "--no-wait",
            "--budget", "3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "not written yet" in res.output, res.output
    # Meanwhile v1 is written by another captioner: the batch command now would write a different
    # release and is refused, but the batch it paid for is collected first.
    res = runner.invoke(app, ["caption", "--workdir", str(w), "--provider", "offline", "--budget", "3"])
    assert res.exit_code == 0, res.output
    time.sleep(0.1)
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "different release" in res.output, res.output
    assert batchflow.status(w / "cache" / "batches") == []
    with CaptionCache(w / "cache" / "captions.sqlite") as db:
        assert (db.to_dataframe()["mode"] == "batch").sum() >= 1


def test_the_cli_says_a_slice_waits_for_the_next_run_and_the_rerun_writes_the_release(ranked, tmp_path, monkeypatch,
                                                                                       start_fake_openai):
    w = shutil.copytree(ranked, tmp_path / "w")
    server = start_fake_openai(script=["429_huge"])
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("COLUMNS", "300")
    args = ["caption", "--workdir", str(w), "--base-url", server.base_url, "--budget", "3", "--concurrency", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    said = [line for line in res.output.splitlines() if "100,000 s" in line]
    assert len(said) == 1 and "--max-retry-wait" in said[0] and "next run" in said[0], res.output
    assert "not written yet" in res.output and not (w / "manifests/v1.parquet").exists()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(read_manifest(w / "manifests/v1.parquet")) == 3
