"""DICOM series: find them in a folder tree (headers only) and load one as a LoadedVolume.

Geometry comes from ImageOrientationPatient / ImagePositionPatient only (never InstanceNumber),
so prone, decubitus, feet-first, oblique and tilted-gantry acquisitions need no special cases.
Nothing here logs or returns patient identifiers; ``DicomSeries.patient_tokens`` exists so the
caller can scrub them from paths.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from curation.volume_io import LoadedVolume, VolumeError

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
GAP_TOLERANCE = 0.10  # slice gaps may differ from the median gap by at most 10%
SAME_POSITION_MM = 0.01  # slices closer than this along the normal share a position
# Single-frame series that interleave several volumes at the same positions.
STACK_KEYWORDS = ("EchoNumbers", "TemporalPositionIdentifier", "DiffusionBValue")
ORIENTATION_ATOL = 1e-3  # direction cosines that differ by less are the same orientation
DEFER_BYTES = 1024  # header reads seek past larger values (pixel data); read on first use


@dataclass
class DicomSeries:
    """One loadable stack of images: a SeriesInstanceUID, or one part of a split series.

    A series whose files disagree on image size or orientation (localizers, 3-plane scouts)
    is split into parts with ``part`` 1..``n_parts``; each part has its own ``series_key``.
    """

    files: list[Path]
    series_key: str
    modality: str | None = None
    description: str = ""
    n_frames: int = 0
    patient_tokens: list[str] = field(default_factory=list, repr=False)
    rows: int = 0
    cols: int = 0
    part: int = 1
    n_parts: int = 1

    @property
    def folder(self) -> Path:
        """The deepest folder holding all files (what error messages name)."""
        if not self.files:
            return Path(".")
        return Path(os.path.commonpath([str(p.parent) for p in self.files]))


class SeriesList(list):
    """``list[DicomSeries]`` plus ``skipped``: (path, one-line reason) for every file not used."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[tuple[Path, str]] = []


class _Header(NamedTuple):
    """What find_series keeps per file (not the dataset: trees can hold 10^5 files)."""

    path: Path
    series_uid: str
    size: tuple[int, int]
    orientation: np.ndarray | None
    modality: str | None
    description: str
    n_frames: int
    tokens: frozenset[str]
    stack: tuple[str, ...] = ()  # echo / temporal position / b-value: one volume each


class _Frame(NamedTuple):
    file: int
    frame: int
    rows: int
    cols: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    spacing: np.ndarray | None
    slope: float
    intercept: float
    order_hint: tuple[int, int]


class _Skip(Exception):
    """A file that is not a usable DICOM image; the message is the one-line reason."""


def _quiet(func: Callable) -> Callable:
    """Silence pydicom's per-value warnings: bad input is reported by our return values."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return func(*args, **kwargs)

    return wrapper


def series_key(uid: str) -> str:
    """A stable, non-identifying key for a SeriesInstanceUID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:20]


@_quiet
def find_series(root: str | Path) -> SeriesList:
    """Group the DICOM images under ``root`` into series, reading headers only.

    Non-DICOM files, DICOMDIRs, objects without pixel data (RTSTRUCT, SR, presentation
    states), unreadable files and duplicate SOP instances end up in ``result.skipped``.
    Files of one SeriesInstanceUID that differ in rows/columns or orientation are split
    into separate parts rather than rejected.
    """
    root = Path(root)
    if not root.exists():
        raise VolumeError(f"{root}: no such file or folder")
    paths = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    result = SeriesList()
    groups: dict[str, list[_Header]] = {}
    seen: set[str] = set()
    for path in paths:
        try:
            ds = _read_header(path)
        except _Skip as why:
            result.skipped.append((path, str(why)))
            continue
        sop = _text(ds, "SOPInstanceUID")
        if sop and sop in seen:
            result.skipped.append((path, "duplicate of another file (same SOPInstanceUID)"))
            continue
        try:
            header = _summarize(path, ds)
        except Exception as exc:  # malformed values surface only when converted
            result.skipped.append((path, f"bad header values ({_reason(exc)})"))
            continue
        seen.add(sop)
        groups.setdefault(header.series_uid, []).append(header)
    for uid, members in groups.items():
        parts = _split_by_geometry(members)
        for n, part in enumerate(parts, start=1):
            first = part[0]
            result.append(DicomSeries(
                files=[h.path for h in part], series_key=series_key(uid if len(parts) == 1 else f"{uid}#{n}"),
                modality=first.modality, description=first.description,
                n_frames=sum(h.n_frames for h in part),
                patient_tokens=sorted(frozenset().union(*(h.tokens for h in part))),
                rows=first.size[0], cols=first.size[1], part=n, n_parts=len(parts)))
    result.sort(key=lambda s: (str(s.files[0]), s.part))
    return result


