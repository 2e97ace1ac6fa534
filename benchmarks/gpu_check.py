"""One prepared GPU measurement of the training path, at most 8 minutes on one GPU (issue 24).

    bash benchmarks/gpu_check.sh                  # on the GPU machine (see benchmarks/README.md)
    python benchmarks/gpu_check.py [--dry-run] [--out FILE] [--budget-s 430]

Parts (each case under its own time cap, inside one overall budget; a case that fails, runs out
of memory or passes its cap is recorded with its error and the next one runs):

- ``env``        device name, torch / CUDA / cuDNN versions, packages, date.
- ``pretrain``   `train pretrain`'s optimizer step (``TrainState.create`` + ``train_step``) at the
                 paper's shapes: MONAI ViT-B (hidden 768, 12 layers, patch 16) on 128^3, PSAT with
                 300 queries of width 512, CLIP dim 512; bf16 / fp32 / amp (fp16 + scaler) at batch
                 8, 32 (bf16 also 64), fp32 with TF32, and bf16 under ``torch.compile``: step time,
                 samples/s, peak GPU memory (``torch.cuda.max_memory_allocated``).
- ``finetune``   `train finetune --task seg`'s step for UNETR and SwinUNETR (``net_spec`` +
                 ``build_net``, DiceCE, AdamW) at 128^3, batch 2, bf16 and fp32.
- ``loader``     the data side: a synthetic release at 128^3 (64 volumes, written with the project's
                 store functions), the real ``load_split`` + ``StepBatchSampler`` + ``DataLoader``
                 with --workers 0 / 2 / 8 (page cache warm; 8 also cold), batches moved onto the
                 GPU; then the loader (8 workers) feeding ``train_step`` end to end.
- ``downstream`` ``benchmarks/bench_downstream.py --size gpu``, shortened (fewer steps, fractions,
                 seeds and variants) to fit its cap.

``--dry-run`` runs every case for one step at tiny shapes on the CPU (what the test runs). The
cases run in a child process (``gpu_cases.py``) that this script supervises: it kills the child at
a case's cap (or at a CUDA error that poisons the context) and starts a new one for the cases left.
Writes a JSON (default ``benchmarks/results/gpu_check-<date>.json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = ("env", "pretrain", "finetune", "loader", "downstream")

# The paper's pretraining shapes (Med3DInsight §3.1/§4): ViT-B as in UNETR, 128^3, PSAT Q=300, width 512.
PAPER = dict(img_size=128, encoder="vit", encoder_kwargs={}, num_queries=300, width=512, clip_dim=512)
TINY = dict(
    img_size=32,
    encoder="vit",
    encoder_kwargs=dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1),
    num_queries=8,
    width=32,
    clip_dim=32,
)


def _case(cid: str, part: str, kind: str, params: dict, cap: float, floor: float) -> dict:
    """``cap``: the most seconds the case may take; ``floor``: seconds kept free for it while earlier
    cases run (so a slow early case cannot eat the later parts' time)."""
    return {"id": cid, "part": part, "kind": kind, "params": params, "cap_s": cap, "floor_s": floor}


def build_plan(dry_run: bool) -> list[dict]:
    """The cases, in the order they run."""
    cases = [_case("env", "env", "env", {}, 60, 10)]
    if dry_run:
        shapes, run = TINY, dict(warmup=0, steps=1, max_timed_s=5.0)
        pre = [("bf16", 2, {}), ("fp32", 2, {}), ("amp", 2, {})]
        comp = dict(precision="bf16", batch=2, compile=True, backend="eager")
        ft_unetr = dict(img_size=16, encoder_kwargs=dict(hidden_size=16, mlp_dim=32, num_heads=2), feature_size=4)
        # SwinUNETR needs a side of at least 64 (net_spec); the dry run feeds it 64 x 32 x 32
        ft_swin = dict(img_size=64, encoder_kwargs=dict(feature_size=12, depths=(1, 1, 1, 1)), input_shape=(64, 32, 32))
        ft = dict(batch=1, num_classes=3, **run)
        ld = dict(volumes=8, grid=16, positions_per_plane=2, clip_dim=32)
        lb = dict(batch=2, batches=1, max_timed_s=5.0)
        workers = (0, 2, 8)
        step_run = dict(run)
        down = dict(
            base="tiny",
            argv=["--arms", "scratch,psat-labels"],
            override=dict(
                pre_subjects=4,
                pool=2,
                n_test=2,
                pre_steps=1,
                pre_batch=2,
                ft_steps=1,
                ft_batch=1,
                train_sizes=[2],
                pre_seeds=1,
                ft_seeds=1,
                device="cpu",
            ),
        )
        caps = dict(pre=60, comp=60, ft=60, ld=60, lc=60, ls=60, down=120)
    else:
        shapes, run = PAPER, dict(warmup=3, steps=10, max_timed_s=15.0)
        pre = [
            ("bf16", 8, {}),
            ("bf16", 32, {}),
            ("fp32", 8, {}),
            ("fp32", 32, {}),
            ("amp", 32, {}),
            ("bf16", 64, {}),
            ("fp32", 32, {"tf32": True}),
        ]
        comp = dict(precision="bf16", batch=32, compile=True, backend="inductor")
        ft_unetr = dict(img_size=128, encoder_kwargs={}, feature_size=16)  # UNETR as in its paper (feature 16)
        ft_swin = dict(img_size=128, encoder_kwargs={})  # SwinUNETR defaults (feature 48)
        ft = dict(batch=2, num_classes=14, **run)  # 14: a BTCV-sized multi-organ head
        ld = dict(volumes=64, grid=128, positions_per_plane=8, clip_dim=512)
        lb = dict(batch=32, batches=12, max_timed_s=15.0)
        workers = (0, 2, 8)
        step_run = dict(warmup=2, steps=10, max_timed_s=20.0)
        # bench_downstream --size gpu (issue 25), cut to one pretrained arm, one seed each, one train size
        down = dict(
            base="gpu",
            argv=["--arms", "scratch,psat-labels"],
            override=dict(
                pre_subjects=24,
                pool=24,
                n_test=24,
                pre_steps=150,
                ft_steps=120,
                train_sizes=[12],
                pre_seeds=1,
                ft_seeds=1,
            ),
        )
        caps = dict(pre=60, comp=180, ft=60, ld=90, lc=45, ls=90, down=200)
    for prec, b, extra in pre:
        tag = f"{prec}{'+tf32' if extra.get('tf32') else ''}-b{b}"
        cases.append(
            _case(
                f"pretrain-{tag}",
                "pretrain",
                "pretrain",
                dict(shapes, precision=prec, batch=b, **extra, **run),
                caps["pre"],
                15,
            )
        )
    for net, enc, args in (("unetr", "vit", ft_unetr), ("swinunetr", "swin", ft_swin)):
        # the dry run steps each network once (bf16): on 2 CPU cores even SwinUNETR's smallest step takes seconds
        for prec in ("bf16",) if dry_run else ("bf16", "fp32"):
            cases.append(
                _case(
                    f"finetune-{net}-{prec}",
                    "finetune",
                    "finetune",
                    dict(args, encoder=enc, precision=prec, **ft),
                    caps["ft"],
                    15,
                )
            )
    cases.append(_case("loader-data", "loader", "loader_data", ld, caps["ld"], 20))
    for w in workers:
        cases.append(_case(f"loader-w{w}", "loader", "loader", dict(ld, **lb, workers=w), caps["lc"], 10))
    cases.append(
        _case(
            f"loader-w{workers[-1]}-cold",
            "loader",
            "loader",
            dict(ld, **lb, workers=workers[-1], cold=True),
            caps["lc"],
            10,
        )
    )
    cases.append(
        _case(
            f"loader+step-bf16-w{workers[-1]}",
            "loader",
            "loader_step",
            dict(shapes, **ld, precision="bf16", batch=lb["batch"], workers=workers[-1], **step_run),
            caps["ls"],
            20,
        )
    )
    cases.append(
        _case(
            f"pretrain-compile-{comp['precision']}-b{comp['batch']}",
            "pretrain",
            "pretrain",
            dict(shapes, **comp, **run),
            caps["comp"],
            60,
        )
    )
    cases.append(_case("downstream", "downstream", "downstream", down, caps["down"], 60))
    return with_reserves(cases)


def with_reserves(cases: list[dict]) -> list[dict]:
    """Set each case's ``reserve_s``: the floors of the cases after it."""
    for i, c in enumerate(cases):
        c["reserve_s"] = float(sum(x["floor_s"] for x in cases[i + 1 :]))
    return cases


def effective_cap(case: dict, deadline: float, now: float) -> float:
    """Seconds ``case`` may run from ``now``: its cap, less what the later cases' floors keep free
    (``reserve_s``, set by ``build_plan``)."""
    return min(case["cap_s"], deadline - now - case.get("reserve_s", 0.0))


def too_late(case: dict, deadline: float, now: float) -> bool:
    """Whether ``case`` should not start: under half its floor is left for it."""
    return effective_cap(case, deadline, now) < 0.5 * min(case["floor_s"], case["cap_s"])


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its DataLoader workers (its own session)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def supervise(
    cases: list[dict],
    plan_base: dict,
    deadline: float,
    scratch: Path,
    python: str,
    log=print,
    runner: list[str] | None = None,
) -> dict[str, dict]:
    """Run the cases in child processes under their caps; returns id -> record (``status`` ok,
    error, timeout, crashed or not_run, ``seconds``, ``result`` or ``error``). ``runner``: the
    child's command before ``--plan``/``--events`` (default: ``python gpu_cases.py``)."""
    runner = runner or [python, str(HERE / "gpu_cases.py")]
    records: dict[str, dict] = {}
    order = [c["id"] for c in cases]
    by_id = {c["id"]: c for c in cases}
    attempt = 0
    while True:
        todo = [cid for cid in order if cid not in records]
        # Cases that no longer fit are not started.
        now = time.time()
        runnable = []
        for cid in todo:
            if not runnable and too_late(by_id[cid], deadline, now):
                records[cid] = {
                    "status": "not_run",
                    "error": f"out of time: {max(0.0, deadline - now):.0f} s left in "
                    f"the budget, the later cases keep their share",
                }
                log(f"  {cid:<34} not run (out of time)")
                continue
            runnable.append(cid)
        if not runnable:
            return records
        attempt += 1
        plan = dict(plan_base, cases=[by_id[c] for c in runnable], deadline=deadline)
        plan_path = scratch / f"plan-{attempt}.json"
        events = scratch / f"events-{attempt}.jsonl"
        child_log = scratch / f"child-{attempt}.log"
        plan_path.write_text(json.dumps(plan))
        events.touch()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with child_log.open("w") as out:
            proc = subprocess.Popen(
                [*runner, "--plan", str(plan_path), "--events", str(events)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(REPO),
                env=env,
                start_new_session=True,
            )
        current: str | None = None
        started = 0.0
        cap = 0.0
        pos = 0
        progressed = False
        killed_for = None
        while True:
            with events.open() as f:
                f.seek(pos)
                chunk = f.read()
            # only whole lines
            cut = chunk.rfind("\n") + 1
            pos += len(chunk[:cut].encode())
            for line in chunk[:cut].splitlines():
                ev = json.loads(line)
                cid = ev["id"]
                if ev["event"] == "start":
                    current, started = cid, time.time()
                    cap = effective_cap(by_id[cid], deadline, started)
                    progressed = True
                elif ev["event"] in ("done", "error", "skipped"):
                    rec = {
                        "status": {"done": "ok", "error": "error", "skipped": "not_run"}[ev["event"]],
                        "seconds": round(ev.get("seconds", 0.0), 2),
                        "cap_s": round(cap, 1),
                    }
                    if ev["event"] == "done":
                        rec["result"] = ev["result"]
                    else:
                        rec["error"] = ev.get("error")
                        if ev.get("traceback"):
                            rec["traceback"] = ev["traceback"]
                    records[cid] = rec
                    log(
                        f"  {cid:<34} {rec['status']:<8} {rec['seconds']:7.1f} s"
                        + (f"  {rec['error'][:150]}" if rec.get("error") else "")
                    )
                    current = None
            rc = proc.poll()
            if rc is not None:
                break
            now = time.time()
            if current is not None and (now - started > cap or now > deadline):
                killed_for = current
                _kill(proc)
                break
            if current is None and now > deadline:
                killed_for = ""
                _kill(proc)
                break
            time.sleep(0.2)
        # a last read: lines written just before the exit
        with events.open() as f:
            f.seek(pos)
            rest = f.read()
        for line in rest.splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev["event"] == "start":
                current, started, progressed = ev["id"], time.time(), True
            elif ev["event"] == "skipped":
                records[ev["id"]] = {"status": "not_run", "error": ev.get("error")}
            elif ev["event"] in ("done", "error"):
                rec = {
                    "status": "ok" if ev["event"] == "done" else "error",
                    "seconds": round(ev.get("seconds", 0.0), 2),
                }
                rec.update({"result": ev["result"]} if ev["event"] == "done" else {"error": ev.get("error")})
                records[ev["id"]] = rec
                log(f"  {ev['id']:<34} {rec['status']:<8} {rec['seconds']:7.1f} s")
                current = None
        tail = _tail(child_log)
        if killed_for:
            records[killed_for] = {
                "status": "timeout",
                "seconds": round(time.time() - started, 1),
                "cap_s": round(cap, 1),
                "error": f"stopped at its cap of {cap:.0f} s",
                "log_tail": tail,
            }
            log(f"  {killed_for:<34} timeout  {time.time() - started:7.1f} s  (cap {cap:.0f} s)")
        elif current is not None and current not in records:
            records[current] = {
                "status": "crashed",
                "seconds": round(time.time() - started, 1),
                "error": f"the child process exited with {proc.returncode} during this case",
                "log_tail": tail,
            }
            log(f"  {current:<34} crashed (exit {proc.returncode})")
        if not progressed:  # the child died before its first case (an import error, say): stop here
            for cid in order:
                if cid not in records:
                    records[cid] = {
                        "status": "error",
                        "error": f"the case runner did not start (exit {proc.returncode})",
                        "log_tail": tail,
                    }
            log(f"the case runner did not start:\n{tail}")
            return records
        if time.time() >= deadline:
            for cid in order:
                if cid not in records:
                    records[cid] = {"status": "not_run", "error": "out of time: the budget was spent"}
            return records


# --------------------------------------------------------------------------- report


def _num(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def summarize(parts: dict[str, list[dict]]) -> dict[str, Any]:
    """Ratios the README quotes: the loader against the step, compile against eager."""

    def ok(pid: str) -> dict | None:
        for part in parts.values():
            for r in part:
                if r["id"] == pid and r["status"] == "ok":
                    return r["result"]
        return None

    out: dict[str, Any] = {}
    # the eager case the compile case and the loader compare with: bf16 at the compile case's batch
    comp = next((r for r in parts["pretrain"] if "compile" in r["id"]), None)
    eager = ok(f"pretrain-bf16-b{comp['params']['batch']}") if comp else None
    step_sps = eager["samples_per_s"] if eager else None
    loaders = {
        r["result"]["workers"] if not r["result"].get("cold_cache") else f"{r['result']['workers']}-cold": r["result"][
            "samples_per_s"
        ]
        for r in parts["loader"]
        if r["status"] == "ok" and "workers" in r["result"] and "step_ms" not in r["result"]
    }
    if step_sps:
        out["pretrain_step_samples_per_s"] = step_sps
        out["loader_over_step"] = {str(w): v / step_sps for w, v in loaders.items()}
    if comp and comp["status"] == "ok" and eager:
        out["compile_speedup"] = eager["step_ms"] / comp["result"]["step_ms"]
    e2e = next((r for r in parts["loader"] if r["id"].startswith("loader+step") and r["status"] == "ok"), None)
    if e2e and step_sps:
        out["end_to_end_over_step"] = e2e["result"]["samples_per_s"] / step_sps
    return out


def markdown(report: dict) -> str:
    meta = report["meta"]
    env = meta.get("env") or {}
    head = (
        f"**gpu_check** {meta['date']} on {env.get('gpu') or meta.get('device', '?')}"
        f" (torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}"
        f"{', DRY RUN: tiny shapes on CPU, not figures' if meta['dry_run'] else ''}); "
        f"{meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget"
    )
    lines = [
        head,
        "",
        "| part | case | config | step ms | samples/s | peak GPU MiB | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for part in PARTS[1:]:
        for r in report["parts"][part]:
            res = r.get("result") or {}
            if part == "pretrain" or r["id"].startswith("loader+step"):
                cfg = (
                    f"{res.get('precision', '')} b{res.get('batch', '')}"
                    + (" compile" if res.get("compile") else "")
                    + (" tf32" if res.get("tf32") else "")
                    + (f" w{res['workers']}" if "workers" in res else "")
                )
                if res.get("compile_s") is not None:
                    cfg += f" (compile {res['compile_s']:.0f} s)"
            elif part == "finetune":
                shape = res.get("input_shape") or [res.get("img_size")] * 3
                dims = "x".join(map(str, shape))
                cfg = f"{res.get('net', '')} {dims} {res.get('precision', '')} b{res.get('batch', '')}"
            elif part == "loader":
                if "rows" in res:
                    cfg = f"{res.get('volumes')} vols {res.get('grid')}^3"
                else:
                    cold = " cold cache" if res.get("cold_cache") else ""
                    cfg = f"w{res.get('workers', '')} b{res.get('batch', '')}{cold}"
                    if res.get("first_batch_s") is not None:
                        cfg += f", first batch {res['first_batch_s']:.1f} s"
            else:
                means = {
                    k[:-5]: v
                    for k, v in (res.get("summary") or {}).items()
                    if k.endswith("/mean") and "/diff/" not in k
                }
                cfg = ", ".join(f"{k} {v:.3f}" for k, v in means.items())
            step_ms = res.get("step_ms", res.get("batch_ms"))
            if "rows" in res:
                step_ms = None
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('error') or '')[:80]}"
            if part == "downstream" and res:
                status += f" ({res.get('seconds', 0):.0f} s)"
            lines.append(
                f"| {part} | {r['id']} | {cfg} | {_num(step_ms, '.1f')} | {_num(res.get('samples_per_s'), '.1f')} | "
                f"{_num(res.get('peak_gpu_mib'), '.0f')} | {status.replace('|', '/')} |"
            )
    s = report.get("summary") or {}
    if s:
        lines.append("")
        if "loader_over_step" in s:
            ratios = ", ".join(f"w{k} {v:.2f}x" for k, v in s["loader_over_step"].items())
            lines.append(
                f"Loader samples/s over the bf16 step's ({s['pretrain_step_samples_per_s']:.1f}/s): {ratios} "
                "(below 1: the GPU waits for data)."
            )
        if "end_to_end_over_step" in s:
            lines.append(f"Loader feeding the step, end to end: {s['end_to_end_over_step']:.2f}x the step alone.")
        if "compile_speedup" in s:
            lines.append(f"torch.compile speedup over eager (bf16): {s['compile_speedup']:.2f}x.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--dry-run", action="store_true", help="every case for one step at tiny shapes on the CPU")
    ap.add_argument(
        "--out", type=Path, default=None, help="results JSON (default benchmarks/results/gpu_check-<date>.json)"
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=430.0,
        help="seconds for all cases together, child start-ups included (default 430: with the wrapper's wheel "
        "install and import check, within 8 minutes)",
    )
    ap.add_argument("--only", default="", help="comma-separated parts to run (env always runs)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    ap.add_argument("--keep", type=Path, default=None, help="scratch folder to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget_s
    date = _dt.datetime.now(_dt.timezone.utc)
    out = args.out or HERE / "results" / f"gpu_check-{'dry-run-' if args.dry_run else ''}{date:%Y-%m-%d}.json"
    device = args.device
    if args.dry_run:
        device = "cpu"
    elif device == "auto":
        try:
            probe = subprocess.run(
                [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            device = "cuda" if probe.stdout.strip() == "True" else "cpu"
        except (OSError, subprocess.SubprocessError):
            device = "cpu"
        if device == "cpu":
            print(
                "warning: no CUDA device: the full-size cases will run on the CPU and mostly hit their caps; "
                "use --dry-run for a CPU check",
                flush=True,
            )
    cases = build_plan(args.dry_run)
    if args.only:
        keep = {p.strip() for p in args.only.split(",")} | {"env"}
        cases = with_reserves([c for c in cases if c["part"] in keep])
    print(
        f"gpu_check {'--dry-run ' if args.dry_run else ''}{date:%Y-%m-%d %H:%M} UTC: {len(cases)} cases on {device}, "
        f"budget {args.budget_s:.0f} s, python {sys.executable}",
        flush=True,
    )
    plan_base = {"device": device, "dry_run": args.dry_run, "threads": 2 if args.dry_run else 0}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        scratch = args.keep or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        plan_base["scratch"] = str(scratch)
        records = supervise(cases, plan_base, deadline, scratch, sys.executable, log=lambda m: print(m, flush=True))
    parts: dict[str, list[dict]] = {p: [] for p in PARTS}
    for c in cases:
        rec = records.get(c["id"], {"status": "not_run", "error": "not reached"})
        parts[c["part"]].append({"id": c["id"], "params": c["params"], **rec})
    env = next((r.get("result") for r in parts["env"] if r["status"] == "ok"), None)
    report = {
        "meta": {
            "date": date.isoformat(timespec="seconds"),
            "dry_run": args.dry_run,
            "device": device,
            "budget_s": args.budget_s,
            "elapsed_s": time.time() - t_start,
            "env": env,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        },
        "parts": parts,
    }
    report["summary"] = summarize(parts)
    table = markdown(report)
    report["markdown"] = table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print()
    if env:
        print(
            f"device: {env.get('gpu') or env.get('device')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"cuDNN {env.get('cudnn')}; {env.get('nvidia_smi', '')}"
        )
    print(table)
    print(f"\nwrote {out} and {out.with_suffix('.md').name} in {time.time() - t_start:.0f} s")
    bad = [r["id"] for p in parts.values() for r in p if r["status"] != "ok"]
    if bad:
        print(f"{len(bad)} case(s) not ok: {', '.join(bad)}")
    return 0 if env is not None else 1


if __name__ == "__main__":
    sys.exit(main())
