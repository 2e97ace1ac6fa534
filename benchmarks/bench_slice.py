"""`curate slice` preprocessing vs a MONAI transform chain vs a bare nibabel load, side by side.

Each method runs in its own fresh subprocess, one thread (torch.set_num_threads(1), OMP/MKL/
OpenBLAS threads = 1), over the same volumes, so the ratios come from one run on one machine:

- ``ours``        : ``curation.slicing.stage.run_slice`` (what ``curate slice`` does per volume: load,
                    preprocess to a grid^3 float16 volume + label + uint8 display volume (the
                    source grid, axes finer than 1 mm shrunk), write volume.npy / label.npy /
                    display.npy.zst / slices.json / record.json,
                    then the manifests);
- ``ours-wN``     : the same with ``workers=N`` processes (``--workers N``);
- ``curate``      : the command a user runs, ``curate slice --dataset 3dseg8 --root SET``, as a
                    whole process (no in-process timer of ours: its own summary's time is read);
- ``curate-wN``   : the same with ``--workers N``: the workers-scaling row (``--scaling N``).
- ``monai``       : LoadImaged(image, label) + EnsureChannelFirstd + Orientationd("RAS") +
                    Spacingd(1 mm; bilinear / nearest) + ScaleIntensityRanged (CT, -1000..1000)
                    or ScaleIntensityRangePercentilesd (MR, 0.5..99.5) + SpatialPadd to a cube +
                    Resized(grid^3; area / nearest), then np.save of image (float16) and label
                    (uint8);
- ``nibabel``     : the floor: nibabel.load + np.asarray(img.dataobj) of the same image and
                    label files.

Volumes (generated once into ``--data``, default bench-work/data, git-ignored; ``--set uneven``:
12 MR-like 256x256x24 then 4 CT-like 512x512 with 120..360 slices, see slice_data.ensure_uneven):
CT-like 512x512x48..61 int16 at 0.6-0.8 x 0.6-0.8 x 5 mm (LPS/LAS like dcm2niix output) in an
MSD task folder (``Task09_Spleen`` with dataset.json modality CT), MR-like 256x256x24 at
0.9x0.9x6 mm (int16 and float32) and nilearn's MNI152 template at 1 mm, each with a label file.

Usage (with the project installed, as in ``.venv``)::

    python benchmarks/bench_slice.py                 # full run (8 CT + 7 MR + MNI: 16 volumes)
    python benchmarks/bench_slice.py --quick         # 1 volume of each kind
    python benchmarks/bench_slice.py --workers 2     # add a 2-process row for ours
    python benchmarks/bench_slice.py --set uneven --methods curate --timeline   # scaling on uneven volumes,
                                                     # with each process's phases and each worker's volumes

Every row has two times: ``in-proc s``, timed inside the method's process after its imports,
and ``process s``, the whole process as a user waits for it (interpreter start, imports, work,
exit), with the 1-minute load average when the row started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import sys
import time
from pathlib import Path

from proc_stats import TreeRSS, cpu_s, hwm_mb, rss_mb, run_process
from slice_data import KINDS, describe, ensure_data, ensure_uneven, volume_pairs
from slice_profile import SITECUSTOMIZE, child_profile, fmt_trace, read_trace

REPO = Path(__file__).resolve().parents[1]
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
}

def _child_common():
    import torch

    torch.set_num_threads(1)
    return torch


def child_nibabel(args) -> dict:
    import nibabel as nib
    import numpy as np

    pairs = volume_pairs(Path(args.set_root))
    rss_imports = rss_mb()
    per_kind: dict[str, float] = {}
    t_all, c_all = time.perf_counter(), cpu_s(children=True)
    for p in pairs:
        t0 = time.perf_counter()
        for key in ("image", "label"):
            img = nib.load(p[key])
            arr = np.asarray(img.dataobj)
            del arr, img
        per_kind[p["kind"]] = per_kind.get(p["kind"], 0.0) + time.perf_counter() - t0
    return {
        "volumes": len(pairs),
        "seconds": time.perf_counter() - t_all,
        "cpu_s": cpu_s(children=True) - c_all,
        "per_kind_s": per_kind,
        "rss_imports_mb": rss_imports,
    }


def child_monai(args) -> dict:
    _child_common()
    import numpy as np
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        Resized,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
        Spacingd,
        SpatialPadd,
    )

    pairs = volume_pairs(Path(args.set_root))
    out_dir = Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ["image", "label"]
    G = args.grid
    head = Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(keys=keys, pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
        ]
    )
    scale = {
        "CT": ScaleIntensityRanged(keys="image", a_min=-1000.0, a_max=1000.0, b_min=0.0, b_max=1.0, clip=True),
        "MR": ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
    }
    resize = Resized(keys=keys, spatial_size=(G, G, G), mode=("area", "nearest"))
    rss_imports = rss_mb()
    per_kind: dict[str, float] = {}
    shapes = []
    t_all, c_all = time.perf_counter(), cpu_s(children=True)
    for n, p in enumerate(pairs):
        t0 = time.perf_counter()
        d = head({"image": p["image"], "label": p["label"]})
        d = scale[p["modality"]](d)
        side = int(max(d["image"].shape[1:]))
        shapes.append(side)
        d = SpatialPadd(keys=keys, spatial_size=(side, side, side), method="symmetric")(d)
        d = resize(d)
        img = np.asarray(d["image"][0].detach().cpu().numpy(), dtype=np.float16)
        lab = np.asarray(d["label"][0].detach().cpu().numpy()).round().astype(np.uint8)
        np.save(out_dir / f"{n:03d}_image.npy", img)
        np.save(out_dir / f"{n:03d}_label.npy", lab)
        del d, img, lab
        per_kind[p["kind"]] = per_kind.get(p["kind"], 0.0) + time.perf_counter() - t0
    return {
        "volumes": len(pairs),
        "seconds": time.perf_counter() - t_all,
        "cpu_s": cpu_s(children=True) - c_all,
        "per_kind_s": per_kind,
        "rss_imports_mb": rss_imports,
        "cube_side_1mm": shapes,
    }


def _ours_jobs(set_root: Path) -> list[tuple[str, str, Path]]:
    """(kind, dataset, root): CT as its MSD task (modality CT from dataset.json), MR and MNI as
    plain NIfTI folders (labels from the sibling ``labels/``; modality guessed: MR). The uneven
    set (MSD task folders only) is one 3dseg8 run."""
    if not (set_root / "ct" / "Task09_Spleen").is_dir():
        return [("all", "3dseg8", set_root)]
    return [
        ("ct", "msd", set_root / "ct" / "Task09_Spleen"),
        ("mr", "nifti", set_root / "mr"),
        ("mni", "nifti", set_root / "mni"),
    ]


def _one_thread_if_torch() -> None:
    # THREAD_ENV already limits BLAS/OpenMP; torch is told only if the code under test loaded it
    # (importing it here would put its ~600 MB and seconds on a path that may not need it)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def child_ours(args) -> dict:
    from curation.slicing.preprocess import PreprocessConfig
    from curation.slicing.stage import SliceConfig, run_slice

    _one_thread_if_torch()

    set_root = Path(args.set_root)
    work = Path(args.work)
    rss_imports = rss_mb()
    per_kind: dict[str, float] = {}
    volumes = errors = slices = 0
    modalities: dict[str, list] = {}
    manifests: list[tuple[str, Path]] = []
    t_all, c_all = time.perf_counter(), cpu_s(children=True)
    if args.workers > 1:
        # one call over the whole set so the process pool starts once (3dseg8 discovery finds the
        # MSD task with its dataset.json and the images/ + labels/ folders)
        jobs = [("all", "3dseg8", set_root)]
        sampler = TreeRSS().__enter__()
    else:
        jobs = _ours_jobs(set_root)
        sampler = None
    for kind, dataset, root in jobs:
        cfg = SliceConfig(workdir=work / kind, pre=PreprocessConfig(), workers=args.workers)
        t0 = time.perf_counter()
        summary = run_slice(dataset, root, cfg, log=lambda s: None)
        per_kind[kind] = time.perf_counter() - t0
        volumes += summary.processed
        errors += summary.errors
        slices += summary.slices
        manifests.append((kind, summary.volumes_path))
        if summary.error_lines:
            print("\n".join(summary.error_lines), file=sys.stderr)
    seconds = time.perf_counter() - t_all
    cpu_used = cpu_s(children=True) - c_all
    if sampler is not None:
        sampler.__exit__(None, None, None)
    import pandas as pd

    for kind, path in manifests:  # which modality each volume was processed as (CT window or not)
        modalities[kind] = sorted(set(pd.read_parquet(path)["modality"].astype(str)))
    return {
        "tree_peak_rss_mb": sampler.peak_mb if sampler else None,
        "tree_peak_single_rss_mb": sampler.peak_single_mb if sampler else None,
        "rss_children_mb": rss_mb(resource.RUSAGE_CHILDREN),
        "volumes": volumes,
        "errors": errors,
        "slices": slices,
        "seconds": seconds,
        "cpu_s": cpu_used,
        "per_kind_s": per_kind,
        "rss_imports_mb": rss_imports,
        "modalities": modalities,
    }


def child_prepare(args) -> dict:
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    sets = ensure_data(Path(args.data), log=log)
    if args.set == "uneven":
        sets["uneven"] = ensure_uneven(Path(args.data), log=log)
    return {"inputs": describe(volume_pairs(sets[args.set]))}


CHILDREN = {"prepare": child_prepare, "nibabel": child_nibabel, "monai": child_monai, "ours": child_ours, "profile": child_profile}


def _fresh(work: Path) -> Path:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def run_child(method: str, set_root: Path, work: Path, grid: int, workers: int = 1, timeout: float = 900, extra=()) -> dict:
    """One method in a fresh process; its RESULT line plus the whole process's measurements."""
    _fresh(work)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--set-root", str(set_root),
           "--work", str(work), "--grid", str(grid), "--workers", str(workers), *extra]
    proc = run_process(cmd, REPO, dict(os.environ, **THREAD_ENV), work.parent / f"{work.name}.log", timeout)
    if method == "prepare" and proc["stderr"].strip():
        print(proc["stderr"].strip(), file=sys.stderr)
    if proc["returncode"] != 0:
        raise RuntimeError(f"{method} child failed (exit {proc['returncode']}):\n{proc['stderr'][-4000:]}")
    lines = [ln for ln in proc["stdout"].splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{method} child printed no result:\n{proc['stdout'][-2000:]}\n{proc['stderr'][-2000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["process"] = {k: v for k, v in proc.items() if k not in ("stdout", "stderr")}
    return res


def run_curate(set_root: Path, work: Path, grid: int, workers: int, timeout: float = 900,
               timeline: bool = False) -> dict:
    """``curate slice`` over the whole set, as a user runs it (console script, one thread per
    process), timed from outside; the in-process time is the one its summary prints. With
    ``timeline``, every process of the run traces its phases (`slice_profile.install_trace`)."""
    _fresh(work)
    env = dict(os.environ, **THREAD_ENV, COLUMNS="200")
    if timeline:
        site = work / "trace-site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).resolve().parent),
                                             *filter(None, [os.environ.get("PYTHONPATH")])])
        env["SLICE_TRACE"] = str(work / "trace.jsonl")
    curate = Path(sys.executable).with_name("curate")
    head = [str(curate)] if curate.exists() else [sys.executable, "-m", "med3dinsight.curate"]
    cmd = [*head, "slice", "--dataset", "3dseg8", "--root", str(set_root), "--workdir", str(work / "w"),
           "--grid-size", str(grid), "--workers", str(workers)]
    proc = run_process(cmd, REPO, env, work / "log", timeout)
    if proc["returncode"] != 0:
        raise RuntimeError(f"curate slice failed (exit {proc['returncode']}):\n{proc['stderr'][-4000:]}")
    found = {k: re.search(rf"{k}\D*?(\d+(?:\.\d+)?)", proc["stdout"]) for k in ("processed", "errors", "time")}
    return {
        "volumes": int(found["processed"].group(1)) if found["processed"] else 0,
        "errors": int(found["errors"].group(1)) if found["errors"] else None,
        "seconds": float(found["time"].group(1)) if found["time"] else None,
        "cpu_s": proc["cpu_s"],
        "command": " ".join(cmd[len(head):]),
        "process": {k: v for k, v in proc.items() if k not in ("stdout", "stderr")},
        "timeline": read_trace(work / "trace.jsonl") if timeline else None,
    }


# =========================================================================== parent


def fmt_table(rows: list[dict]) -> str:
    head = ["method", "volumes", "in-proc s", "process s", "vol/s", "peak RSS MB", "x MONAI vol/s",
            "x MONAI RSS", "x floor s", "CPU s", "load 1m"]
    opt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    body = [[r["method"], str(r["volumes"]), opt(r["seconds"]), opt(r["process_s"]), opt(r["volumes_per_s"], "{:.3f}"),
             f"{r['peak_rss_mb']:.0f}", opt(r.get("throughput_vs_monai")), opt(r.get("rss_vs_monai")),
             opt(r.get("time_vs_floor")), f"{r['cpu_s']:.2f}", f"{r['loadavg_1m']:.2f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *[line(b) for b in body]])


def make_row(name: str, workers: int, reps: list[dict]) -> dict:
    """The fastest of the repeats (by whole-process time); memory is the worst repeat's."""
    res = min(reps, key=lambda r: r["process"]["wall_s"])
    res["repeats_process_s"] = [r["process"]["wall_s"] for r in reps]
    # largest single process (wait4's ru_maxrss); with workers, the process tree's summed peak
    single = max(max(r.get("peak_rss_mb") or 0.0, r["process"]["maxrss_mb"]) for r in reps)
    tree = max(r["process"]["tree_peak_rss_mb"] for r in reps)
    process_s = res["process"]["wall_s"]
    return {
        "method": name,
        "volumes": res["volumes"],
        "seconds": res.get("seconds"),
        "process_s": process_s,
        "volumes_per_s": res["volumes"] / process_s if process_s else float("nan"),
        "peak_rss_mb": max(single, tree) if workers > 1 else single,
        "cpu_s": res["process"]["cpu_s"],
        "loadavg_1m": res["process"]["loadavg_1m"],
        "workers": workers,
        "detail": res,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "bench-work" / "data", help="volume cache (generated once)")
    ap.add_argument("--work", type=Path, default=REPO / "bench-work" / "runs", help="scratch outputs of each method")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results_slice.json"), help="results JSON ('' for none)")
    ap.add_argument("--quick", action="store_true", help="1 volume of each kind (smoke run; = --set quick)")
    ap.add_argument("--set", choices=("full", "quick", "uneven"), default=None,
                    help="volumes: full (16), quick (3), uneven (12 small MR, then 4 CT of 120..360 slices)")
    ap.add_argument("--workers", type=int, default=0, help="also time ours in-process with N worker processes (N >= 2)")
    ap.add_argument("--scaling", type=int, default=2, help="workers of the scaling row, `curate slice --workers N` (0: none)")
    ap.add_argument("--grid", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1, help="run each method N times, keep the fastest")
    ap.add_argument("--methods", default="nibabel,monai,ours,curate", help="comma list of nibabel, monai, ours, curate")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-stage split of one CT volume")
    ap.add_argument("--timeline", action="store_true",
                    help="trace every process of the curate rows (phases, each worker's volumes); print the timeline")
    # internal: one method in a fresh process
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--set-root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        res = CHILDREN[args.child](args)
        res["peak_rss_mb"] = rss_mb()
        res["vmhwm_mb"] = hwm_mb()
        print("RESULT " + json.dumps(res))
        return 0

    # The parent stays small (stdlib only): generating and describing volumes happens in a child.
    set_name = args.set or ("quick" if args.quick else "full")
    set_root = args.data / set_name
    prep = run_child("prepare", set_root, args.work / "prepare", args.grid,
                     extra=["--data", str(args.data), "--set", set_name])
    pairs = volume_pairs(set_root)
    inputs = prep["inputs"]
    print(f"volumes ({set_name}): {len(pairs)}")
    for v in inputs:
        print(f"  {v['kind']:4s} {v['file']:24s} {str(tuple(v['shape'])):18s} {str(tuple(v['spacing'])):22s} {v['dtype']:8s} {v['axcodes']}  {v['mb_gz']} MB")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    plan: list[tuple[str, str, int]] = []  # (row name, child or "curate", workers)
    for m in methods:
        if m not in ("nibabel", "monai", "ours", "curate"):
            ap.error(f"unknown method {m!r}")
        plan.append((m, m, 1))
    if args.workers and args.workers > 1:
        plan.append((f"ours-w{args.workers}", "ours", args.workers))
    if args.scaling and args.scaling > 1:
        if "curate" not in methods:
            plan.append(("curate", "curate", 1))
        plan.append((f"curate-w{args.scaling}", "curate", args.scaling))

    rows = []
    t_run = time.perf_counter()
    load_before = os.getloadavg()
    for name, child, workers in plan:
        print(f"running {name} ...", flush=True)
        reps = []
        for _ in range(max(1, args.repeat)):
            if child == "curate":
                reps.append(run_curate(set_root, args.work / name, args.grid, workers, timeline=args.timeline))
                if args.timeline:
                    proc = reps[-1]["process"]
                    print(f"  timeline (s from the command's start; whole process {proc['wall_s']:.2f} s, "
                          f"CPU {proc['cpu_s']:.2f} s):\n{fmt_trace(reps[-1]['timeline'])}", flush=True)
            else:
                reps.append(run_child(child, set_root, args.work / name, args.grid, workers))
        row = make_row(name, workers, reps)
        if row["detail"].get("errors"):
            print(f"  WARNING: {row['detail']['errors']} volume(s) failed in {name}", file=sys.stderr)
        rows.append(row)
        print(f"  {row['volumes']} volumes in {row['process_s']:.2f} s whole process"
              + (f" ({row['seconds']:.2f} s in-process)" if row["seconds"] is not None else "")
              + f", peak RSS {row['peak_rss_mb']:.0f} MB, load {row['loadavg_1m']:.2f}", flush=True)

    monai = next((r for r in rows if r["method"] == "monai"), None)
    floor = next((r for r in rows if r["method"] == "nibabel"), None)
    for r in rows:
        r["throughput_vs_monai"] = r["volumes_per_s"] / monai["volumes_per_s"] if monai else None
        r["rss_vs_monai"] = r["peak_rss_mb"] / monai["peak_rss_mb"] if monai else None
        r["time_vs_floor"] = r["process_s"] / floor["process_s"] if floor and r["volumes"] == floor["volumes"] else None
    scaling = None
    one, many = (next((r for r in rows if r["method"] == m), None) for m in ("curate", f"curate-w{args.scaling}"))
    if one and many and one["volumes"] == many["volumes"]:
        scaling = {"workers": args.scaling, "volumes": one["volumes"], "one_s": one["process_s"], "many_s": many["process_s"],
                   "speedup": one["process_s"] / many["process_s"], "one_cpu_s": one["cpu_s"], "many_cpu_s": many["cpu_s"]}

    profile = None
    if not args.no_profile and set_name != "uneven":  # the stage split is of the full set's CT
        print("profiling one CT volume ...", flush=True)
        try:
            profile = run_child("profile", set_root, args.work / "profile", args.grid)
        except RuntimeError as exc:  # the stage split is a detail; the table stands without it
            print(f"  profile failed: {str(exc).splitlines()[-1]}", file=sys.stderr)

    load_after = os.getloadavg()
    print()
    print(f"bench_slice ({set_name}: {len(pairs)} volumes = "
          + ", ".join(f"{sum(p['kind'] == k for p in pairs)} {k}" for k in KINDS)
          + f"; grid {args.grid}; one thread per process"
          + (f"; fastest of {args.repeat}" if args.repeat > 1 else "") + f"; {time.strftime('%Y-%m-%d')})")
    print(fmt_table(rows))
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs): "
          "wall-clock ratios assume a quiet machine; CPU s (user+sys, workers included) is less sensitive")
    print("x MONAI vol/s and x floor s use whole-process times; targets: >= 10x MONAI, <= 3x the floor "
          "(nibabel), <= 0.3x MONAI's RSS")
    if scaling:
        print(f"workers scaling (curate slice, whole process, same {scaling['volumes']} volumes): 1 worker "
              f"{scaling['one_s']:.2f} s, {scaling['workers']} workers {scaling['many_s']:.2f} s -> "
              f"{scaling['speedup']:.2f}x (CPU s {scaling['one_cpu_s']:.1f} vs {scaling['many_cpu_s']:.1f}; target >= 1.6x "
              "on 2 cores from 16 volumes up)")
    print()
    print("seconds per kind (in-process):")
    for r in rows:
        pk = r["detail"].get("per_kind_s", {})
        if pk:
            print(f"  {r['method']:10s} " + "  ".join(f"{k} {v:.2f}" for k, v in pk.items()))
    if profile:
        print()
        print(f"stage split, one CT volume {profile['volume']} {tuple(profile['source_shape'])}: "
              f"process_volume {profile['total_s']:.2f} s wall, {profile['total_cpu_s']:.2f} s CPU (fastest of 3)")
        tot = profile["total_cpu_s"]
        print(f"  {'stage':62s} {'wall s':>7s} {'CPU s':>7s} {'CPU %':>6s}")
        for k, v in profile["stages_cpu_s"].items():
            print(f"  {k:62s} {profile['stages_s'][k]:7.3f} {v:7.3f} {100 * v / tot:5.1f}%")

    result = {
        "benchmark": "bench_slice",
        "date": time.strftime("%Y-%m-%d"),
        "set": set_name,
        "grid": args.grid,
        "inputs": inputs,
        "rows": rows,
        "scaling": scaling,
        "profile": profile,
        "wall_s": time.perf_counter() - t_run,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "threads": THREAD_ENV,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
