"""Siemens mosaics: one 2D image tiling all slices of a volume (ImageType ... MOSAIC).

The number of slices is in (0019,100A) NumberOfImagesInMosaic or the CSA image header; tiles
fill a ceil(sqrt(n)) square grid row by row. ImagePositionPatient of a mosaic is the corner of
the whole tiled image, not of the first slice: the standard correction (as dcm2niix and nibabel
apply it) moves it by half the difference between mosaic and tile size along rows and columns.
Slices follow the CSA SliceNormalVector (else row x column cosine), SpacingBetweenSlices apart.
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset

from curation.dicom.header import SIEMENS_CSA_IMAGE, SIEMENS_MOSAIC_N, Geometry, floats, private_floats


def _csa(ds: Dataset) -> dict:
    """The Siemens CSA image header as {name: {"items": [...]}} ({} when absent or unreadable)."""
    elem = ds.get(SIEMENS_CSA_IMAGE)
    if elem is None or not isinstance(elem.value, bytes):
        return {}
    try:
        from nibabel.nicom import csareader

        return csareader.read(elem.value).get("tags", {})
    except Exception:  # a damaged CSA header is treated as absent
        return {}


def _csa_values(csa: dict, name: str) -> list:
    items = (csa.get(name) or {}).get("items") or []
    return list(items)


def mosaic_images(ds: Dataset) -> int:
    """Slices in a Siemens mosaic (0 when ``ds`` is not one)."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" not in image_type or int(ds.get("NumberOfFrames") or 1) > 1:
        return 0
    n = private_floats(ds, SIEMENS_MOSAIC_N, 1, "<u2")
    if n is None:
        values = _csa_values(_csa(ds), "NumberOfImagesInMosaic")
        n = [float(values[0])] if values else None
    count = int(n[0]) if n and n[0] >= 1 else 0
    grid = math.ceil(math.sqrt(count)) if count else 0
    if not grid or int(ds.Rows) % grid or int(ds.Columns) % grid:
        return 0
    return count


def slice_normal(ds: Dataset, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """The direction slices of a mosaic step in: the CSA SliceNormalVector, else row x column."""
    normal = np.cross(row, col)
    values = _csa_values(_csa(ds), "SliceNormalVector")
    csa = floats(values, 3) if len(values) == 3 else None
    if csa is not None and np.linalg.norm(csa) > 0.5:
        csa = csa / np.linalg.norm(csa)
        # the CSA normal only decides the sign: rounding in it must not tilt the stack
        return normal if float(csa @ normal) >= 0 else -normal
    return normal


def mosaic_frames(ds: Dataset, geometry: Geometry, n: int) -> list[Geometry]:
    """Geometry of each slice of a mosaic whose whole-image geometry is ``geometry``."""
    grid = math.ceil(math.sqrt(n))
    rows, cols = int(ds.Rows) // grid, int(ds.Columns) // grid
    if geometry.position is None or geometry.orientation is None or geometry.spacing is None:
        return [geometry._replace(frame=k, rows=rows, cols=cols, position=None) for k in range(n)]
    row = geometry.orientation[:3] / np.linalg.norm(geometry.orientation[:3])
    col = geometry.orientation[3:] / np.linalg.norm(geometry.orientation[3:])
    spacing = geometry.spacing  # (between rows, between columns)
    corner = (geometry.position + col * spacing[0] * (int(ds.Rows) - rows) / 2
              + row * spacing[1] * (int(ds.Columns) - cols) / 2)
    gap = 0.0
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            gap = float(ds.get(keyword) or 0)
        except (TypeError, ValueError):
            gap = 0.0
        if gap > 0:
            break
    normal = slice_normal(ds, row, col) * (gap if gap > 0 else 1.0)
    return [geometry._replace(frame=k, rows=rows, cols=cols, position=corner + k * normal,
                              order_hint=(geometry.order_hint[0], k)) for k in range(n)]


def unpack(pixels: np.ndarray, n: int) -> np.ndarray:
    """(rows, cols) mosaic -> (n, rows / grid, cols / grid) slices, tiles read row by row."""
    grid = math.ceil(math.sqrt(n))
    rows, cols = pixels.shape[0] // grid, pixels.shape[1] // grid
    tiles = pixels.reshape(grid, rows, grid, cols).transpose(0, 2, 1, 3).reshape(grid * grid, rows, cols)
    return tiles[:n]

