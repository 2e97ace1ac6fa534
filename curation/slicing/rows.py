"""The slice rows of one preprocessed volume: which slices count, and what they show.

A slice along a plane is indexed when enough of it is body (``body_mask``: the patient without
air, the CT table or background noise); its row carries position, that body fraction as
``foreground_fraction``, intensity statistics and the label classes it contains.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from curation.slicing.body_mask import body_mask
from curation.store.manifest import PLANE_AXIS, PLANES, RANK_COLUMNS, SLICES_SCHEMA

# Bump when the rule deciding which slices exist changes (a slice-step fingerprint can include it).
ROWS_VERSION = 2

# The slices manifest's columns that `curate slice` fills (the rest are `curate rank`'s).
ROWS_COLUMNS = [f.name for f in SLICES_SCHEMA if f.name not in RANK_COLUMNS]


def slice_rows(
    volume_id: str,
    vol: np.ndarray,
    label: np.ndarray | None,
    label_names: dict[str, str],
    level: float,
    min_foreground: float,
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
    present: dict[int, dict[int, np.ndarray]] = {}
    values: list[int] = []
    if label is not None:
        if label.dtype.kind == "u" and label.dtype.itemsize <= 2:  # counting is faster than sorting
            values = [int(v) for v in np.flatnonzero(np.bincount(label.ravel())) if v != 0]
        else:
            values = [int(v) for v in np.unique(label) if v != 0]
        for v in values:
            m = label == v
            present[v] = {ax: m.any(axis=tuple(a for a in range(3) if a != ax)) for ax in range(3)}
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
            labels = [label_names.get(str(v), f"label_{v}") for v in values if present[v][ax][idx]]
            rows.append(
                {
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
            )
    return rows
