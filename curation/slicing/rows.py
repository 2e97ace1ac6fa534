"""The slice rows of one preprocessed volume: which slices count, and what they show.

A slice along a plane is indexed when enough of it is body (``body_mask``: the patient without
air, the CT table or background noise); its row carries position, that body fraction as
``foreground_fraction``, intensity statistics and the label classes it contains; with a label
map, ``label_regions`` (JSON) says per class present its area (mm^2, and as a fraction of the
slice's body), its side in patient terms (right/left/midline/bilateral, from the RAS grid and
the body's centre) and ``peak``: its area over its largest area along that plane.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from curation.slicing.body_mask import body_mask
from curation.store.manifest import PLANE_AXIS, PLANES, RANK_COLUMNS, SLICES_SCHEMA

# Bump when the rule deciding which slices exist changes (a slice-step fingerprint can include it).
ROWS_VERSION = 3

# The slices manifest's columns that `curate slice` fills (the rest are `curate rank`'s).
ROWS_COLUMNS = [f.name for f in SLICES_SCHEMA if f.name not in RANK_COLUMNS]


def slice_rows(
    volume_id: str,
    vol: np.ndarray,
    label: np.ndarray | None,
    label_names: dict[str, str],
    level: float,
    min_foreground: float,
    voxel_mm: float = 1.0,
) -> list[dict[str, Any]]:
    """One row per slice along each plane whose body fraction reaches ``min_foreground``: plain
    dicts with the ``ROWS_COLUMNS`` of the slices manifest (the slicing workers build no
    DataFrame or Arrow array: either would import pandas, a second per worker).

    ``foreground_fraction`` is the fraction of the slice inside ``body_mask(vol, level)``, so a
    coronal slice through the CT table alone, or one of MR background noise, has 0 and is
    not indexed.
    """
    G = vol.shape[0]
    v32 = vol.astype(np.float32)
    fg = body_mask(v32, level)
    values: list[int] = []
    stats: dict[int, dict[int, dict[str, np.ndarray]]] = {}
    if label is not None:
        if label.dtype.kind == "u" and label.dtype.itemsize <= 2:  # counting is faster than sorting
            values = [int(v) for v in np.flatnonzero(np.bincount(label.ravel())) if v != 0]
        else:
            values = [int(v) for v in np.unique(label) if v != 0]
        for v in values:
            stats[v] = _label_stats(label == v)
    geo = _Geometry(fg, G)
    rows = []
    for plane_index, plane in enumerate(PLANES):
        ax = PLANE_AXIS[plane]
        others = tuple(a for a in range(3) if a != ax)
        frac = fg.mean(axis=others)
        mean = v32.mean(axis=others)
        std = v32.std(axis=others)
        for idx in range(G):
            if frac[idx] < min_foreground or frac[idx] == 0:
                continue
            present = [v for v in values if stats[v][ax]["area"][idx] > 0]
            labels = [label_names.get(str(v), f"label_{v}") for v in present]
            row = {
                "slice_id": f"{volume_id}:{plane}:{idx}",
                "volume_id": volume_id,
                "plane": plane,
                "plane_index": plane_index,
                "index": idx,
                "position": (idx + 0.5) / G,
                "foreground_fraction": float(frac[idx]),
                "mean_intensity": float(mean[idx]),
                "std_intensity": float(std[idx]),
                "labels_present": sorted(set(labels)),
            }
            if label is not None:
                body_px = max(1.0, float(frac[idx]) * G * G)
                regions = [geo.region(label_names.get(str(v), f"label_{v}"), stats[v][ax], ax, idx, body_px, voxel_mm)
                           for v in present]
                row["label_regions"] = json.dumps(regions, separators=(",", ":"))
            rows.append(row)
    return rows


def _label_stats(m: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    """Per plane axis: the class's area per slice and, for the planes that contain the R axis
    (coronal, axial), its x centroid and x range per slice."""
    G = m.shape[0]
    xs = np.arange(G, dtype=np.float64)[:, None]
    out: dict[int, dict[str, np.ndarray]] = {}
    xz = m.sum(axis=1, dtype=np.int64)  # (x, z): for axial slices (index z)
    xy = m.sum(axis=2, dtype=np.int64)  # (x, y): for coronal slices (index y)
    for ax, c in ((2, xz), (1, xy)):
        area = c.sum(axis=0)
        hit = c > 0
        safe = np.maximum(area, 1)
        out[ax] = {
            "area": area,
            "cx": (xs * c).sum(axis=0) / safe,
            "x0": np.argmax(hit, axis=0),
            "x1": G - 1 - np.argmax(hit[::-1], axis=0),
            "peak": area / max(1, int(area.max())),
        }
    sag = xz.sum(axis=1)
    out[0] = {"area": sag, "peak": sag / max(1, int(sag.max()))}
    return out


class _Geometry:
    """Where the body's midline lies along R (the centroid of the body mask) and how wide it is."""

    def __init__(self, fg: np.ndarray, G: int) -> None:
        counts = fg.sum(axis=(1, 2), dtype=np.int64).astype(np.float64)
        total = counts.sum()
        xs = np.arange(G, dtype=np.float64)
        self.cx = float((xs * counts).sum() / total) if total else (G - 1) / 2
        occupied = np.flatnonzero(counts)
        self.width = float(occupied[-1] - occupied[0] + 1) if occupied.size else float(G)
        self.margin = max(1.0, 0.04 * self.width)

    def side(self, st: dict[str, np.ndarray], ax: int, idx: int) -> str:
        if ax == 0:  # a sagittal slice lies at one x
            d = idx - self.cx
            return "midline" if abs(d) <= self.margin else ("right" if d > 0 else "left")
        x0, x1, cx = float(st["x0"][idx]), float(st["x1"][idx]), float(st["cx"][idx])
        if x0 < self.cx - self.margin and x1 > self.cx + self.margin:  # crosses the midline
            return "midline" if (x1 - x0 + 1) < 0.3 * self.width else "bilateral"
        if abs(cx - self.cx) <= self.margin:
            return "midline"
        return "right" if cx > self.cx else "left"

    def region(self, name: str, st: dict[str, np.ndarray], ax: int, idx: int, body_px: float, voxel_mm: float) -> dict[str, Any]:
        area = float(st["area"][idx])
        return {
            "name": name,
            "area_mm2": round(area * voxel_mm * voxel_mm, 1),
            "fraction": round(min(1.0, area / body_px), 4),
            "side": self.side(st, ax, idx),
            "peak": round(float(st["peak"][idx]), 3),
        }
