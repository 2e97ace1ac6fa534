"""Reading DICOM headers (never pixels) into the small summaries that series grouping needs.

A `Header` keeps, per file, its series, size, modality, whether it is an image to skip
(localizer, secondary capture, dose report) and one `FrameKey` per frame: position,
orientation and the values that tell images at one position apart (`curation.dicom.parts`).
A `Header` holds no patient identifier and no free text, so it may be cached
(`curation.dicom.index`); who the patient is (`Identity`) is read separately.
"""

from __future__ import annotations

import functools
import os
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from curation.dicom.identifiers import identifying_values
from curation.dicom.plausible import pixel_fault
from curation.dicom.scan import LONG_VRS, PIXEL_TAGS, WANTED, Fallback, NotImage, Pixels, lite, scan

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its .1-.4 multi-frame variants
SPECIFIC_TAGS = sorted(WANTED)  # what a header-only pydicom read keeps
DEFER_BYTES = 1024  # full reads seek past larger values (pixel data); read on first use
LOCALIZER_WORDS = re.compile(r"locali[sz]er|scout|survey|topogram|scanogram|tri-?pilot|\bpilot\b|\bloc\b|3[- ]?plane",
                             re.IGNORECASE)
DOSE_WORDS = re.compile(r"dose (report|info)|patient protocol|dose_report", re.IGNORECASE)
# (group, element) of vendor diffusion tags: b-value and gradient direction
SIEMENS_B, SIEMENS_DIR = (0x0019, 0x100C), (0x0019, 0x100E)
GE_B, GE_DIR = (0x0043, 0x1039), ((0x0019, 0x10BB), (0x0019, 0x10BC), (0x0019, 0x10BD))
PHILIPS_B, PHILIPS_DIR = (0x2001, 0x1003), ((0x2005, 0x10B0), (0x2005, 0x10B1), (0x2005, 0x10B2))
SIEMENS_MOSAIC_N, SIEMENS_CSA_IMAGE = (0x0019, 0x100A), (0x0029, 0x1010)


class FrameKey(NamedTuple):
    """One frame (one image of a single-frame file) as grouping sees it."""

    frame: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    parts: tuple[str, ...]  # values of curation.dicom.parts.COMPONENTS ("" when absent)
    order: tuple[float, ...]  # acquisition order among images at one position


class Header(NamedTuple):
    """What discovery keeps per file (small, no identifiers: safe to cache)."""

    path: Path
    group: str  # a hash of the SeriesInstanceUID
    size: tuple[int, int]
    modality: str | None
    n_frames: int
    skip: str  # "" or why the file is not a volume (localizer, secondary capture, dose report)
    mosaic: int  # images per Siemens mosaic (0: not a mosaic)
    frames: tuple[FrameKey, ...]


class Identity(NamedTuple):
    """Who and what a series is: identifiers for scrubbing and subjects, and its name."""

    tokens: frozenset[str]
    identifiers: frozenset[tuple[str, str]]
    patient: str  # PatientID|IssuerOfPatientID ("" when absent)
    description: str
    number: str


class Skip(Exception):
    """A file that is not a usable DICOM image; the message is the one-line reason."""


