"""DICOM discovery speed: `find_series` (cold, then warm from the header index) beside dcm2niix
on a generated flat export (every file of every series in one folder, names shuffled).

    .venv/bin/python benchmarks/bench_dicom.py --files 7000 --size 256 --workers 8

Prints one JSON line: seconds for a cold and a warm discovery, dcm2niix's full conversion (if
installed; "dcm2niix": null when not), the ratio, and peak memory of this process (discovery
only: dcm2niix runs in its own process).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curation.dicom.load import find_series  # noqa: E402
from curation.sample.dicom_write import write_series  # noqa: E402


def make_export(folder: Path, n_files: int, size: int, per_series: int) -> int:
    """Flat folder of ``n_files`` single-frame MR files, ``per_series`` slices per series."""
    rng = np.random.default_rng(0)
    affine = np.diag([-0.9, -0.9, 3.0, 1.0])
    n_series = 0
    while n_series * per_series < n_files:
        k = min(per_series, n_files - n_series * per_series)
        array = rng.integers(0, 2000, size=(size, size, k)).astype(np.float64)
        write_series(array, affine, folder, modality="MR", shuffle=True, seed=n_series,
                     patient_id=f"P{n_series % 7}")
        n_series += 1
    return n_series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256, help="rows = columns of each image")
    ap.add_argument("--per-series", type=int, default=100)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="write the export here and keep it")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_dicom_"))
    export = args.keep or tmp / "export"
    export.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_series = make_export(export, args.files, args.size, args.per_series)
    made = time.perf_counter() - t0
    cache = tmp / "cache"
    t0 = time.perf_counter()
    cold = find_series(export, series_parts="all", cache_dir=cache, workers=args.workers)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = find_series(export, series_parts="all", cache_dir=cache, workers=args.workers)
    warm_s = time.perf_counter() - t0
    assert len(cold) == len(warm) == n_series, (len(cold), len(warm), n_series)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dcm2niix_s = None
    if shutil.which("dcm2niix"):
        out = tmp / "nii"
        out.mkdir()
        t0 = time.perf_counter()
        subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", str(out), str(export)], check=True,
                       capture_output=True)
        dcm2niix_s = time.perf_counter() - t0
    print(json.dumps({
        "files": args.files, "size": args.size, "series": n_series, "generate_s": round(made, 2),
        "find_series_cold_s": round(cold_s, 2), "find_series_warm_s": round(warm_s, 2),
        "dcm2niix_s": None if dcm2niix_s is None else round(dcm2niix_s, 2),
        "cold_vs_dcm2niix": None if not dcm2niix_s else round(cold_s / dcm2niix_s, 2),
        "peak_rss_mb": round(peak_mb), "workers": args.workers,
    }))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
