"""Label volumes kept exactly: validated against their image, in a wide enough integer type.

Every fault names the label file (never the image): a label of another shape or affine (beyond
`AFFINE_TOLERANCE_VOXELS`), NaN, negative or non-integer values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from curation.imageio.nib import nib
from curation.imageio.volume_io import LoadedVolume, VolumeError, check_files, load_nifti

AFFINE_TOLERANCE_VOXELS = 0.25  # label and image grids may disagree by at most this (corner shift)
INTEGER_TOLERANCE = 1e-3  # stored 2.0000001 is 2; 1.7 is not a class


def _squeeze(data: np.ndarray) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def header_shape(path: Path) -> tuple[int, ...]:
    """The label's shape from its header alone (no voxels read)."""
    check_files(path, "label")
    try:
        return tuple(int(v) for v in nib.load(str(path)).shape)
    except Exception as exc:  # nibabel raises many types on malformed headers
        raise VolumeError(f"{path}: cannot read label ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None


def load_label(path: Path, image: LoadedVolume, image_shape: tuple[int, ...], max_voxels: int | None) -> tuple[np.ndarray, list[str]]:
    """The label of ``image`` as the smallest unsigned integer array holding its values exactly,
    plus the library warnings its reading raised.

    Raises:
        VolumeError: naming ``path`` for any mismatch with the image or any non-class value.
    """
    shape = header_shape(path)
    squeezed = tuple(shape)
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) != 3:
        raise VolumeError(f"{path}: label must be 3D, got shape {shape}")
    if squeezed != tuple(image_shape[:3]):
        raise VolumeError(f"{path}: label shape {squeezed} does not match image shape {tuple(image_shape[:3])}")
    loaded = load_nifti(path, max_voxels=max_voxels, label=True)
    check_affine(path, loaded.affine, image.affine, image_shape)
    data = _squeeze(np.asarray(loaded.data))
    return exact_classes(path, data), list(loaded.meta.get("warnings", []))


def check_affine(path: Path, label_affine: np.ndarray, image_affine: np.ndarray, shape: tuple[int, ...]) -> None:
    """Label and image must put the grid corners at the same place (within a quarter voxel)."""
    n = np.asarray(shape[:3], dtype=np.float64) - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])])
    shift = np.linalg.norm((corners @ label_affine.T - corners @ image_affine.T)[:, :3], axis=1).max()
    voxel = float(np.linalg.norm(image_affine[:3, :3], axis=0).min())
    tolerance = AFFINE_TOLERANCE_VOXELS * voxel
    if not np.isfinite(shift) or shift > tolerance:
        raise VolumeError(f"{path}: label affine differs from the image's (grid corners up to {shift:.3g} mm apart, "
                          f"tolerance {tolerance:.3g} mm)")


def exact_classes(path: Path, data: np.ndarray) -> np.ndarray:
    """Integer class values in the smallest unsigned type that holds them all."""
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind in "ui":
        if data.size and data.min() < 0:
            raise VolumeError(f"{path}: label has negative values (min {int(data.min())})")
        top = int(data.max()) if data.size else 0
        return data.astype(np.min_scalar_type(top), copy=False)
    values = np.asarray(data, dtype=np.float64)
    if not np.isfinite(values).all():
        raise VolumeError(f"{path}: label has NaN or infinite values")
    rounded = np.rint(values)
    off = np.abs(values - rounded)
    if values.size and off.max() > INTEGER_TOLERANCE:
        bad = float(values.flat[int(np.argmax(off))])
        raise VolumeError(f"{path}: label has non-integer values (e.g. {bad:g}); labels must be class numbers")
    if values.size and rounded.min() < 0:
        raise VolumeError(f"{path}: label has negative values (min {rounded.min():g})")
    top = int(rounded.max()) if values.size else 0
    return rounded.astype(np.min_scalar_type(top))
