"""DICOM series: find them in a folder tree (headers only) and load one as a LoadedVolume.

Geometry comes from ImageOrientationPatient / ImagePositionPatient only (never InstanceNumber),
so prone, decubitus, feet-first, oblique and tilted-gantry acquisitions need no special cases.
Discovery and splitting live in `curation.dicom.discover` / `curation.dicom.parts`, header
reading in `curation.dicom.header`, Siemens mosaics in `curation.dicom.mosaic`. Nothing here
logs or returns patient identifiers; error lines name the series by number and description,
which the caller scrubs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian

from curation.dicom.discover import find_series
from curation.dicom.header import (
    Geometry,
    Skip,
    frame_geometry,
    lookup,
    n_frames,
    quiet,
    read_dataset,
    reason,
    text,
    to_int,
)
from curation.dicom.mosaic import mosaic_frames, mosaic_images, unpack
from curation.dicom.parts import ORIENTATION_ATOL, SAME_POSITION_MM
from curation.dicom.scan import Fallback, NotImage, Pixels, lite, scan
from curation.dicom.series import DicomSeries, SeriesList, series_key
from curation.imageio.volume_io import LoadedVolume, VolumeError

__all__ = ["DicomSeries", "SeriesList", "find_series", "load_series", "series_key"]
GAP_TOLERANCE = 0.10  # slice gaps may differ from the median gap by at most 10%
FAST = True  # plain native files are read without pydicom (tests compare both ways)


@quiet
def load_series(series: DicomSeries, require_geometry: bool = False) -> LoadedVolume:
    """Read all pixels of a series (or part) into a float32 (i, j, k) volume with a voxel -> RAS affine.

    i runs along DICOM columns, j along rows, k along the slice normal (row x column cosine),
    sorted by ImagePositionPatient. Rescale slope/intercept is applied per slice; Siemens
    mosaics are cut into their slices. The k column of the affine is the mean step between
    the first and last slice, so tilted-gantry series get a sheared affine. Raises VolumeError,
    one line starting with the series' name (number, description, part) and naming the file
    or folder, for: a single 2D image, color images, mixed sizes/orientations/pixel spacings,
    slices sharing a position with different pixels (identical duplicates are dropped), gaps
    between slices that differ from the median gap by more than 10% (missing slices),
    positions off a straight line, and compressed pixel data without an installed decoder. A
    multi-frame object without any orientation/position is loaded as axial LPS with
    meta["geometry"] == "assumed" if it is CT or MR and not ``require_geometry``.
    """
    try:
        try:
            return _load(series, require_geometry, FAST)
        except Fallback:  # a header the scan does not cover: pydicom reads every file
            return _load(series, require_geometry, False)
    except VolumeError as exc:
        raise VolumeError(f"{series.name()}: {exc}") from None


def _open(path: Path, fast: bool) -> tuple[Any, Pixels | None]:
    """The dataset of ``path`` and, when its pixels are plain native samples that are all there
    (explicit VR little endian, one sample, 8/16/32 bits), where they are: those are read
    straight into an array; anything else goes through pydicom."""
    if fast:
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                scanned = scan(fh, size)
        except (NotImage, OSError):
            scanned = None
        if scanned is not None and scanned.pixels is not None and scanned.pixels.length is not None:
            ds = lite(scanned)
            if (_native(ds) and scanned.pixels.offset + scanned.pixels.length <= size
                    and scanned.pixels.length >= _frame_bytes(ds) * n_frames(ds)):
                return ds, scanned.pixels
    try:
        return read_dataset(path), None
    except Skip as why:
        raise VolumeError(f"{path}: {why}") from None


def _native(ds: Any) -> bool:
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    return (syntax == ExplicitVRLittleEndian and to_int(ds.get("SamplesPerPixel"), 1) == 1
            and text(ds, "PhotometricInterpretation").upper() in ("MONOCHROME1", "MONOCHROME2")
            and to_int(ds.get("BitsAllocated"), 0) in (8, 16, 32)
            and 1 <= to_int(ds.get("BitsStored"), 0) <= to_int(ds.get("BitsAllocated"), 0)
            and to_int(ds.get("PixelRepresentation"), -1) in (0, 1))


def _frame_bytes(ds: Any) -> int:
    return int(ds.Rows) * int(ds.Columns) * to_int(ds.get("BitsAllocated"), 0) // 8


def _native_pixels(path: Path, ds: Any, where: Pixels) -> np.ndarray:
    """The samples of a `_native` file as pydicom's ``pixel_array`` gives them (unused high bits
    cleared, or sign-extended for signed data)."""
    allocated, stored = to_int(ds.get("BitsAllocated"), 0), to_int(ds.get("BitsStored"), 0)
    dtype = np.dtype(f"<{'i' if to_int(ds.get('PixelRepresentation'), 0) else 'u'}{allocated // 8}")
    count = _frame_bytes(ds) * n_frames(ds) // dtype.itemsize
    with open(path, "rb") as fh:
        fh.seek(where.offset)
        arr = np.fromfile(fh, dtype=dtype, count=count)
    if arr.size != count:
        raise VolumeError(f"{path}: cannot decode pixel data (file ends inside it)")
    if stored < allocated:
        shift = allocated - stored
        arr = (arr << shift) >> shift
    rows, cols = int(ds.Rows), int(ds.Columns)
    return arr.reshape(rows, cols) if n_frames(ds) == 1 else arr.reshape(-1, rows, cols)


def _load(series: DicomSeries, require_geometry: bool, fast: bool) -> LoadedVolume:
    if not series.files:
        raise VolumeError(f"{series.series_key}: empty series (no files)")
    folder = series.folder
    where = series.files[0] if len(series.files) == 1 else folder
    opened = [_open(path, fast) for path in series.files]
    datasets, locations = [ds for ds, _ in opened], [at for _, at in opened]
    for path, ds in zip(series.files, datasets):
        _check_pixel_format(path, ds)
    frames: list[Geometry] = []
    mosaics = [mosaic_images(ds) for ds in datasets]
    for n, (path, ds) in enumerate(zip(series.files, datasets)):
        chosen = series.frames[n] if series.frames is not None else None
        try:
            found = frame_geometry(ds, n, chosen)
            frames += mosaic_frames(ds, found[0], mosaics[n]) if mosaics[n] else found
        except Exception as exc:  # malformed values surface only when converted
            raise VolumeError(f"{path}: bad geometry tags ({reason(exc)})") from None
    if len(frames) < 2:
        raise VolumeError(f"{where}: single 2D image, not a volume")
    sizes = sorted({(fr.rows, fr.cols) for fr in frames})
    if len(sizes) > 1:
        raise VolumeError(f"{folder}: mixed image sizes in one series {sizes}")
    has_geometry = [fr.position is not None and fr.orientation is not None for fr in frames]
    if any(has_geometry) and not all(has_geometry):
        raise VolumeError(f"{where}: some slices lack ImagePositionPatient/ImageOrientationPatient")
    if all(has_geometry):
        order, positions, normal = _sort_by_position(frames, folder)
    elif require_geometry or text(datasets[0], "Modality") not in ("CT", "MR"):
        # without geometry only CT/MR multi-frames are trusted to be volumes (not cine loops)
        raise VolumeError(f"{where}: no ImageOrientationPatient/ImagePositionPatient")
    else:
        order = sorted(range(len(frames)), key=lambda n: frames[n].order_hint)
        positions, normal = None, np.array([0.0, 0.0, 1.0])
    data = _read_pixels(series.files, datasets, frames, order, mosaics, locations)
    keep = _drop_duplicates(data, positions, folder) if positions is not None else None
    if keep is not None:
        data, positions = data[keep], positions[keep]
    n_dropped = 0 if keep is None else int((~keep).sum())
    first = frames[order[0]]
    spacing = first.spacing if first.spacing is not None else np.ones(2)
    if np.any(spacing <= 0):
        raise VolumeError(f"{where}: invalid PixelSpacing")
    if positions is not None:
        step, origin = _slice_step(positions, folder), positions[0]
        row, col = _cosines(first.orientation)
    else:
        step = np.array([0.0, 0.0, _assumed_slice_gap(datasets[0])])
        origin, row, col = np.zeros(3), np.array([1.0, 0, 0]), np.array([0.0, 1, 0])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * spacing[1], col * spacing[0]
    lps[:3, 2], lps[:3, 3] = step, origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    head = datasets[0]
    meta = {  # no patient identifiers here: meta reaches manifests
        "format": "dicom", "n_files": len(series.files), "n_frames": int(data.shape[0]),
        "series_key": series.series_key, "series_number": series.number, "part": series.part,
        "mosaic": bool(any(mosaics)),
        "manufacturer": text(head, "Manufacturer"), "sop_class": UID(text(head, "SOPClassUID")).name,
        "transfer_syntax": UID(str(head.file_meta.get("TransferSyntaxUID", "") or "")).name,
        "geometry": "dicom" if positions is not None else "assumed",
        "duplicates_dropped": n_dropped, "gantry_tilt_deg": _tilt_degrees(step, normal),
    }
    modality = text(head, "Modality") or None
    # (k, row, col) C-order -> (i=col, j=row, k) as a free transposed view.
    return LoadedVolume(data=data.transpose(2, 1, 0), affine=affine, modality=modality, meta=meta)


def _check_pixel_format(path: Path, ds: Dataset) -> None:
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    samples = to_int(ds.get("SamplesPerPixel"), 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise VolumeError(f"{path}: color image ({photometric or f'{samples} samples'}), not a CT/MR volume")
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or ""))
    if not syntax or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise VolumeError(f"{path}: transfer syntax {syntax.name} ({syntax}) has no pydicom decoder") from None
    if not decoder.is_available:
        plugins = " or ".join(decoder.missing_dependencies)
        raise VolumeError(f"{path}: transfer syntax {syntax.name} ({syntax}) needs a pixel decoder plugin; "
                          f"install one of: {plugins}")


def _cosines(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])


def _sort_by_position(frames: list[Geometry], folder: Path) -> tuple[list[int], np.ndarray, np.ndarray]:
    reference = frames[0].orientation
    if any(not np.allclose(fr.orientation, reference, atol=ORIENTATION_ATOL) for fr in frames):
        raise VolumeError(f"{folder}: mixed image orientations in one series")
    spacings = [fr.spacing for fr in frames if fr.spacing is not None]
    if spacings and any(not np.allclose(s, spacings[0], rtol=1e-3) for s in spacings):
        raise VolumeError(f"{folder}: mixed pixel spacings in one series")
    if np.linalg.norm(reference[:3]) < 0.5 or np.linalg.norm(reference[3:]) < 0.5:
        raise VolumeError(f"{folder}: invalid ImageOrientationPatient")
    normal = np.cross(*_cosines(reference))
    positions = np.array([fr.position for fr in frames])
    order = list(np.argsort(positions @ normal, kind="stable"))
    return order, positions[order], normal


def _read_pixels(files: list[Path], datasets: list[Any], frames: list[Geometry],
                 order: list[int], mosaics: list[int], locations: list[Pixels | None]) -> np.ndarray:
    """Decode every file once, rescale each chosen frame, and place it at its sorted slot."""
    slot = {(frames[n].file, frames[n].frame): m for m, n in enumerate(order)}
    data = np.empty((len(frames), frames[0].rows, frames[0].cols), dtype=np.float32)
    wanted: dict[int, list[Geometry]] = {}
    for fr in frames:
        wanted.setdefault(fr.file, []).append(fr)
    for n, (path, ds) in enumerate(zip(files, datasets)):
        try:
            pixels = ds.pixel_array if locations[n] is None else _native_pixels(path, ds, locations[n])
            pixels = unpack(pixels, mosaics[n]) if mosaics[n] else pixels.reshape(-1, int(ds.Rows), int(ds.Columns))
        except Exception as exc:
            raise VolumeError(f"{path}: cannot decode pixel data ({reason(exc)})") from None
        expected = mosaics[n] or n_frames(ds)
        if pixels.shape[0] != expected:
            raise VolumeError(f"{path}: pixel data holds {pixels.shape[0]} frames, header says {expected}")
        for fr in wanted.get(n, []):
            data[slot[(n, fr.frame)]] = pixels[fr.frame].astype(np.float64) * fr.slope + fr.intercept
        if locations[n] is None:
            del ds.PixelData  # free the raw bytes before decoding the next file
    return data


def _drop_duplicates(data: np.ndarray, positions: np.ndarray, folder: Path) -> np.ndarray | None:
    """Mask that keeps one of each run of identical slices at one position; None if no runs."""
    distance = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    same = distance < SAME_POSITION_MM
    if not same.any():
        return None
    keep = np.ones(len(data), dtype=bool)
    for m in np.flatnonzero(same):
        if not np.array_equal(data[m], data[m + 1]):
            raise VolumeError(f"{folder}: {int(same.sum()) + 1}+ slices share a position with different "
                              "pixels (multi-phase, multi-echo or repeated acquisition in one series)")
        keep[m + 1] = False
    if keep.sum() < 2:
        raise VolumeError(f"{folder}: all slices share one position; single 2D image, not a volume")
    return keep


def _slice_step(positions: np.ndarray, folder: Path) -> np.ndarray:
    """Mean slice step (first to last); rejects uneven gaps and positions off a line."""
    n = len(positions)
    step = (positions[-1] - positions[0]) / (n - 1)
    gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    median = float(np.median(gaps))
    if np.max(np.abs(gaps - median)) > GAP_TOLERANCE * median:
        raise VolumeError(f"{folder}: non-uniform slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm); "
                          "missing slices?")
    off_line = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(n), step)), axis=1)
    if np.max(off_line) > GAP_TOLERANCE * np.linalg.norm(step):
        raise VolumeError(f"{folder}: slice positions do not lie on a straight line")
    return step


def _assumed_slice_gap(ds: Dataset) -> float:
    shared = ds.get("SharedFunctionalGroupsSequence")
    groups = [shared[0] if shared else None]
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = lookup(ds, groups, "PixelMeasuresSequence", keyword)
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            pass
    return 1.0


def _tilt_degrees(step: np.ndarray, normal: np.ndarray) -> float:
    cos = abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-12)
    return round(float(np.degrees(np.arccos(min(1.0, cos)))), 3)
