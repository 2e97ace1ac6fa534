"""Deterministic slice PNGs from a volume's display volume (radiological convention).

A slice is addressed by (plane, index on the grid^3 cube). The PNG shows the whole cube
cross-section (the same field of view as the training slice) at ``size`` px, rendered from
the display volume (kept at the source's own spacing per axis: the one plane a PNG needs is
interpolated when it is rendered). Radiological convention: patient right on image left;
anterior up on axial; superior up on coronal and sagittal; anterior on the left on sagittal.
"""

from __future__ import annotations

import hashlib
import io
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from PIL import Image

from curation.store.fsutil import atomic_write_bytes
from curation.store.layout import Workdir
from curation.store.manifest import PLANE_AXIS
from curation.store.volume_store import StoreError, load_display

if TYPE_CHECKING:
    import pandas as pd


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


def _legacy_canvas(display: np.ndarray, volume: Mapping[str, Any], plane: str, index: int) -> np.ndarray:
    """Volumes sliced before the display volume became lazy (a 1 mm display placed by an integer
    ``display_offset``): their PNGs stay byte-identical, so cached captions stay valid."""
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
    return np.ascontiguousarray(canvas[::-1, ::-1].T)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def _plane_at(display: np.ndarray, ax: int, t: float) -> np.ndarray | None:
    """The display plane at continuous voxel index ``t`` along ``ax`` (linear between the two
    nearest planes); None outside the display box."""
    n = display.shape[ax]
    if not -0.5 <= t <= n - 0.5:
        return None
    t = min(max(t, 0.0), n - 1.0)
    i0 = int(np.floor(t))
    w = t - i0
    a = np.take(display, i0, axis=ax)
    if w < 1e-9 or i0 + 1 >= n:
        return a
    b = np.take(display, i0 + 1, axis=ax)
    return np.rint(a * (1.0 - w) + b * w).astype(np.uint8)


def _paste(canvas: np.ndarray, sl: np.ndarray, start: tuple[int, int]) -> None:
    """Copy ``sl`` into ``canvas`` at ``start`` (which may lie outside), clipped to the canvas."""
    src, dst = [], []
    for k, n, m in zip(start, sl.shape, canvas.shape):
        lo, hi = max(k, 0), min(k + n, m)
        if hi <= lo:
            return
        dst.append(slice(lo, hi))
        src.append(slice(lo - k, hi - k))
    canvas[tuple(dst)] = sl[tuple(src)]


def slice_pixels(display: np.ndarray, volume: Mapping[str, Any], plane: str, index: int, size: int = 512) -> np.ndarray:
    """The ``size`` x ``size`` uint8 image of grid slice ``index``: the whole cube cross-section
    (the training slice's field of view) in radiological orientation.

    The display volume keeps its own spacing per axis (5 mm CT slices stay 5 mm): the plane is
    interpolated along its axis, placed in the cube by its mm origin, and resampled in-plane once
    (antialiased bilinear, sub-pixel exact) by PIL.
    """
    if not _present(volume.get("display_origin_mm")):
        img = Image.fromarray(_legacy_canvas(display, volume, plane, index), mode="L")
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    G = int(volume["grid_size"])
    L = float(volume["cube_mm"])
    spacing = [float(v) for v in volume["display_spacing"]]
    origin = [float(v) for v in volume["display_origin_mm"]]
    ax = PLANE_AXIS[plane]
    u, v = (a for a in range(3) if a != ax)
    # canvas pixels of display size; one pixel of margin before the cube's edge and after it
    shape = [int(np.ceil(L / spacing[a])) + 2 for a in (u, v)]
    start = [int(np.floor(origin[a] / spacing[a])) + 1 for a in (u, v)]
    edge0 = [k - origin[a] / spacing[a] for k, a in zip(start, (u, v))]  # the cube's 0 mm, in canvas px
    edge1 = [e + L / spacing[a] for e, a in zip(edge0, (u, v))]
    canvas = np.zeros(shape, dtype=np.uint8)
    sl = _plane_at(display, ax, ((index + 0.5) * L / G - origin[ax]) / spacing[ax] - 0.5)
    if sl is not None:
        _paste(canvas, sl, (start[0], start[1]))
    # RAS array axes increase toward R, A, S: flip both in-plane axes, rows become the second.
    img = Image.fromarray(np.ascontiguousarray(canvas[::-1, ::-1].T), mode="L")
    box = (shape[0] - edge1[0], shape[1] - edge1[1], shape[0] - edge0[0], shape[1] - edge0[1])
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box))


def render_png(display: np.ndarray, volume: Mapping[str, Any], plane: str, index: int, size: int = 512) -> bytes:
    img = Image.fromarray(slice_pixels(display, volume, plane, index, size), mode="L")
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
    import pandas as pd

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
