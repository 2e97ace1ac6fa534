"""Loading volumes into one in-memory form: an array plus its voxel-to-RAS affine."""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


class VolumeError(Exception):
    """Bad input: the message is one line that names the offending file."""


@dataclass
class LoadedVolume:
    """A 3D (or 4D: x, y, z, channel) array with its voxel -> RAS+ mm affine.

    ``data`` is indexed (i, j, k[, c]); ``affine`` maps (i, j, k, 1) to RAS+ millimetres.
    ``modality`` is "CT", "MR", ... when the file says so, else None.
    """

    data: np.ndarray
    affine: np.ndarray
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".mgz", ".mgh")


def is_nifti_path(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith("._") and name.endswith(NIFTI_SUFFIXES) and not name.endswith(".hdr")


def load_nifti(path: str | Path, mmap: bool = False) -> LoadedVolume:
    """Load a NIfTI/Analyze/MGH file; raise VolumeError naming the file on any failure."""
    path = Path(path)
    try:
        img = nib.load(str(path), mmap=mmap)
        affine = np.asarray(img.affine, dtype=np.float64)
        data = np.asarray(img.dataobj)
        if data.dtype.kind in "ui" and img.dataobj.slope in (1.0, None) and img.dataobj.inter in (0.0, None):
            pass  # integer data without scaling: keep the small dtype until preprocessing
        else:
            data = np.asarray(img.get_fdata(dtype=np.float32))
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise VolumeError(f"{path}: cannot read image ({type(exc).__name__}: {_one_line(exc)})") from None
    except Exception as exc:  # nibabel raises a zoo of types on malformed headers
        raise VolumeError(f"{path}: cannot read image ({type(exc).__name__}: {_one_line(exc)})") from None
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: degenerate affine (zero or non-finite voxel size)")
    return LoadedVolume(data=data, affine=affine, modality=None, meta={"format": "nifti"})


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
