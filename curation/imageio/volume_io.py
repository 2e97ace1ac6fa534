"""Loading volumes into one in-memory form: an array plus its voxel-to-RAS affine."""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from curation.imageio.files import regular_fault, shown
from curation.imageio.limits import DEFAULT_MAX_VOXELS  # noqa: F401  (re-exported)
from curation.imageio.nib import nib
from curation.imageio.nifti_guard import header_fault

try:  # Intel ISA-L's inflate: a dependency where it has wheels (pyproject marker)
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - depends on the install
    import gzip as _gzip


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
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand data by more than ~1032x


def is_nifti_path(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith("._") and name.endswith(NIFTI_SUFFIXES) and not name.endswith(".hdr")


def companions(path: Path) -> list[Path]:
    """The files nibabel opens for ``path``: itself, and the other half of an .hdr/.img pair."""
    name = path.name
    low = name.lower()
    for a, b in ((".img", ".hdr"), (".hdr", ".img"), (".img.gz", ".hdr.gz"), (".hdr.gz", ".img.gz")):
        if low.endswith(a):
            stem = name[: -len(a)]
            return [path, *[path.with_name(stem + ext) for ext in {b, b.upper()} if (path.parent / (stem + ext)).exists()
                            or os.path.islink(path.parent / (stem + ext))]]
    return [path]


def check_files(path: Path, what: str = "image") -> None:
    """Before anything opens ``path`` (and its pair file): each must be a regular file (a FIFO
    would block the reader forever), and a NIfTI header must not make the reader inflate more
    than `MAX_HEADER_BYTES` before the voxels. VolumeError (one line naming the file) if not."""
    for f in companions(Path(path)):
        fault = regular_fault(f)
        if fault == "missing" and f != path:
            continue
        if fault:
            raise VolumeError(f"{shown(f)}: {what} file is {fault}")
    low = Path(path).name.lower()
    if low.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz")):
        header = Path(path)
        if low.endswith((".img", ".img.gz")):
            header = next((f for f in companions(header)[1:]), header)
        try:
            with (_gzip.open(header, "rb") if header.name.lower().endswith(".gz") else open(header, "rb")) as fh:
                fault = header_fault(fh)
        except (OSError, EOFError, ValueError):
            return  # not gzip / unreadable: nibabel's own error names the fault
        if fault:
            raise VolumeError(f"{shown(header)}: {fault}")


def _data_file(img: Any, path: Path) -> Path:
    """The file that holds the voxels (the .img of an Analyze/NIfTI pair, else ``path``)."""
    try:
        return Path(img.file_map["image"].filename or path)
    except (KeyError, AttributeError, TypeError):
        return path


def check_declared_size(img: Any, path: Path, max_voxels: int | None) -> None:
    """Compare the header's shape x dtype with the file size and ``max_voxels`` before any read.

    Raises VolumeError naming the file when the header asks for more voxels than allowed or
    for more bytes than the file can hold (a 1 KB file declaring 1200^3 float32).
    """
    shape = tuple(int(v) for v in img.shape)
    if any(v < 0 for v in shape):
        raise VolumeError(f"{path}: header declares a negative dimension {shape}")
    n = int(np.prod(shape, dtype=object)) if shape else 1
    if max_voxels is not None and n > max_voxels:
        raise VolumeError(f"{path}: header declares shape {shape} = {n:,} voxels, over --max-voxels {max_voxels:,}")
    dtype = np.dtype(img.get_data_dtype())
    need = n * dtype.itemsize
    header = getattr(img, "header", None)
    offset = int(header.get_data_offset()) if header is not None and hasattr(header, "get_data_offset") else 0
    data_file = _data_file(img, path)
    try:
        size = data_file.stat().st_size
    except OSError as exc:
        raise VolumeError(f"{data_file}: cannot read image ({type(exc).__name__}: {exc.strerror})") from None
    compressed = data_file.name.lower().endswith((".gz", ".mgz", ".bz2", ".zst"))
    if compressed:
        if need > (size + 1024) * MAX_DEFLATE_RATIO:
            raise VolumeError(f"{path}: header declares shape {shape} {dtype} ({need:,} bytes), "
                              f"more than a {size:,}-byte compressed file can hold")
    elif offset + need > size:
        raise VolumeError(f"{path}: header declares shape {shape} {dtype} ({need:,} bytes from offset {offset}), "
                          f"file holds {size:,} bytes (truncated?)")


def load_nifti(path: str | Path, mmap: bool = False, max_voxels: int | None = DEFAULT_MAX_VOXELS,
               label: bool = False) -> LoadedVolume:
    """Load a NIfTI/Analyze/MGH file; raise VolumeError naming the file on any failure.

    The header is checked first (`check_declared_size`), so a lying header costs no memory.
    ``label``: keep exact values (integers as stored, scaled values as float64).
    Library warnings (nibabel's ``pixdim[1,2,3] should be positive`` ...) are collected in
    ``meta["warnings"]`` instead of printed, for the caller to attribute to the file.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught, _nibabel_log() as logged:
        warnings.simplefilter("always")
        try:
            check_files(path, "label" if label else "image")
            img = nib.load(str(path), mmap=mmap)
            check_declared_size(img, path, max_voxels)
            affine = np.asarray(img.affine, dtype=np.float64)
            unscaled = img.dataobj.slope in (1.0, None) and img.dataobj.inter in (0.0, None)
            data = read_gz_voxels(img, path) if unscaled and not mmap else None
            if data is None:
                data = np.asarray(img.dataobj)
            if data.dtype.kind in "ui" and unscaled:
                pass  # integer data without scaling: keep the small dtype until preprocessing
            elif unscaled and data.dtype.kind == "f":
                data = data.astype(np.float64 if label else np.float32, copy=False)
            else:
                data = np.asarray(img.get_fdata(dtype=np.float64 if label else np.float32))
        except VolumeError:
            raise
        except MemoryError:
            raise VolumeError(f"{path}: out of memory reading the image (header shape {getattr(img, 'shape', '?')})") from None
        except Exception as exc:  # nibabel raises a zoo of types on malformed headers
            raise VolumeError(f"{path}: cannot read image ({type(exc).__name__}: {_one_line(exc)})") from None
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: degenerate affine (zero or non-finite voxel size)")
    notes = sorted({_one_line(w.message) for w in caught} | {_one_line(m) for m in logged})
    return LoadedVolume(data=data, affine=affine, modality=None, meta={"format": "nifti", "warnings": notes})


def read_gz_voxels(img: Any, path: Path) -> np.ndarray | None:
    """The stored voxels of a single-file ``.nii.gz``, inflated straight into the array (by
    ``isal`` where installed: about twice as fast as the standard library, as nibabel uses it);
    None for other files. Raises EOFError when the file ends before the declared data does."""
    if not path.name.lower().endswith(".nii.gz") or not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return None
    proxy = img.dataobj  # where nibabel itself would read: offset, dtype, shape, order
    order = getattr(proxy, "order", "F")
    out = np.empty(proxy.shape, dtype=proxy.dtype, order=order)
    flat = memoryview(out.reshape(-1, order=order)).cast("B")
    with _gzip.open(path, "rb") as fh:
        fh.seek(int(proxy.offset))
        got = 0
        while got < len(flat):
            n = fh.readinto(flat[got:])
            if not n:
                raise EOFError(f"the file ends after {got:,} of the {len(flat):,} data bytes its header declares")
            got += n
    return out


@contextmanager
def _nibabel_log() -> Iterator[list[str]]:
    """Collect what nibabel logs (``pixdim[1,2,3] should be positive`` ...) instead of printing
    it unattributed; the caller reports it against the file."""
    logger = logging.getLogger("nibabel.global")
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    saved, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [_Collect()], False
    try:
        yield messages
    finally:
        logger.handlers, logger.propagate = saved, propagate


def _one_line(exc: BaseException | Warning | str) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