def quiet(func: Callable) -> Callable:
    """Silence pydicom's per-value warnings: bad input is reported by our return values."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return func(*args, **kwargs)

    return wrapper


def reason(exc: BaseException) -> str:
    """Exception type and message on one line (pydicom's messages often span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"


def to_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def n_frames(ds: Dataset) -> int:
    return max(1, to_int(ds.get("NumberOfFrames"), 1))


def read_header(path: Path, fast: bool = True) -> tuple[Any, str]:
    """The header of ``path`` as discovery needs it: (dataset, "" or why its pixel data cannot
    hold the frames it declares). Scanned when it can be (`curation.dicom.scan`; not when
    ``fast`` is False), else read with pydicom (headers only); `Skip` for what is not an image."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                scanned = scan(fh, size) if fast else None
            except NotImage as why:
                raise Skip(str(why)) from None
            if scanned is not None:
                ds, pixels = lite(scanned), scanned.pixels
            else:
                fh.seek(0)
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=False, specific_tags=SPECIFIC_TAGS)
                pixels = _pixels_at(fh, *ds.original_encoding)
            _check_image(ds, pixels is not None)
            syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or ""))
            return ds, pixel_fault(fh, ds, pixels, size, bool(syntax) and syntax.is_encapsulated)
    except InvalidDicomError:
        raise Skip("not a DICOM file") from None
    except (Skip, Fallback):
        raise
    except Exception as exc:  # pydicom raises many types on corrupt files
        raise Skip(f"unreadable DICOM ({reason(exc)})") from None


def _pixels_at(fh: Any, implicit: bool | None, little: bool | None) -> Pixels | None:
    """After a header-only read the file sits at the pixel data element, if there is one."""
    start = fh.tell()
    head = fh.read(12)
    if len(head) < 8:
        return None
    order = "<" if little is not False else ">"
    group, elem = struct.unpack(order + "HH", head[:4])
    if group << 16 | elem not in PIXEL_TAGS:
        return None
    if implicit or head[4:6] not in LONG_VRS:
        length, offset = struct.unpack(order + "L", head[4:8])[0], start + 8
    else:
        length, offset = struct.unpack(order + "L", head[8:12])[0], start + 12
    return Pixels(offset, None if length == 0xFFFFFFFF else length)


def _check_image(ds: Any, has_pixels: bool) -> None:
    sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise Skip("DICOMDIR index, not an image")
    if not has_pixels or "Rows" not in ds or "Columns" not in ds:
        kind = text(ds, "Modality") or UID(sop_class).name or "unknown object"
        hint = "; truncated file?" if "Image Storage" in UID(sop_class).name else ""
        raise Skip(f"no pixel data ({kind}{hint})")


def read_dataset(path: Path, pixels: bool = True) -> Dataset:
    """The dataset of ``path``; `Skip` for what is not an image. Without ``pixels``, the header
    as `read_header` gives it, and pixel data that cannot hold the declared frames is a `Skip`."""
    if not pixels:
        ds, fault = read_header(path)
        if fault:
            raise Skip(fault)
        return ds
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, defer_size=DEFER_BYTES, force=False)
    except InvalidDicomError:
        raise Skip("not a DICOM file") from None
    except Exception as exc:  # pydicom raises many types on corrupt files
        raise Skip(f"unreadable DICOM ({reason(exc)})") from None
    _check_image(ds, "PixelData" in ds)
    return ds


def skip_kind(ds: Dataset) -> str:
    """Why this image is not a volume to slice ("" when it is one)."""
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    image_type = " ".join(str(v).upper() for v in (ds.get("ImageType") or []))
    description = text(ds, "SeriesDescription") + " " + text(ds, "ProtocolName")
    if "DOSE" in image_type or DOSE_WORDS.search(description):
        return "dose report"
    if "LOCALIZER" in image_type or "SCOUT" in image_type or LOCALIZER_WORDS.search(description):
        return "localizer/scout"
    if sop_class.startswith(SECONDARY_CAPTURE) or "SCREEN SAVE" in image_type:
        return "secondary capture"
    return ""


def identity(ds: Dataset) -> Identity:
    tokens: set[str] = set()
    for value in (text(ds, "PatientName"), text(ds, "PatientID")):
        if value:  # the whole value and its name components, for scrubbing paths
            tokens.add(value)
            tokens.update(p.strip() for p in value.split("^") if len(p.strip()) >= 2)
    pid = text(ds, "PatientID")
    return Identity(frozenset(tokens), frozenset(identifying_values(ds)),
                    f"{pid}|{text(ds, 'IssuerOfPatientID')}" if pid else "",
                    text(ds, "SeriesDescription"), text(ds, "SeriesNumber"))


class Geometry(NamedTuple):
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


def per_frame_item(ds: Dataset, frame: int) -> Dataset | None:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    return per_frame[frame] if frame < len(per_frame) else None


def shared_item(ds: Dataset) -> Dataset | None:
    shared = ds.get("SharedFunctionalGroupsSequence")
    return shared[0] if shared else None


def lookup(ds: Dataset, groups: list[Dataset | None], sequence: str, keyword: str) -> Any:
    """A value from the per-frame group, else the shared group, else the top level."""
    for group in groups:
        if group is not None and sequence in group and len(group[sequence].value):
            item = group[sequence].value[0]
            if keyword in item and item[keyword].value not in (None, ""):
                return item[keyword].value
    value = ds.get(keyword)
    return None if value in (None, "") else value


def floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def frame_geometry(ds: Dataset, file_index: int = 0, frames: tuple[int, ...] | None = None) -> list[Geometry]:
    """Position, orientation, spacing and rescale of each frame (or of ``frames``)."""
    shared = shared_item(ds)
    instance = to_int(ds.get("InstanceNumber"), 0)
    out = []
    for f in range(n_frames(ds)) if frames is None else frames:
        groups = [per_frame_item(ds, f), shared]
        pos = lookup(ds, groups, "PlanePositionSequence", "ImagePositionPatient")
        iop = lookup(ds, groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = lookup(ds, groups, "PixelMeasuresSequence", "PixelSpacing")
        slope = lookup(ds, groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = lookup(ds, groups, "PixelValueTransformationSequence", "RescaleIntercept")
        out.append(Geometry(
            file=file_index, frame=f, rows=int(ds.Rows), cols=int(ds.Columns),
            position=None if pos is None else floats(pos, 3),
            orientation=None if iop is None else floats(iop, 6),
            spacing=None if spacing is None else floats(spacing, 2),
            slope=1.0 if slope is None else float(slope),
            intercept=0.0 if intercept is None else float(intercept),
            order_hint=(instance, f)))
    return out


def private_floats(ds: Dataset, tag: tuple[int, int], n: int, fmt: str = "<f8") -> list[float] | None:
    """A vendor value as n floats, whether pydicom knows its VR (numbers) or not (bytes)."""
    elem = ds.get(tag)
    if elem is None or elem.value in (None, b"", ""):
        return None
    value = elem.value
    if isinstance(value, bytes):
        try:
            parts = value.decode("ascii").strip("\0 ").split("\\")
            out = [float(p) for p in parts]
        except (UnicodeDecodeError, ValueError):
            arr = np.frombuffer(value[: len(value) // np.dtype(fmt).itemsize * np.dtype(fmt).itemsize], dtype=fmt)
            out = [float(v) for v in arr]
    else:
        try:
            out = [float(v) for v in (value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__")
                                      and not isinstance(value, str) else [value])]
        except (TypeError, ValueError):
            return None
    return out[:n] if len(out) >= n and all(np.isfinite(out[:n])) else None
