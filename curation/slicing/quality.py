"""Quality flags of a volume: junk that would otherwise pass as data.

`curate slice` records them in ``volumes.parquet`` (``quality_flags``, a list, empty when the
volume looks fine) and writes one line per flag into the volume's ``notes``; `curate rank`
leaves flagged volumes out of the selection unless ``--include-flagged``.

Flags:
- ``too_few_voxels``: fewer than ``MIN_AXIS_VOXELS`` source voxels along an axis, or fewer
  than ``MIN_VOXELS`` (16^3) in all (a 3x4x5 test volume or a 16x16x5 series blown up to a
  128^3 cube is not an image; a 10-slice thick-slab MR of 64x64 pixels is).
- ``statistical_map``: a z/t/F statistic or p-value map, not an acquisition: the NIfTI intent
  code says so, the file is named like one (zstat1, spmT_0001, ...), or (not CT) float data
  spread over both signs around 0 with heavy negative values and long tails (1st-99th
  percentile range over 6 interquartile ranges; a z-scored MR image, spread over its tissue
  classes, has about 3-5 and is not flagged).
- ``constant_intensity``: every voxel has the same value.
- ``few_intensity_levels``: at most ``MAX_MASK_LEVELS`` distinct values (a mask or label map
  passed as an image).
- ``empty_after_preprocessing``: nothing or almost nothing of it survives preprocessing (no
  slice, a plane without slices, or under 5% of the cube's slices reach the foreground
  threshold: e.g. an absurd slice thickness that squeezes it into a sliver of the cube).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

MIN_AXIS_VOXELS = 8
MIN_VOXELS = 16**3
MAX_MASK_LEVELS = 3
MIN_STAT_TAILS = 6.0  # (p99 - p1) / IQR: 3.4 for a normal distribution, ~3-5 for z-scored MR
# nibabel's intent names (header.get_intent()[0]) of statistic maps.
STAT_INTENTS = {
    "correlation", "t test", "f test", "z score", "chi squared", "beta", "binomial", "gamma", "poisson",
    "normal", "non central f test", "non central chi squared", "logistic", "laplace", "uniform",
    "non central t test", "weibull", "chi", "inverse gaussian", "extreme value", "p value", "log p value",
    "log10 p value", "estimate",
}
STAT_NAME = re.compile(
    r"(^|[^a-z])(z|t|f)stat|zfstat|(^|[^a-z])(z|t|f)map|spm[tf]_|zscore|z_score|tscore|pval|p_value|"
    r"(^|[^a-z])var?cope|(^|[^a-z])cope\d|(^|[^a-z])con_\d{4}|statmap|stat_map",
    re.IGNORECASE,
)

FLAG_TEXT = {
    "too_few_voxels": "too few voxels on an axis",
    "statistical_map": "looks like a statistical map, not an image",
    "constant_intensity": "constant intensity",
    "few_intensity_levels": "only a few intensity levels (a mask or label map?)",
    "empty_after_preprocessing": "(almost) empty after preprocessing",
}


def nifti_intent(path: Path | str | None) -> str | None:
    """The NIfTI header's intent name ("z score", "t test", ...), or None (no header, none set)."""
    if path is None:
        return None
    try:
        import nibabel as nib

        img = nib.load(str(path))  # the header only: data stay on disk
        get_intent = getattr(img.header, "get_intent", None)
        name = get_intent()[0] if get_intent else None
    except Exception:  # not NIfTI, or unreadable (the loader said so already)
        return None
    return str(name).lower() if name and str(name).lower() != "none" else None


