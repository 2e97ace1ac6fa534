"""DICOM discovery and series assembly of a hospital-style export, as whole processes, beside dcm2niix.

    .venv/bin/python benchmarks/bench_dicom.py                 # ~7,400 files, 2 GB (built once, ~4 min)
    .venv/bin/python benchmarks/bench_dicom.py --heavy         # the same series at 128x128, ~11 KB headers
    .venv/bin/python benchmarks/bench_dicom.py --quick         # ~600 files, smoke run
    .venv/bin/python benchmarks/bench_dicom.py --profile       # + cProfile of one discovery

The export (laid out as Philips exports are: a DICOMDIR, ``DICOM/<study>/<series>/IM_nnnnn``
files without an extension, ~3.6 KB headers with ~120 private values and a private sequence)
holds classic single-frame CT (512x512) and MR (256x256, 384x384) series of a few hundred
slices, a few enhanced multi-frame MR objects, a localizer, and objects that are not images (an
SR, a presentation state, a key object selection, a text file, a JPEG thumbnail). It is written
once with `curation.sample.dicom_write` into ``--data`` and reused.

Rows, each a fresh process timed from start to exit by this parent (`proc_stats.run_process`):
``discover-wN`` (`find_series` with N worker processes, a fresh header index), ``assemble-wN``
(the same, then `load_series` of every series into a float32 volume: what dcm2niix does short
of writing), ``before-wN`` (``--baseline``: another version's discovery) and ``dcm2niix``
(``-f %s -z n -b n -w 1``: reads every header and all pixels, writes uncompressed NIfTI without
JSON sidecars). The ratio is our seconds over dcm2niix's. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from proc_stats import run_process  # noqa: E402

# (modality, rows=cols, slices, kind): kind "classic" (one file per slice) or "enhanced" (one file)
FULL = ([("CT", 512, n, "classic") for n in (420, 400, 380, 350, 300, 260)]
        + [("MR", 384, n, "classic") for n in (300, 240, 200)]
        + [("MR", 256, n, "classic") for n in (400, 360, 320, 300, 280, 260, 240, 220, 200, 180, 176, 160, 150,
                                                144, 140, 128, 120, 112, 100, 96, 90, 84, 80, 72, 64, 60)]
        + [("MR", 256, n, "enhanced") for n in (180, 120, 96)] + [("CT", 512, 3, "localizer")])
# the same series as 128x128 images with three times the private bulk (~11 KB headers): closer to
# an MR export where pixels are few and headers heavy, the hardest case against dcm2niix
HEAVY = [(m, 128, n, kind) for m, _, n, kind in FULL]
QUICK = [("CT", 256, 120, "classic"), ("MR", 256, 200, "classic"), ("MR", 128, 250, "classic"),
         ("MR", 128, 60, "enhanced"), ("CT", 256, 3, "localizer")]


def _phantom(size: int, slices: int, seed: int) -> np.ndarray:
    """A cheap (i, j, k) image with structure and noise (values fit int16)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-1, 1, size)
    disc = ((x[:, None] ** 2 + x[None, :] ** 2) < 0.7).astype(np.float64) * 900
    vol = np.repeat(disc[:, :, None], slices, axis=2) - 1000
    return vol + rng.integers(0, 50, size=(1, size, slices))


