"""Resampling of 3D arrays for preprocessing: separable linear resize and oblique resampling.

`resize3d` maps voxel-edge boxes onto each other (align_corners=False semantics), as MONAI's
``Resized`` and torch's ``interpolate`` do: axes that shrink use a triangle filter as wide as the
scale (antialiased, as PIL and torch's ``antialias=True`` compute it), axes that grow use linear
interpolation; one interpolation per axis, float32.

It works in the array's memory order, so that a NIfTI array (Fortran order) or a reoriented
view (flips, transposes) is never copied into another layout first: the outermost axis in memory
is one sparse product, the other two are resized slice by slice (each slice contiguous). The
result is a view in the caller's axis order. NumPy/SciPy only: no torch in the slicing path (its
import alone costs seconds per process).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # SciPy loads where it resamples: `curate slice`'s main process needs none
    from scipy import sparse


@lru_cache(maxsize=64)
def axis_weights(n: int, m: int) -> sparse.csr_matrix:
    """(m, n) weights taking an axis of n voxels to m voxels (voxel edges aligned)."""
    from scipy import sparse

    scale = n / m
    if m > n:  # grow: linear between the two nearest source voxels
        src = np.maximum((np.arange(m) + 0.5) * scale - 0.5, 0.0)
        j0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
        j1 = np.minimum(j0 + 1, n - 1)
        lam = src - j0
        rows = np.concatenate([np.arange(m), np.arange(m)])
        cols = np.concatenate([j0, j1])
        vals = np.concatenate([1.0 - lam, lam]).astype(np.float32)
        return sparse.csr_matrix((vals, (rows, cols)), shape=(m, n))
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i in range(m):  # shrink: triangle filter as wide as the scale, normalised
        center = scale * (i + 0.5)
        j = np.arange(max(int(center - scale + 0.5), 0), min(int(center + scale + 0.5), n))
        w = np.clip(1.0 - np.abs((j - center + 0.5) / scale), 0.0, None)
        rows += [i] * len(j)
        cols += j.tolist()
        vals += (w / w.sum()).tolist()
    return sparse.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(m, n))


# Elements per block when an integer source meets the outer axis: it is made float a block of
# columns at a time (16 MB), never whole (a 512x512x500 CT would need a 500 MB float copy).
OUTER_BLOCK = 1 << 22


def _outer(c: np.ndarray, m: int) -> np.ndarray:
    """Resize axis 0 of a C-contiguous array: sparse products, no whole copy of the input."""
    n = c.shape[0]
    if n == m:
        return c
    w = axis_weights(n, m)
    flat = c.reshape(n, -1)
    if flat.dtype == np.float32:
        return np.asarray(w @ flat, dtype=np.float32).reshape(m, *c.shape[1:])
    out = np.empty((m, flat.shape[1]), dtype=np.float32)
    step = max(1024, OUTER_BLOCK // n)
    for j in range(0, flat.shape[1], step):
        out[:, j : j + step] = w @ flat[:, j : j + step].astype(np.float32)
    return out.reshape(m, *c.shape[1:])


def _inplane(c: np.ndarray, m1: int, m2: int) -> np.ndarray:
    """Resize axes 1 and 2 of a C-contiguous array, slice by slice (each slice contiguous)."""
    n1, n2 = c.shape[1:]
    if (n1, n2) == (m1, m2):
        return c
    w1 = axis_weights(n1, m1) if n1 != m1 else None
    w2 = axis_weights(n2, m2) if n2 != m2 else None
    out = np.empty((c.shape[0], m1, m2), dtype=np.float32)
    for k in range(c.shape[0]):
        s = c[k].astype(np.float32, copy=False)  # an integer source becomes float a slice at a time
        if w1 is not None:
            s = w1 @ s
        if w2 is not None:
            s = (w2 @ np.ascontiguousarray(s.T)).T
        out[k] = s
    return out


def resize3d(arr: np.ndarray, out_shape: tuple[int, int, int], order: int = 1) -> np.ndarray:
    """Resize a 3D array to ``out_shape`` (voxel-edge boxes coincide).

    ``order=1``: separable linear (antialiased on shrinking axes), float32 from any numeric
    type (an integer source is never copied whole to float); the outer axis is done first when
    it shrinks (less work for the others), last when it grows. The result may be
    a non-contiguous view (same axis order as ``arr``). ``order=0``: nearest neighbour (labels),
    exact for any integer type.
    """
    out_shape = tuple(int(v) for v in out_shape)
    if order == 0:
        if tuple(arr.shape) == out_shape:
            return arr
        idx = [np.minimum(((np.arange(m) + 0.5) * (n / m)).astype(np.int64), n - 1)
               for n, m in zip(arr.shape, out_shape)]
        return np.asarray(arr)[np.ix_(*idx)]
    # a view whose axes run outermost..innermost in memory, all strides positive
    flips = tuple(a for a in range(3) if arr.strides[a] < 0)
    view = np.flip(arr, flips) if flips else arr
    perm = sorted(range(3), key=lambda a: -abs(view.strides[a]))
    c = np.ascontiguousarray(view.transpose(perm))  # a copy only for an unusual layout
    m0, m1, m2 = (out_shape[a] for a in perm)
    if m0 < c.shape[0]:
        c = _inplane(_outer(c, m0), m1, m2)
    else:
        c = _outer(_inplane(c, m1, m2), m0)
    out = c.astype(np.float32, copy=False).transpose(np.argsort(perm))
    return np.flip(out, flips) if flips else out


def resample_oblique(
    data: np.ndarray, src_affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, ...], order: int, cval: float
) -> np.ndarray:
    """Resample ``data`` onto an ``out_shape`` grid with voxel->world ``out_affine``.

    Target voxels are pulled from source voxels through both affines in one interpolation
    (``order`` 1: linear, 0: nearest); points outside the source get ``cval``.
    """
    from scipy import ndimage

    mapping = np.linalg.inv(src_affine) @ out_affine
    return ndimage.affine_transform(
        data, mapping[:3, :3], offset=mapping[:3, 3], output_shape=out_shape, order=order, mode="constant", cval=cval
    )