def _sample(arr: np.ndarray, limit: int = 2_000_000) -> np.ndarray:
    flat = arr.reshape(-1)
    if flat.size > limit:
        flat = flat[:: flat.size // limit + 1]
    return flat


def source_flags(
    arr: np.ndarray, shape: tuple[int, ...], modality: str | None, name: str = "", intent: str | None = None
) -> list[tuple[str, str]]:
    """Flags of one source channel before preprocessing: ``[(flag, detail)]``."""
    flags: list[tuple[str, str]] = []
    spatial = [int(v) for v in shape[:3]]
    dims = "x".join(map(str, spatial))
    if min(spatial) < MIN_AXIS_VOXELS:
        flags.append(("too_few_voxels", f"{dims} voxels (< {MIN_AXIS_VOXELS} on an axis)"))
    elif int(np.prod(spatial)) < MIN_VOXELS:
        flags.append(("too_few_voxels", f"{dims} voxels (< {MIN_VOXELS:,} in all)"))
    if intent in STAT_INTENTS:
        flags.append(("statistical_map", f"NIfTI intent '{intent}'"))
    elif STAT_NAME.search(Path(name).name if name else ""):
        flags.append(("statistical_map", f"named like a statistic map ({Path(name).name})"))
    sample = _sample(np.asarray(arr))
    finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    if finite.size == 0:
        flags.append(("constant_intensity", "no finite voxel"))
        return flags
    lo, hi = finite.min(), finite.max()
    if lo == hi:
        flags.append(("constant_intensity", f"every voxel is {float(lo):g}"))
        return flags
    levels = np.unique(finite[: 200_000]) if finite.size > 200_000 else np.unique(finite)
    if levels.size <= MAX_MASK_LEVELS and np.unique(finite).size <= MAX_MASK_LEVELS:
        flags.append(("few_intensity_levels", f"{levels.size} distinct values"))
    if str(modality or "").upper() != "CT" and finite.dtype.kind == "f" and not any(f == "statistical_map" for f, _ in flags):
        nz = finite[finite != 0].astype(np.float64)
        if nz.size >= 100:
            neg = float(np.mean(nz < 0))
            p1, p50, p99 = np.percentile(nz, [1, 50, 99])
            spread = max(abs(p1), abs(p99))
            q25, q75 = np.percentile(nz, [25, 75])
            tails = (p99 - p1) / (q75 - q25) if q75 > q25 else float("inf")
            # A statistic map: a null peak at 0 with long tails (activations); an intensity-
            # normalised (z-scored) MR image is spread over its tissue classes (short tails).
            if 0.2 <= neg <= 0.8 and -p1 >= 0.25 * p99 and abs(p50) <= 0.2 * spread and tails >= MIN_STAT_TAILS:
                flags.append(("statistical_map", f"values on both sides of 0 ({neg:.0%} negative, 1st-99th pct "
                                                 f"{p1:.3g}..{p99:.3g}, {tails:.1f}x the interquartile range)"))
    return flags


def result_flags(rows: list[dict[str, Any]], grid_size: int) -> list[tuple[str, str]]:
    """Flags of the preprocessed volume from its slice rows: ``[(flag, detail)]``. Nothing, or
    a sliver (a plane without any slice, or under 5% of the cube's slices) is flagged."""
    per_plane = {p: 0 for p in ("axial", "coronal", "sagittal")}
    for row in rows:
        per_plane[row["plane"]] = per_plane.get(row["plane"], 0) + 1
    n = len(rows)
    counts = ", ".join(f"{p} {c}" for p, c in per_plane.items())
    if n == 0:
        return [("empty_after_preprocessing", "0 slices reach the foreground threshold")]
    if min(per_plane.values()) == 0 or n < 0.05 * 3 * grid_size:
        return [("empty_after_preprocessing", f"only {n} slice(s) reach the foreground threshold ({counts})")]
    return []


def flag_lines(flags: list[tuple[str, str]]) -> list[str]:
    """One readable line per flag, for the volume's notes and the run's log."""
    return [f"quality flag {flag}: {FLAG_TEXT.get(flag, flag)}: {detail}" for flag, detail in flags]


def flag_names(flags: list[tuple[str, str]]) -> list[str]:
    out: list[str] = []
    for flag, _ in flags:
        if flag not in out:
            out.append(flag)
    return out


def has_flags(value: Any) -> bool:
    """Whether a manifest cell of ``quality_flags`` holds a flag (None/NaN/[] do not)."""
    if value is None or isinstance(value, float):
        return False
    try:
        return len(value) > 0
    except TypeError:
        return False
