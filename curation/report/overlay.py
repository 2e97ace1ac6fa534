"""Label contours over slice thumbnails: inline SVG outlines drawn from the label volume.

The slice PNGs show the whole cube cross-section in radiological orientation (see
``curation.slicing.render``); the label volume lives on the same grid^3 cube, so a slice's label
plane, flipped the same way, lines up with the PNG exactly. Each class becomes one SVG path of
pixel-edge segments (``viewBox`` = the grid), laid over the ``<img>`` and scaled with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from curation.report.common import esc
from curation.store.manifest import PLANE_AXIS
from curation.store.volume_store import load_npy

COLORS = ("#ff5252", "#ffd740", "#69f0ae", "#40c4ff", "#e040fb", "#ffab40", "#b2ff59", "#18ffff", "#ff80ab", "#eeff41")


def class_color(rank: int) -> str:
    return COLORS[rank % len(COLORS)]


def load_label(workdir: Path, vol: dict[str, Any]) -> np.ndarray | None:
    """The volume's label array on the cube grid, or None (no label map, or unreadable)."""
    rel = vol.get("label_volume_path")
    if not isinstance(rel, str) or not rel:
        return None
    try:
        return load_npy(Path(workdir) / rel)
    except Exception:  # a missing/damaged label only costs the outlines
        return None


def label_image(label: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The label plane as the PNG shows it: rows top to bottom, columns left to right."""
    sl = np.take(label, int(index), axis=PLANE_AXIS[plane])
    return np.ascontiguousarray(sl[::-1, ::-1].T)


def _runs(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, start, end) of the runs of True along each row of ``edges``."""
    n_rows, n_cols = edges.shape
    flat = np.concatenate([edges, np.zeros((n_rows, 1), bool)], axis=1).ravel().astype(np.int8)
    d = np.diff(np.concatenate([[0], flat]))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return starts // (n_cols + 1), starts % (n_cols + 1), ends % (n_cols + 1)


def outline_path(mask: np.ndarray) -> str:
    """SVG path data of the pixel-edge outline of ``mask`` (rows = y, columns = x)."""
    p = np.pad(mask.astype(bool), 1)
    horizontal = p[1:, 1:-1] != p[:-1, 1:-1]  # (H+1, W): edge at y = r between rows r-1 and r
    vertical = p[1:-1, 1:] != p[1:-1, :-1]  # (H, W+1): edge at x = c between columns c-1 and c
    out = []
    for y, x0, x1 in zip(*_runs(horizontal)):
        out.append(f"M{x0} {y}H{x1}")
    for x, y0, y1 in zip(*_runs(vertical.T)):
        out.append(f"M{x} {y0}V{y1}")
    return "".join(out)


def contour_svg(label: np.ndarray, plane: str, index: int, classes: dict[int, tuple[str, str]]) -> str:
    """An ``<svg>`` of the outlines of every class in the slice (``classes``: value -> (name,
    colour)); "" when the slice holds none."""
    img = label_image(label, plane, index)
    g = img.shape[0]
    paths = []
    for value in np.unique(img):
        value = int(value)
        if value == 0 or value not in classes:
            continue
        name, color = classes[value]
        d = outline_path(img == value)
        paths.append(f'<path d="{d}" stroke="{color}" stroke-width="1.5" fill="none" '
                     f'vector-effect="non-scaling-stroke"><title>{esc(name)}</title></path>')
    if not paths:
        return ""
    return (f'<svg viewBox="0 0 {img.shape[1]} {g}" preserveAspectRatio="none" '
            f'role="img" aria-label="label outlines">' + "".join(paths) + "</svg>")


def label_classes(label: np.ndarray, names: dict[str, str]) -> dict[int, tuple[str, str]]:
    """value -> (name, colour) for every non-zero value of the label volume."""
    if label.dtype.kind == "u" and label.dtype.itemsize <= 2:
        values = [int(v) for v in np.flatnonzero(np.bincount(np.asarray(label).ravel())) if v != 0]
    else:
        values = [int(v) for v in np.unique(label) if v != 0]
    return {v: (names.get(str(v), f"label_{v}"), class_color(i)) for i, v in enumerate(values)}
