"""The stage split of `bench_slice.py`: where one CT volume's ``process_volume`` time goes
(cProfile, cumulative time of the public functions it calls), run in the benchmark's child."""

from __future__ import annotations

import time
from pathlib import Path


def _one_thread_if_torch() -> None:
    import sys

    if "torch" in sys.modules:  # THREAD_ENV limits the rest; torch only if the code loaded it
        sys.modules["torch"].set_num_threads(1)


def _stage_times(stats, stages: list[tuple[str, object]], caller_files: set[str]) -> dict[str, float]:
    """Cumulative seconds of each stage function over its calls made from ``caller_files``."""
    out = {}
    for label, fn in stages:
        code = fn.__code__
        entry = stats.stats.get((code.co_filename, code.co_firstlineno, code.co_name))
        callers = entry[4] if entry else {}
        out[label] = sum(v[3] for k, v in callers.items() if k[0] in caller_files)
    return out


def child_profile(args) -> dict:
    """Stage split of ``process_volume`` on one CT volume (after a warm-up volume; fastest of
    three), from cProfile: the cumulative time of the public functions it calls (preprocess's
    parts as called from preprocess), once with a wall-clock and once with a CPU-time timer."""
    import cProfile
    import pstats

    import nibabel.orientations

    import curation.slicing.preprocess as pp
    import curation.slicing.rows as slice_rows_mod
    import curation.slicing.step as step_mod
    from curation.imageio import volume_io
    from curation.slicing.preprocess import PreprocessConfig
    from curation.slicing.step import SliceConfig, fingerprint, process_volume
    from curation.sources.datasets import discover
    from curation.store import fsutil, volume_store

    _one_thread_if_torch()

    def have(pairs):  # a stage whose function was renamed or removed is left out, not fatal
        return [(label, fn) for label, fn in pairs if fn is not None]

    top = [  # called by the step
        ("load image + label (nibabel + gunzip)", getattr(volume_io, "load_nifti", None)),
        ("sha256 of source", getattr(step_mod, 'sha256_files', None)),
        ("preprocess (total)", getattr(pp, 'preprocess', None)),
        ("write volume.npy + label.npy", getattr(volume_store, 'save_npy', None)),
        ("write display.npy.zst", getattr(volume_store, 'save_display', None)),
        ("slice rows", getattr(slice_rows_mod, 'slice_rows', None)),
        ("write slices.json + record.json (fsync)", getattr(fsutil, 'atomic_write_bytes', None)),
    ]
    sub = [  # called by preprocess
        ("  clean_intensities (finite check; integers stay as stored)", getattr(pp, 'clean_intensities', None)),
        ("  percentile windows", getattr(pp, 'percentile_window', None)),
        ("  reorient (transpose/flip)", getattr(nibabel.orientations, 'apply_orientation', None)),
        ("  resize3d (train + display + label)", getattr(pp, "resize3d", None)),
        ("  oblique resample", getattr(pp, "resample_oblique", None)),
    ]

    set_root = Path(args.set_root)
    work = Path(args.work)
    cfg = SliceConfig(workdir=work, pre=PreprocessConfig())
    mr_specs, _ = discover("nifti", set_root / "mr")
    process_volume(mr_specs[0], cfg, "warmup")  # torch / pyarrow lazy init out of the way
    specs, _ = discover("msd", set_root / "ct" / "Task09_Spleen")
    spec = specs[0]

    def fastest(timer) -> tuple[float, dict[str, float], list]:
        best = None
        for _ in range(3):  # keep the fastest of three (the machine may be shared)
            prof = cProfile.Profile(timer) if timer else cProfile.Profile()
            clock = timer or time.perf_counter
            t0 = clock()
            prof.enable()
            recs = process_volume(spec, cfg, fingerprint(spec, cfg))
            prof.disable()
            total = clock() - t0
            assert recs[0]["status"] == "ok", recs[0].get("error")
            if best is None or total < best[0]:
                stats = pstats.Stats(prof)
                stages = _stage_times(stats, have(top), {step_mod.__file__})
                stages.update(_stage_times(stats, have(sub), {pp.__file__}))
                best = (total, stages, recs)
        return best

    total, timers, recs = fastest(None)
    total_cpu, cpu, _ = fastest(time.process_time)

    def finish(d: dict, whole: float) -> dict:
        top = [k for k in d if not k.startswith("  ")]
        d["other (process_volume glue)"] = whole - sum(d[k] for k in top)
        sub = [k for k in d if k.startswith("  ")]
        pre = d.pop("preprocess (total)", 0.0)
        out = {}
        for k, v in d.items():  # preprocess total first, then its parts, then the rest
            if k.startswith("  "):
                continue
            if "preprocess (total)" not in out and k.startswith(("write", "slice")):
                out["preprocess (total)"] = pre
                for j in sub:
                    out[j] = d[j]
                out["  rest of preprocess (geometry, window/clip/cast, padding)"] = pre - sum(d[j] for j in sub)
            out[k] = v
        return out

    return {
        "volume": spec.display_path,
        "source_shape": recs[0]["source_shape"],
        "source_spacing": recs[0]["source_spacing"],
        "total_s": total,
        "total_cpu_s": total_cpu,
        "stages_s": finish(timers, total),
        "stages_cpu_s": finish(cpu, total_cpu),
    }