def vendor_private(ds, n: int, scale: int = 1) -> None:
    """Vendor bulk as classic MR/CT headers carry it (~120 private values and a private sequence
    whose items repeat standard attributes), so header parsing costs what it does on a real
    export. Groups 7001/7005 with a made-up creator: no reader gives them a meaning (Philips'
    own 2001/2005 elements would be read as slice counts and the like)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    block = ds.private_block(0x7001, "BENCH Imaging DD 001", create=True)
    for e in range(0x10, 0x10 + 80 * scale):
        block.add_new(e, ("FL", "SL", "CS", "LO")[e % 4], (1.5 * e, e * 7, "YES", f"value {e}")[e % 4])
    mr = ds.private_block(0x7005, "BENCH MR Imaging DD 001", create=True)
    for e in range(0x10, 0x40):
        mr.add_new(e, "DS" if e % 2 else "IS", str(e * 3 + n))
    items = []
    for k in range(3 * scale):
        item = Dataset()
        item.ImageType = ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]
        item.EchoTime, item.RepetitionTime, item.FlipAngle = 10.0 + k, 500.0, 90.0
        item.SliceThickness, item.SpacingBetweenSlices, item.PixelBandwidth = 2.0, 2.0, 217.0
        item.ImagingFrequency, item.MagneticFieldStrength, item.NumberOfAverages = 127.7, 3.0, 1.0
        item.ProtocolName, item.SequenceName, item.ScanningSequence = "T1W_SE", "SE", "SE"
        item.private_block(0x7005, "BENCH MR Imaging DD 005", create=True).add_new(0x01, "LO", "x" * 30)
        items.append(item)
    mr.add_new(0x0D, "SQ", Sequence(items))


def make_export(folder: Path, plan: list[tuple[str, int, int, str]], scale: int = 1) -> dict:
    """Write the export into ``folder``; returns its description (files, series, bytes)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from curation.sample.dicom_write import write_multiframe, write_series

    dicom = folder / "DICOM"
    n_files, volumes = 0, 0
    for n, (modality, size, slices, kind) in enumerate(plan):
        series_dir = dicom / f"ST{n // 8:06d}" / f"SE{n:06d}"
        affine = np.diag([-250 / size, -250 / size, 1.5 if modality == "CT" else 2.0, 1.0])
        affine[:3, 3] = [120, 120, -100 + n]
        array = _phantom(size, slices, n)

        def edit(ds: Dataset, k: int, n: int = n, kind: str = kind) -> None:
            ds.SeriesNumber = 100 * (n + 1)
            ds.SeriesDescription = "Survey" if kind == "localizer" else f"{ds.Modality} series {n}"
            ds.Manufacturer = "Philips"
            vendor_private(ds, n, scale)

        if kind == "enhanced":
            write_multiframe(array, affine, series_dir / "IM_00001", modality=modality, seed=n,
                             patient_id=f"P{n % 3}")
            n_files += 1
        else:
            if kind == "localizer":  # three orthogonal-ish images: set aside, not a volume
                edit_loc = edit
                write_series(array, affine, series_dir, modality=modality, seed=n, patient_id=f"P{n % 3}",
                             edit=lambda ds, k: (edit_loc(ds, k), setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY",
                                                                                           "LOCALIZER"])))
            else:
                write_series(array, affine, series_dir, modality=modality, shuffle=True, seed=n,
                             patient_id=f"P{n % 3}", edit=edit)
            for m, path in enumerate(sorted(series_dir.glob("*.dcm"))):
                path.rename(series_dir / f"IM_{m + 1:05d}")
            n_files += slices
        volumes += kind != "localizer"
    others = dicom / "ST999999" / "SE999999"
    others.mkdir(parents=True, exist_ok=True)
    for name, sop_class, modality in (("SR", "1.2.840.10008.5.1.4.1.1.88.22", "SR"),
                                      ("PR", "1.2.840.10008.5.1.4.1.1.11.1", "PR"),
                                      ("KO", "1.2.840.10008.5.1.4.1.1.88.59", "KO")):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid(entropy_srcs=[name])
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Modality, ds.SeriesInstanceUID, ds.PatientID = modality, generate_uid(entropy_srcs=[name, "s"]), "P0"
        ds.save_as(others / f"IM_{name}", enforce_file_format=True)
    dirds = Dataset()
    dirds.file_meta = FileMetaDataset()
    dirds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dirds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["dicomdir"])
    dirds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dirds.FileSetID = "BENCH"
    dirds.DirectoryRecordSequence = []
    dirds.save_as(folder / "DICOMDIR", enforce_file_format=True)
    (folder / "README.TXT").write_text("Exported by a workstation\n")
    (dicom / "thumb.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(2000))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"files": sum(1 for p in folder.rglob("*") if p.is_file()), "image_files": n_files,
            "volumes": volumes, "bytes": size}


def child(mode: str, root: Path, workers: int) -> None:
    """One measured process: discovery (+ assembly of every series)."""
    import time

    if os.environ.get("BENCH_DICOM_TREE"):  # the baseline: another checkout's curation package
        sys.path.insert(0, os.environ["BENCH_DICOM_TREE"])
        for name in [m for m in sys.modules if m == "curation" or m.startswith("curation.")]:
            del sys.modules[name]
    from curation.dicom.load import find_series, load_series

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        found = find_series(root, series_parts="all", cache_dir=Path(cache), workers=workers)
    discover = time.perf_counter() - t0
    voxels = 0
    if mode == "assemble":
        for series in found:
            voxels += load_series(series).data.size
    print(json.dumps({"series": len(found), "skipped": len(found.skipped), "skipped_series": len(found.skipped_series),
                      "discover_s": discover, "in_proc_s": time.perf_counter() - t0, "voxels": voxels}))


