"""`curate caption` runs as a user starts them: --budget converges after kill -9, one paying run
per workdir (lock, --wait, two runs at once), and a corrupt cache gives one line."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai import TEST_KEY as KEY
from test_caption_release import make_ranked
from typer.testing import CliRunner

from captions.errors import RunLocked
from captions.lock import RunLock
from curation.store.manifest import read_manifest
from med3dinsight.curate import app

CLI = [sys.executable, "-c", "from med3dinsight.curate import app; app()"]


@pytest.fixture(scope="module")
def ranked(tmp_path_factory) -> Path:
    return make_ranked(tmp_path_factory.mktemp("runs"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _start(w: Path, server, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": KEY, "COLUMNS": "200"}
    return subprocess.Popen([*CLI, "caption", "--workdir", str(w), "--base-url", server.base_url,
                             "--concurrency", "2", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(db: Path) -> int:
    try:
        con = sqlite3.connect(db, timeout=1.0)
        try:
            return con.execute("SELECT count(*) FROM captions").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _wait(predicate, proc, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_budget_converges_after_kill_9_and_the_rerun_sends_nothing(ranked: Path, tmp_path, start_fake_openai):
    w = _copy(ranked, tmp_path / "w")
    server = start_fake_openai(latency=0.15)
    db = w / "cache" / "captions.sqlite"
    proc = _start(w, server, "--budget", "12")
    _wait(lambda: _rows(db) >= 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (w / "manifests/v1.parquet").exists()
    rerun = _start(w, server, "--budget", "12")
    out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    rel = read_manifest(w / "manifests/v1.parquet")
    slices = read_manifest(w / "manifests/slices.parquet").sort_values("selection_order")
    # The release is exactly the first 12 slices of the selection order, not 12 new ones.
    assert list(rel["slice_id"]) == list(slices["slice_id"][:12])
    answered = Counter(r["image_sha256"] for r in server.answered())
    assert len(answered) == rel["image_sha256"].nunique() <= 12
    assert sum(answered.values()) - len(answered) <= 2  # only the --concurrency 2 in flight at the kill
    before = len(server.chat_log())
    again = _start(w, server, "--budget", "12")
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0 and "already holds this release" in out, out + err
    assert len(server.chat_log()) == before


def test_a_second_run_names_the_holder_or_waits(ranked: Path, tmp_path, monkeypatch):
    w = _copy(ranked, tmp_path / "w")
    holder = RunLock(w / "cache" / "captions.lock")
    holder.acquire()
    runner = CliRunner()
    res = runner.invoke(app, ["caption", "--workdir", str(w), "--provider", "offline", "--budget", "5"])
    line = " ".join(res.output.split())
    assert res.exit_code == 1 and f"pid {os.getpid()} on " in line and "--wait" in line, res.output
    assert not (w / "manifests/v1.parquet").exists()
    import threading

    threading.Timer(0.5, holder.release).start()
    res = runner.invoke(app, ["caption", "--workdir", str(w), "--provider", "offline", "--budget", "5", "--wait"])
    assert res.exit_code == 0 and "waiting" in res.output, res.output
    assert len(read_manifest(w / "manifests/v1.parquet")) == 5


def test_two_runs_at_once_never_pay_twice(ranked: Path, tmp_path, start_fake_openai):
    w = _copy(ranked, tmp_path / "w")
    server = start_fake_openai(latency=0.1)
    runs = [_start(w, server, "--budget", "10", "--wait") for _ in range(2)]  # two jobs of an array
    outs = [p.communicate(timeout=90) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outs
    assert sum("already holds this release" in out for out, _ in outs) == 1
    answered = Counter(r["signature"] for r in server.answered())
    assert max(answered.values()) == 1  # nobody paid twice for an answer
    assert len(read_manifest(w / "manifests/v1.parquet")) == 10


def test_lock_is_released_by_kill_9(tmp_path):
    path = tmp_path / "captions.lock"
    code = f"from captions.lock import RunLock; import time; RunLock({str(path)!r}).acquire(); print('ok', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ok"
    with pytest.raises(RunLocked, match=f"pid {proc.pid} on .*, started 20"):
        RunLock(path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunLock(path):  # the kernel dropped the dead holder's lock
        pass


def test_corrupt_cache_is_one_line_and_left_untouched(ranked: Path, tmp_path):
    w = _copy(ranked, tmp_path / "w")
    db = w / "cache" / "captions.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"SQLite format 3\x00" + b"\x07" * 5000)
    before = db.read_bytes()
    res = CliRunner().invoke(app, ["caption", "--workdir", str(w), "--provider", "offline"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "captions.sqlite: caption cache unusable: file is not a database" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert db.read_bytes() == before and not (w / "manifests/v1.parquet").exists()