@_quiet
def load_series(series: DicomSeries, require_geometry: bool = False) -> LoadedVolume:
    """Read all pixels of a series into a float32 (i, j, k) volume with a voxel -> RAS affine.

    i runs along DICOM columns, j along rows, k along the slice normal (row x column cosine),
    sorted by ImagePositionPatient. Rescale slope/intercept is applied per slice. The k column
    of the affine is the mean step between the first and last slice, so tilted-gantry series
    get a sheared affine. Raises VolumeError (one line naming the file or folder) for: a single
    2D image, color images, mixed sizes/orientations/pixel spacings, slices sharing a position
    with different pixels (identical duplicates are dropped), gaps between slices that differ
    from the median gap by more than 10% (missing slices), positions off a straight line, and
    compressed pixel data without an installed decoder. A multi-frame object without any
    orientation/position is loaded as axial LPS with meta["geometry"] == "assumed" if it is
    CT or MR and not ``require_geometry``.
    """
    if not series.files:
        raise VolumeError(f"{series.series_key}: empty series (no files)")
    folder = series.folder
    where = series.files[0] if len(series.files) == 1 else folder
    datasets = []
    for path in series.files:
        try:
            datasets.append(_read_header(path))
        except _Skip as why:
            raise VolumeError(f"{path}: {why}") from None
    for path, ds in zip(series.files, datasets):
        _check_pixel_format(path, ds)
    frames = []
    for n, (path, ds) in enumerate(zip(series.files, datasets)):
        try:
            frames += _frames(ds, n)
        except Exception as exc:  # malformed values surface only when converted
            raise VolumeError(f"{path}: bad geometry tags ({_reason(exc)})") from None
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
    elif require_geometry or _text(datasets[0], "Modality") not in ("CT", "MR"):
        # without geometry only CT/MR multi-frames are trusted to be volumes (not cine loops)
        raise VolumeError(f"{where}: no ImageOrientationPatient/ImagePositionPatient")
    else:
        order = sorted(range(len(frames)), key=lambda n: frames[n].order_hint)
        positions, normal = None, np.array([0.0, 0.0, 1.0])
    data = _read_pixels(series.files, datasets, frames, order)
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
        "series_key": series.series_key, "series_description": _text(head, "SeriesDescription"),
        "manufacturer": _text(head, "Manufacturer"), "sop_class": UID(_text(head, "SOPClassUID")).name,
        "transfer_syntax": UID(str(head.file_meta.get("TransferSyntaxUID", "") or "")).name,
        "geometry": "dicom" if positions is not None else "assumed",
        "duplicates_dropped": n_dropped, "gantry_tilt_deg": _tilt_degrees(step, normal),
    }
    modality = _text(head, "Modality") or None
    # (k, row, col) C-order -> (i=col, j=row, k) as a free transposed view.
    return LoadedVolume(data=data.transpose(2, 1, 0), affine=affine, modality=modality, meta=meta)


def _read_header(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_BYTES, force=False)
    except InvalidDicomError:
        raise _Skip("not a DICOM file") from None
    except Exception as exc:  # pydicom raises many types on corrupt files
        raise _Skip(f"unreadable DICOM ({_reason(exc)})") from None
    sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise _Skip("DICOMDIR index, not an image")
    if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
        kind = str(ds.get("Modality", "") or "") or UID(sop_class).name or "unknown object"
        hint = "; truncated file?" if "Image Storage" in UID(sop_class).name else ""
        raise _Skip(f"no pixel data ({kind}{hint})")
    return ds


