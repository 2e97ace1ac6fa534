"""Deterministic slice PNGs from a volume's display volume (radiological convention).

A slice is addressed by (plane, index on the grid^3 cube). The PNG shows the whole cube
cross-section (the same field of view as the training slice) at ``size`` px, rendered from
the 1 mm display volume. Radiological convention: patient right on image left; anterior up
on axial; superior up on coronal and sagittal; anterior on the left on sagittal.
"""

from __future__ import annotations

import hashlib
import io
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from PIL import Image

from .fsutil import atomic_write_bytes
from .layout import Workdir
from .manifest import PLANE_AXIS
from .volume_store import StoreError, load_display


@lru_cache(maxsize=4)
def _display_cached(path: str, mtime_ns: int) -> np.ndarray:
    return load_display(path)


def display_volume(workdir: Path, volume: Mapping[str, Any]) -> np.ndarray:
    """The volume's display array; StoreError (one line naming the file) when missing or damaged."""
    path = Path(workdir) / str(volume["display_path"])
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        raise StoreError(f"{path}: display volume is missing (rerun `curate slice` to redo it)") from None
    return _display_cached(str(path), mtime)


def slice_canvas(display: np.ndarray, volume: Mapping[str, Any], plane: str, index: int) -> np.ndarray:
    """The display-volume cross-section at grid ``index``, padded to the cube, in image orientation."""
    G = int(volume["grid_size"])
    L = float(volume["cube_mm"])
    spacing = [float(v) for v in volume["display_spacing"]]
    offset = [int(v) for v in volume["display_offset"]]
    canvas_n = [max(1, int(round(L / s))) for s in spacing]
    ax = PLANE_AXIS[plane]
    u, v = (a for a in range(3) if a != ax)
    c = int(np.floor((index + 0.5) * canvas_n[ax] / G))
    d = c - offset[ax]
    canvas = np.zeros((canvas_n[u], canvas_n[v]), dtype=np.uint8)
    if 0 <= d < display.shape[ax]:
        sl = np.take(display, d, axis=ax)
        ou, ov = offset[u], offset[v]
        nu = min(sl.shape[0], canvas_n[u] - ou)
        nv = min(sl.shape[1], canvas_n[v] - ov)
        canvas[ou : ou + nu, ov : ov + nv] = sl[:nu, :nv]
    # RAS array axes increase toward R, A, S: flip both in-plane axes, rows become the second.
    return np.ascontiguousarray(canvas[::-1, ::-1].T)


def render_png(display: np.ndarray, volume: Mapping[str, Any], plane: str, index: int, size: int = 512) -> bytes:
    img = Image.fromarray(slice_canvas(display, volume, plane, index), mode="L")
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def render_slice(workdir: Path, volume: Mapping[str, Any], plane: str, index: int, size: int = 512) -> tuple[str, str]:
    """Render (or reuse) one slice PNG; returns (path relative to workdir, sha256 of the PNG)."""
    workdir = Path(workdir)
    rel = Workdir.png_relpath(volume["volume_id"], plane, index, size)
    path = workdir / rel
    if path.exists():
        return rel, hashlib.sha256(path.read_bytes()).hexdigest()
    data = render_png(display_volume(workdir, volume), volume, plane, index, size)
    atomic_write_bytes(path, data)
    return rel, hashlib.sha256(data).hexdigest()


def render_volume_slices(workdir: Path, volume: Mapping[str, Any], rows: pd.DataFrame, size: int = 512) -> pd.DataFrame:
    """Render every row of one volume; fills image_path / image_sha256 in place and returns rows."""
    paths, shas = [], []
    for plane, index in zip(rows["plane"], rows["index"]):
        rel, sha = render_slice(workdir, volume, plane, int(index), size)
        paths.append(rel)
        shas.append(sha)
    rows["image_path"] = paths
    rows["image_sha256"] = shas
    return rows


def render_slices(workdir: Path, slices: pd.DataFrame, volumes: pd.DataFrame, size: int = 512) -> pd.DataFrame:
    """Render the given slice rows (grouped per volume so each display volume loads once)."""
    vol_by_id = {r["volume_id"]: r for r in volumes.to_dict("records")}
    out = slices.copy()
    out["image_path"] = out.get("image_path", pd.Series([None] * len(out), index=out.index)).astype(object)
    out["image_sha256"] = out.get("image_sha256", pd.Series([None] * len(out), index=out.index)).astype(object)
    for vid, group in out.groupby("volume_id", sort=True):
        vol = vol_by_id[vid]
        for i, plane, index in zip(group.index, group["plane"], group["index"]):
            rel, sha = render_slice(workdir, vol, plane, int(index), size)
            out.at[i, "image_path"] = rel
            out.at[i, "image_sha256"] = sha
    return out