def profile(root: Path, workers: int) -> None:
    import cProfile
    import pstats

    from curation.dicom.load import find_series

    prof = cProfile.Profile()
    prof.enable()
    find_series(root, series_parts="all", cache_dir=None, workers=workers)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def _run(cmd: list[str], log: Path, repeat: int, tree: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if tree is not None:
        env["BENCH_DICOM_TREE"] = str(tree.resolve())
    runs = [run_process(cmd, ROOT, env, log / str(r)) for r in range(repeat)]
    for run in runs:
        if run["returncode"] != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{run['stderr'][-2000:]}")
    return min(runs, key=lambda r: r["wall_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "bench-work" / "dicom")
    ap.add_argument("--quick", action="store_true", help="a ~600-file export")
    ap.add_argument("--heavy", action="store_true", help="the full export's series at 128x128 with ~11 KB headers")
    ap.add_argument("--repeat", type=int, default=1, help="keep the fastest of N runs per row")
    ap.add_argument("--workers", default="1,2", help="worker counts of the rows (comma-separated)")
    ap.add_argument("--rows", default="dcm2niix,discover", help="of dcm2niix,discover,assemble")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one discovery (1 worker)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a folder holding another version's curation/ package (e.g. from git archive): adds "
                         "its discover rows (before-wN) for a before/after comparison on the same export")
    ap.add_argument("--out", default=str(HERE / "results_dicom.json"), help="results JSON ('': none)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "ROOT", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), int(args.child[2]))
    export = args.data / ("quick" if args.quick else "heavy" if args.heavy else "full")
    marker = export / "export.json"
    if not marker.exists():
        shutil.rmtree(export, ignore_errors=True)
        print(f"writing the export into {export} ...", flush=True)
        desc = make_export(export, QUICK if args.quick else HEAVY if args.heavy else FULL, 3 if args.heavy else 1)
        marker.write_text(json.dumps(desc))
    desc = json.loads(marker.read_text())
    load0 = os.getloadavg()
    print(f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} CPUs); export: "
          f"{desc['files']} files ({desc['image_files']} image files, {desc['volumes']} volumes, "
          f"{desc['bytes'] / 1e9:.2f} GB)", flush=True)
    if args.profile:
        profile(export, 1)
    rows, log = [], Path(tempfile.mkdtemp(prefix="bench_dicom_"))
    wanted = args.rows.split(",")
    dcm2niix = shutil.which("dcm2niix") or (shutil.which("dcm2niix", path=str(Path(sys.executable).parent)))
    if "dcm2niix" in wanted and dcm2niix:
        out = log / "nii"
        out.mkdir()
        cmd = [dcm2niix, "-o", str(out), "-f", "%s", "-z", "n", "-b", "n", "-w", "1", str(export)]
        rows.append(("dcm2niix", _run(cmd, log / "dcm2niix", args.repeat), {}))
        rows[-1][2]["outputs"] = len(list(out.glob("*.nii")))
        shutil.rmtree(out)
        out.mkdir()
    for mode in ("before", "discover", "assemble"):
        for w in (int(x) for x in args.workers.split(",") if x):
            if mode in wanted or (mode == "before" and args.baseline):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child",
                       "discover" if mode == "before" else mode, str(export), str(w)]
                run = _run(cmd, log / f"{mode}{w}", args.repeat, args.baseline if mode == "before" else None)
                rows.append((f"{mode}-w{w}", run, json.loads(run["stdout"].strip().splitlines()[-1])))
    base = next((r[1]["wall_s"] for r in rows if r[0] == "dcm2niix"), None)
    print(f"\n{'row':<12} {'process s':>9} {'in-proc s':>9} {'CPU s':>7} {'peak MB':>8} {'volumes':>7} "
          f"{'x dcm2niix':>10} {'load 1m':>7}")
    for name, run, info in rows:
        ratio = f"{run['wall_s'] / base:.2f}" if base else "-"
        vols = info.get("series", info.get("outputs", "-"))
        inproc = f"{info['in_proc_s']:.2f}" if "in_proc_s" in info else "-"
        print(f"{name:<12} {run['wall_s']:>9.2f} {inproc:>9} {run['cpu_s']:>7.2f} {run['tree_peak_rss_mb']:>8.0f} "
              f"{vols!s:>7} {ratio:>10} {run['loadavg_1m']:>7.2f}")
    load1 = os.getloadavg()
    print(f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; {platform.node()} "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    if args.out:
        Path(args.out).write_text(json.dumps({"export": desc, "load_before": load0, "load_after": load1,
                                        "rows": [{"row": n, **{k: v for k, v in r.items()
                                                                if k not in ("stdout", "stderr")},
                                                  "info": i} for n, r, i in rows]}, indent=1))
    shutil.rmtree(log, ignore_errors=True)


if __name__ == "__main__":
    main()
