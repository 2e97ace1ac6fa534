"""`benchmarks/gpu_check.sh --dry-run`: every part runs one step at tiny shapes on the CPU and
lands in the JSON with numbers; the supervisor stops a case at its cap and goes on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_dry_run_records_every_part_with_numbers(tmp_path):
    out = tmp_path / "gpu_check.json"
    t0 = time.time()
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["dry_run"] is True and report["meta"]["device"] == "cpu"
    env = report["meta"]["env"]
    assert env["torch"] and env["python"] and "gpu" in env
    parts = report["parts"]
    assert set(parts) == set(gpu_check.PARTS)
    for name, cases in parts.items():
        assert cases, name
        for case in cases:
            assert case["status"] == "ok", (case["id"], case.get("error"), case.get("traceback"), case.get("log_tail"))
    for case in parts["pretrain"] + parts["finetune"]:
        r = case["result"]
        assert _pos(r["step_ms"]) and _pos(r["samples_per_s"]) and r["steps_timed"] >= 1, case["id"]
        assert "peak_gpu_mib" in r  # None on the CPU, MiB on a GPU
    precisions = {c["params"]["precision"] for c in parts["pretrain"]}
    assert {"bf16", "fp32", "amp"} <= precisions
    assert any(c["result"]["compile"] for c in parts["pretrain"])
    assert {c["result"]["net"] for c in parts["finetune"]} == {"UNETR", "SwinUNETR"}
    loaders = [c["result"] for c in parts["loader"] if c["id"].startswith("loader-w")]
    assert sorted({r["workers"] for r in loaders}) == [0, 2, 8]
    assert all(_pos(r["samples_per_s"]) and r["batches_timed"] >= 1 for r in loaders)
    e2e = next(c["result"] for c in parts["loader"] if c["id"].startswith("loader+step"))
    assert _pos(e2e["samples_per_s"])
    down = parts["downstream"][0]["result"]
    means = {k: v for k, v in down["summary"].items() if k.endswith("/mean") and "/diff/" not in k}
    assert any(k.startswith("finetune") for k in means) and all(math.isfinite(v) for v in means.values())
    assert not down["ignored_overrides"]  # the shortening still applies to bench_downstream's Size
    summary = report["summary"]
    assert _pos(summary["pretrain_step_samples_per_s"]) and _pos(summary["compile_speedup"])
    assert set(summary["loader_over_step"]) >= {"0", "2", "8"}
    table = out.with_suffix(".md").read_text()
    assert "| part | case |" in table and "DRY RUN" in table
    assert "| part | case |" in proc.stdout
    print(f"dry run: {seconds:.0f} s")


FAKE_RUNNER = textwrap.dedent("""
    import argparse, json, os, time
    ap = argparse.ArgumentParser(); ap.add_argument("--plan"); ap.add_argument("--events")
    a = ap.parse_args()
    plan = json.load(open(a.plan))
    with open(a.events, "a") as ev:
        for c in plan["cases"]:
            ev.write(json.dumps({"id": c["id"], "event": "start"}) + "\\n"); ev.flush()
            what = c["params"].get("do")
            if what == "hang":
                time.sleep(600)
            if what == "crash":
                os._exit(7)
            done = {"id": c["id"], "event": "done", "seconds": 0.0, "result": {"x": 1}}
            ev.write(json.dumps(done) + "\\n"); ev.flush()
""")


def test_supervisor_stops_a_case_at_its_cap_and_goes_on(tmp_path):
    runner = tmp_path / "fake_runner.py"
    runner.write_text(FAKE_RUNNER)
    cases = gpu_check.with_reserves(
        [
            gpu_check._case("a", "pretrain", "x", {}, 30, 1),
            gpu_check._case("hang", "pretrain", "x", {"do": "hang"}, 2, 1),
            gpu_check._case("crash", "loader", "x", {"do": "crash"}, 30, 1),
            gpu_check._case("b", "finetune", "x", {}, 30, 1),
        ]
    )
    t0 = time.time()
    records = gpu_check.supervise(
        cases,
        {"device": "cpu"},
        time.time() + 60,
        tmp_path,
        sys.executable,
        log=lambda m: None,
        runner=[sys.executable, str(runner)],
    )
    assert time.time() - t0 < 30
    assert records["a"]["status"] == "ok" and records["a"]["result"] == {"x": 1}
    assert records["hang"]["status"] == "timeout"
    assert records["crash"]["status"] == "crashed"
    assert records["b"]["status"] == "ok"  # a fresh child ran the cases after the timeout and the crash
    # a case that no longer fits in the budget (under half its floor left) is not started
    late = gpu_check.with_reserves([gpu_check._case("late", "downstream", "x", {}, 500, 400)])
    records = gpu_check.supervise(
        late,
        {"device": "cpu"},
        time.time() + 60,
        tmp_path,
        sys.executable,
        log=lambda m: None,
        runner=[sys.executable, str(runner)],
    )
    assert records["late"]["status"] == "not_run"