# =========================================================================== timeline of a whole run
#
# `bench_slice.py --timeline` runs `curate slice` with PYTHONPATH holding a sitecustomize that
# calls `install_trace()`: every Python process of the run (the command, its fork server, and the
# workers forked from it) appends JSON lines to $SLICE_TRACE: when it started, when the stage's
# phases ran in the command's process, and each volume a worker processed, with wall-clock
# (time.time(), comparable across processes) and the process's own CPU seconds.

SITECUSTOMIZE = "import slice_profile\nslice_profile.install_trace()\n"

# module -> (attribute path, phase name): wrapped when the module has been imported
TRACED = {
    "curation.slicing.stage": [("discover", "discover"), ("assemble", "assemble"),
                               ("_write_volumes", "write volumes.parquet"), ("write_manifest", "write_manifest (both)"),
                               ("Previous.read", "read previous manifests"),
                               ("_keep_rank_columns", "keep rank columns"),
                               ("_with_other_datasets", "other datasets"), ("run_slice", "run_slice")],
    "curation.executors.local": [("start_fork_server", "start fork server"), ("Executor.run", "executor.run")],
    "curation.slicing.step": [("SliceStep.__call__", "volume"), ("SliceStep.done", "resume check")],
}
MARKS = {"curation.slicing.worker": "worker modules loaded", "med3dinsight.slice": "CLI module loaded",
         "pandas": "pandas loaded"}


def _emit(event: dict) -> None:
    import json
    import os

    path = os.environ.get("SLICE_TRACE")
    if not path:
        return
    event.setdefault("pid", os.getpid())
    event.setdefault("role", _role())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(event, default=str) + "\n").encode())
    finally:
        os.close(fd)


def _role() -> str:
    import os

    with open(f"/proc/{os.getpid()}/cmdline", "rb") as fh:
        cmd = fh.read()
    return "fork server" if b"forkserver" in cmd else "tracker" if b"resource_tracker" in cmd else "main"


def _proc_start() -> float:
    """This process's start, wall clock (its start in clock ticks since boot, from /proc)."""
    import os

    with open(f"/proc/{os.getpid()}/stat") as fh:
        ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))