def _reason(exc: BaseException) -> str:
    """Exception type and message on one line (pydicom's messages often span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _n_frames(ds: Dataset) -> int:
    return max(1, _int(ds.get("NumberOfFrames"), 1))


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _summarize(path: Path, ds: Dataset) -> _Header:
    tokens: set[str] = set()
    for text in (_text(ds, "PatientName"), _text(ds, "PatientID")):
        if text:  # the whole value and its name components, for scrubbing paths
            tokens.add(text)
            tokens.update(p.strip() for p in text.split("^") if len(p.strip()) >= 2)
    return _Header(
        path=path, series_uid=_text(ds, "SeriesInstanceUID") or f"no-series-uid:{path.parent}",
        size=(int(ds.Rows), int(ds.Columns)), orientation=_frames(ds, 0, first_only=True)[0].orientation,
        modality=_text(ds, "Modality") or None, description=_text(ds, "SeriesDescription"),
        n_frames=_n_frames(ds), tokens=frozenset(tokens),
        stack=tuple(_text(ds, k) for k in STACK_KEYWORDS))


def _split_by_geometry(members: list[_Header]) -> list[list[_Header]]:
    """Files of one series grouped by image size, orientation and stack (echo, temporal
    position, b-value: multi-echo, dynamic and diffusion series), in first-seen order."""
    parts: list[list[_Header]] = []
    for header in members:
        for part in parts:
            a, b = part[0].orientation, header.orientation
            same = (a is None and b is None) or (
                a is not None and b is not None and np.allclose(a, b, atol=ORIENTATION_ATOL))
            if same and part[0].size == header.size and part[0].stack == header.stack:
                part.append(header)
                break
        else:
            parts.append([header])
    return parts


def _lookup(ds: Dataset, groups: list[Dataset | None], sequence: str, keyword: str) -> Any:
    """A value from the per-frame group, else the shared group, else the top level."""
    for group in groups:
        if group is not None and sequence in group and len(group[sequence].value):
            item = group[sequence].value[0]
            if keyword in item and item[keyword].value not in (None, ""):
                return item[keyword].value
    value = ds.get(keyword)
    return None if value in (None, "") else value


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _frames(ds: Dataset, file_index: int, first_only: bool = False) -> list[_Frame]:
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    instance = _int(ds.get("InstanceNumber"), 0)
    out = []
    for f in range(1 if first_only else _n_frames(ds)):
        groups = [per_frame[f] if f < len(per_frame) else None, shared]
        pos = _lookup(ds, groups, "PlanePositionSequence", "ImagePositionPatient")
        iop = _lookup(ds, groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _lookup(ds, groups, "PixelMeasuresSequence", "PixelSpacing")
        slope = _lookup(ds, groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _lookup(ds, groups, "PixelValueTransformationSequence", "RescaleIntercept")
        out.append(_Frame(
            file=file_index, frame=f, rows=int(ds.Rows), cols=int(ds.Columns),
            position=None if pos is None else _floats(pos, 3),
            orientation=None if iop is None else _floats(iop, 6),
            spacing=None if spacing is None else _floats(spacing, 2),
            slope=1.0 if slope is None else float(slope),
            intercept=0.0 if intercept is None else float(intercept),
            order_hint=(instance, f)))
    return out


def _check_pixel_format(path: Path, ds: Dataset) -> None:
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    samples = _int(ds.get("SamplesPerPixel"), 1)
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


def _sort_by_position(frames: list[_Frame], folder: Path) -> tuple[list[int], np.ndarray, np.ndarray]:
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


def _read_pixels(files: list[Path], datasets: list[Dataset], frames: list[_Frame],
                 order: list[int]) -> np.ndarray:
    """Decode every file once, rescale each frame, and place it at its sorted slot."""
    slot = {(frames[n].file, frames[n].frame): m for m, n in enumerate(order)}
    by_key = {(fr.file, fr.frame): fr for fr in frames}
    data = np.empty((len(frames), frames[0].rows, frames[0].cols), dtype=np.float32)
    for n, (path, ds) in enumerate(zip(files, datasets)):
        try:
            pixels = ds.pixel_array.reshape(-1, frames[0].rows, frames[0].cols)
        except Exception as exc:
            raise VolumeError(f"{path}: cannot decode pixel data ({_reason(exc)})") from None
        if pixels.shape[0] != _n_frames(ds):
            raise VolumeError(f"{path}: pixel data holds {pixels.shape[0]} frames, header says {_n_frames(ds)}")
        for f in range(pixels.shape[0]):
            fr = by_key[(n, f)]
            data[slot[(n, f)]] = pixels[f].astype(np.float64) * fr.slope + fr.intercept
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
        value = _lookup(ds, groups, "PixelMeasuresSequence", keyword)
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            pass
    return 1.0


def _tilt_degrees(step: np.ndarray, normal: np.ndarray) -> float:
    cos = abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-12)
    return round(float(np.degrees(np.arccos(min(1.0, cos)))), 3)