def _wrap(fn, name: str):
    import functools
    import os

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        t0, c0 = time.time(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            ev = {"ev": name, "t0": t0, "t1": time.time(), "c0": c0, "c1": time.process_time()}
            if name == "volume":
                ev["role"], ev["item"] = "worker", getattr(args[1], "display_path", str(args[1]))
            if os.getpid() != traced.owner:
                ev["role"] = "worker"
            _emit(ev)

    traced.owner = os.getpid()
    return traced


def _patch(module) -> None:
    for attr_path, name in TRACED.get(module.__name__, []):
        owner, _, attr = attr_path.rpartition(".")
        obj = getattr(module, owner) if owner else module
        fn = obj.__dict__.get(attr) if owner else getattr(module, attr, None)
        if fn is None:
            continue
        if isinstance(fn, classmethod):
            setattr(obj, attr, classmethod(_wrap(fn.__func__, name)))
        else:
            setattr(obj, attr, _wrap(fn, name))
    if module.__name__ in MARKS:
        _emit({"ev": MARKS[module.__name__], "t0": time.time(), "c0": time.process_time()})


def install_trace() -> None:
    """Trace this process (see above): an import hook wraps the phases once their modules load."""
    import atexit
    import importlib.abc
    import sys

    if not __import__("os").environ.get("SLICE_TRACE"):
        return
    _emit({"ev": "process start", "t0": _proc_start(), "argv": sys.argv[:3]})
    _emit({"ev": "interpreter up", "t0": time.time(), "c0": time.process_time()})
    wanted = set(TRACED) | set(MARKS)

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in wanted:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    real = spec.loader.exec_module

                    def exec_module(module, real=real):
                        real(module)
                        _patch(module)

                    spec.loader.exec_module = exec_module
                    return spec
            return None

    sys.meta_path.insert(0, Hook())
    atexit.register(lambda: _emit({"ev": "exit", "t0": time.time(), "c0": time.process_time()}))


def read_trace(path: Path) -> dict:
    """The timeline of one traced run, in seconds from the command's start."""
    import json

    events = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    main_pid = next(e["pid"] for e in events if e["ev"] == "process start" and e["role"] == "main")
    zero = next(e["t0"] for e in events if e["ev"] == "process start" and e["pid"] == main_pid)

    def rel(t: float) -> float:
        return round(t - zero, 3)

    phases, workers, marks = [], {}, []
    for e in events:
        if e["ev"] == "volume":
            w = workers.setdefault(e["pid"], {"volumes": [], "busy_s": 0.0, "cpu_s": 0.0})
            w["volumes"].append((rel(e["t0"]), rel(e["t1"]), e["item"].rsplit("/", 1)[-1]))
            w["busy_s"] += e["t1"] - e["t0"]
            w["cpu_s"] += e["c1"] - e["c0"]
        elif "t1" in e:
            phases.append({"phase": e["ev"], "role": e["role"], "start": rel(e["t0"]), "end": rel(e["t1"]),
                           "cpu_s": round(e["c1"] - e["c0"], 3)})
        else:
            marks.append({"mark": e["ev"], "role": e["role"], "at": rel(e["t0"]),
                          "cpu_s": round(e["c0"], 3) if "c0" in e else None})
    for w in workers.values():
        w["first_start"], w["last_end"] = w["volumes"][0][0], w["volumes"][-1][1]
        w["busy_s"], w["cpu_s"] = round(w["busy_s"], 3), round(w["cpu_s"], 3)
        w["gaps_s"] = round(sum(b[0] - a[1] for a, b in zip(w["volumes"], w["volumes"][1:])), 3)
    return {"phases": phases, "marks": marks, "workers": workers, "model": quiet_model(events, main_pid)}


def quiet_model(events: list[dict], main_pid: int) -> dict | None:
    """The run's wall time on a quiet machine with one core per process, rebuilt from CPU
    seconds alone (a loaded machine stretches wall-clock, much less the CPU each part took):
    the main process's CPU up to the pool start, or the fork server's preload when later; the
    volumes' CPU seconds handed out in the order they started to as many workers as ran them
    (each to the first free one); the main process's CPU while they ran, shared among them;
    then its CPU to the exit. One worker: the main process's CPU."""
    main = [e for e in events if e["pid"] == main_pid]
    total = max((e.get("c1", e.get("c0", 0.0)) for e in main), default=0.0)
    run = next((e for e in main if e["ev"] == "executor.run"), None)
    vols = sorted((e for e in events if e["ev"] == "volume"), key=lambda e: e["t0"])
    pids = {e["pid"] for e in vols}
    if run is None or not vols:
        return None
    if pids == {main_pid}:
        return {"workers": 1, "model_s": round(total, 3), "ready_s": round(run["c0"], 3),
                "volumes_cpu_s": round(sum(e["c1"] - e["c0"] for e in vols), 3)}
    start_fs = next((e["c0"] for e in main if e["ev"] == "start fork server"), 0.0)
    preload = next((e["c0"] for e in events if e["ev"] == "worker modules loaded" and e["pid"] != main_pid), 0.0)
    ready = max(run["c0"], start_fs + preload)
    free = [ready] * len(pids)
    for e in vols:
        i = free.index(min(free))
        free[i] += e["c1"] - e["c0"]
    shared = (run["c1"] - run["c0"]) / len(pids)
    post = total - run["c1"]
    return {"workers": len(pids), "model_s": round(max(free) + shared + post, 3), "ready_s": round(ready, 3),
            "imbalance_s": round(max(free) - min(free), 3), "main_during_run_cpu_s": round(run["c1"] - run["c0"], 3),
            "post_cpu_s": round(post, 3), "volumes_cpu_s": round(sum(e["c1"] - e["c0"] for e in vols), 3)}


def fmt_trace(tl: dict) -> str:
    """A few lines: marks, the main process's phases (repeated ones summed), each worker's span."""
    lines = ["  marks (s, CPU s): " + ", ".join(f"{m['mark']} ({m['role']}) {m['at']:.2f}"
                                             + (f" ({m['cpu_s']:.2f})" if m["cpu_s"] is not None else "")
                                             for m in tl["marks"] if m["role"] != "tracker")]
    seen: dict[tuple[str, str], list] = {}
    for p in tl["phases"]:
        s = seen.setdefault((p["phase"], p["role"]), [p["start"], p["end"], 0.0, 0.0, 0])
        s[1] = p["end"]
        s[2] += p["end"] - p["start"]
        s[3] += p["cpu_s"]
        s[4] += 1
    for (name, role), (a, b, wall, cpu, n) in seen.items():
        lines.append(f"  {name:26s} {role:11s} {a:6.2f} .. {b:6.2f}  wall {wall:5.2f}  CPU {cpu:5.2f}"
                     + (f"  ({n} calls)" if n > 1 else ""))
    for pid, w in tl["workers"].items():
        lines.append(f"  worker {pid}: {len(w['volumes'])} volumes {w['first_start']:.2f} .. {w['last_end']:.2f}, "
                     f"busy {w['busy_s']:.2f} s, CPU {w['cpu_s']:.2f} s, gaps {w['gaps_s']:.2f} s; "
                     f"last: {w['volumes'][-1][2]}")
    if tl.get("model"):
        lines.append("  quiet model (CPU s): " + ", ".join(f"{k} {v}" for k, v in tl["model"].items()))
    return "\n".join(lines)
