"""A header scanner for discovery: one bounded read per file, only the attributes discovery uses.

pydicom parses every element of a header into objects; discovery needs about 60 top-level
attributes. `scan` reads the file head (16 KiB, more only while the header goes on), checks the
preamble and the file meta group (DICOMDIRs and non-image SOP classes stop here), then walks the
top-level elements of an explicit VR little endian dataset, skipping what it does not need by
length (or item by item for undefined lengths) and stopping at the pixel data element; in a
single-frame native file, once past the last attribute it needs, it looks for the pixel data at
the end of the file instead of walking the vendor bulk before it. What it keeps becomes a `Lite`
dataset whose values pydicom's own converters decode on first use, so values mean exactly what
pydicom gives. Files it does not handle (big endian,
deflated, a wanted sequence such as the functional groups of an enhanced object, a VR it
cannot tell) come back as None: the caller reads them with pydicom.
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO, NamedTuple

from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.values import convert_value

from curation.dicom.identifiers import IDENTIFYING

# Every top-level attribute that discovery (header, parts, mosaic, identity) reads.
KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns",
    "NumberOfFrames", "ImageType", "SeriesDescription", "ProtocolName", "SeriesNumber", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
    "FrameType", "EffectiveEchoTime", "StackID", "TemporalPositionIndex", "NominalCardiacTriggerDelayTime",
    "DiffusionBValue", "EchoNumbers", "ASLContext", "TemporalPositionIdentifier", "TriggerTime",
    "AcquisitionNumber", "AcquisitionTime", "PatientName", "PatientID", "IssuerOfPatientID",
    "SamplesPerPixel", "BitsAllocated", "PhotometricInterpretation",
    # loading (`curation.dicom.load`): pixel format, slice gap, provenance
    "BitsStored", "PixelRepresentation", "SpacingBetweenSlices", "SliceThickness", "Manufacturer",
    # sequences: a file that has one is read by pydicom
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "OtherPatientIDsSequence",
    "DirectoryRecordSequence",
)
PRIVATE = (0x0019100C, 0x0019100E, 0x00431039, 0x001910BB, 0x001910BC, 0x001910BD, 0x20011003, 0x200510B0,
           0x200510B1, 0x200510B2, 0x0019100A, 0x00291010)  # vendor b-values, directions, mosaic, CSA
WANTED = frozenset([tag_for_keyword(k) for k in KEYWORDS + tuple(k for ks in IDENTIFYING.values() for k in ks)]
                   + list(PRIVATE))
# what `curation.dicom.header.identity` reads: files whose raw values of these agree are the same identity
IDENTITY_TAGS = tuple(sorted({tag_for_keyword(k) for k in ("PatientName", "PatientID", "IssuerOfPatientID",
                                                             "SeriesDescription", "SeriesNumber")}
                             | {tag_for_keyword(k) for ks in IDENTIFYING.values() for k in ks}))
SEQUENCES = frozenset(tag_for_keyword(k) for k in KEYWORDS if k.endswith("Sequence"))
BY_KEYWORD = {k: tag_for_keyword(k) for k in KEYWORDS + tuple(k for ks in IDENTIFYING.values() for k in ks)
              + ("MediaStorageSOPClassUID", "TransferSyntaxUID")}
# every key `Lite` answers for: keywords, tags as ints and as (group, element) pairs
_TAGS: dict[Any, int] = {**BY_KEYWORD, **{t: t for t in WANTED}, **{(t >> 16, t & 0xFFFF): t for t in WANTED},
                         0x00020002: 0x00020002, 0x00020010: 0x00020010}
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
# past the last attribute a single-frame file can hold for discovery (the functional groups of
# group 5200 are multi-frame only): what follows up to the pixel data is not needed
LAST_CLASSIC = max(t for t in WANTED if t >> 16 < 0x5200)
LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE, BIG_ENDIAN, DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
DICOMDIR = "1.2.840.10008.1.3.10"
# SOP classes that never hold an image: structured reports, presentation states, waveforms,
# encapsulated documents (families), raw data, registrations, surface segmentations, RT plans,
# structures and treatment records.
NON_IMAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.9.",
                      "1.2.840.10008.5.1.4.1.1.104.")
NON_IMAGE = frozenset("1.2.840.10008.5.1.4.1.1." + s for s in ("66", "66.1", "66.3", "66.5", "481.3", "481.4",
                                                                "481.5", "481.6", "481.7", "481.8", "481.9"))
HEAD = 16384
_TAG_LEN = struct.Struct("<HH")
_ELEMENT = struct.Struct("<HH2sH")
SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                       b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))
_U16, _U32 = struct.Struct("<H"), struct.Struct("<L")


class NotImage(Exception):
    """The file is not a DICOM image; the message is the one-line reason."""


class Pixels(NamedTuple):
    """Where the pixel data element is: offset of its value, its length (None: undefined)."""

    offset: int
    length: int | None


class Scanned(NamedTuple):
    meta: dict[int, RawDataElement]
    elements: dict[int, RawDataElement]
    pixels: Pixels | None
    size: int  # file size in bytes


class _Head:
    """The first bytes of a file, read further on demand."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.data, self.eof, self.size = fh, fh.read(HEAD), False, size

    def have(self, end: int) -> bool:
        if end > self.size:  # a length past the end of the file: read nothing more
            return False
        while end > len(self.data) and not self.eof:
            more = self.fh.read(max(end - len(self.data), len(self.data)))
            self.eof = not more
            self.data += more
        return end <= len(self.data)


class Fallback(Exception):
    """The scanner does not handle this file: read it with pydicom."""


def scan(fh: BinaryIO, size: int) -> Scanned | None:
    """The wanted elements of an open file; raises `NotImage`; None when pydicom must read it."""
    head = _Head(fh, size)
    if not head.have(132) or head.data[128:132] != b"DICM":
        raise NotImage("not a DICOM file")
    try:
        meta, pos = _meta(head)
        sop = _text(meta.get(0x00020002))
        if sop == DICOMDIR:
            raise NotImage("DICOMDIR index, not an image")
        if sop in NON_IMAGE or sop.startswith(NON_IMAGE_PREFIXES):
            raise NotImage(f"no pixel data ({UID(sop).name})")
        if _text(meta.get(0x00020010)) in ("", IMPLICIT_LE, BIG_ENDIAN, DEFLATED):
            return None  # pydicom reads these (implicit VR needs its dictionary for every VR)
        elements, pixels = _walk(head, pos, _text(meta.get(0x00020010)) == EXPLICIT_LE)
    except Fallback:
        return None
    return Scanned(meta, elements, pixels, size)


def _text(raw: RawDataElement | None) -> str:
    return raw.value.decode("latin-1").rstrip("\0 ").strip() if raw is not None and raw.value else ""


def _meta(head: _Head) -> tuple[dict[int, RawDataElement], int]:
    pos, meta = 132, {}
    while head.have(pos + 8):
        group, elem = _TAG_LEN.unpack_from(head.data, pos)
        if group != 2:
            return meta, pos
        vr = head.data[pos + 4:pos + 6]
        if not vr.isalpha() or not vr.isupper():
            raise Fallback
        if vr in LONG_VRS:
            if not head.have(pos + 12):
                break
            length, start = _U32.unpack_from(head.data, pos + 8)[0], pos + 12
        else:
            length, start = _U16.unpack_from(head.data, pos + 6)[0], pos + 8
        if length == 0xFFFFFFFF or not head.have(start + length):
            raise Fallback
        tag = group << 16 | elem
        if tag in (0x00020002, 0x00020010):  # the SOP class and transfer syntax: all discovery asks of it
            meta[tag] = RawDataElement(BaseTag(tag), vr.decode(), length, head.data[start:start + length], start,
                                       False, True)
        pos = start + length
    raise Fallback  # a file that ends in its meta group: let pydicom say what is wrong


def _element(head: _Head, pos: int) -> tuple[int, str | None, int, int]:
    """(tag, VR, length, value offset) of the explicit VR little endian element at ``pos``."""
    if not head.have(pos + 8):
        raise EOFError
    group, elem = _TAG_LEN.unpack_from(head.data, pos)
    vr = head.data[pos + 4:pos + 6]
    if vr in LONG_VRS:
        if not head.have(pos + 12):
            raise EOFError
        return group << 16 | elem, vr.decode(), _U32.unpack_from(head.data, pos + 8)[0], pos + 12
    if group == 0xFFFE:  # item and delimitation tags have no VR
        return group << 16 | elem, None, _U32.unpack_from(head.data, pos + 4)[0], pos + 8
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise Fallback  # an implicit VR switch inside an explicit dataset: pydicom copes
    return group << 16 | elem, vr.decode(), _U16.unpack_from(head.data, pos + 6)[0], pos + 8


def _walk(head: _Head, pos: int, native: bool) -> tuple[dict[int, RawDataElement], Pixels | None]:
    """The wanted top-level elements from ``pos`` on, and where the pixel data is (None: none)."""
    elements: dict[int, RawDataElement] = {}
    data, end, unpack, u32 = head.data, len(head.data), _ELEMENT.unpack_from, _U32.unpack_from
    wanted, long_vrs, short_vrs = WANTED, LONG_VRS, SHORT_VRS
    tail = native  # try the jump to the pixel data at most once
    try:
        while True:
            if pos + 12 > end:  # the inlined `_element`: most elements need no call
                head.have(pos + 12)
                data, end = head.data, len(head.data)
                if pos + 8 > end:
                    raise EOFError
            group, elem, vr, length = unpack(data, pos)
            tag = group << 16 | elem
            if vr in short_vrs:
                start = pos + 8
            elif vr in long_vrs:
                if pos + 12 > end:
                    raise EOFError
                length, start = u32(data, pos + 8)[0], pos + 12
            else:
                tag, vr, length, start = _element(head, pos)
            if tail and tag > LAST_CLASSIC:
                tail = False
                pixels = _pixels_at_end(head, elements, pos)
                if pixels is not None:
                    return elements, pixels
            if tag in wanted or tag >= 0x7FE00008:
                if tag in PIXEL_TAGS:
                    return elements, Pixels(start, None if length == 0xFFFFFFFF else length)
                if tag >= 0xFFFE0000:
                    raise Fallback  # a stray delimiter at the top level
                if tag in SEQUENCES or vr in (b"SQ", b"UN", "SQ", "UN") or length == 0xFFFFFFFF:
                    raise Fallback
                if tag in wanted:
                    if start + length > end:
                        if not head.have(start + length):
                            raise EOFError
                        data, end = head.data, len(head.data)
                    elements[tag] = RawDataElement(BaseTag(tag), vr.decode() if isinstance(vr, bytes) else vr, length,
                                                   data[start:start + length], start, False, True)
                pos = start + length
            elif length == 0xFFFFFFFF:
                pos = _skip_items(head, start)
                data, end = head.data, len(head.data)
            else:
                pos = start + length
    except EOFError:
        return elements, None


def _pixels_at_end(head: _Head, elements: dict[int, RawDataElement], pos: int) -> Pixels | None:
    """Where the native pixel data of a single-frame file is, found from the file's end (it is
    nearly always the last element), so that the vendor bulk between the last attribute
    discovery needs and the pixels is not walked; None when that is not so (walk on)."""
    if 0x00280008 in elements or 0x00200032 not in elements:  # functional groups may follow
        return None

    def number(tag: int, default: int) -> int:
        raw = elements.get(tag)
        return int.from_bytes(raw.value[:2], "little") if raw is not None and raw.length == 2 else default

    rows, cols = number(0x00280010, 0), number(0x00280011, 0)
    length = rows * cols * number(0x00280002, 1) * number(0x00280100, 0) // 8
    length += length & 1
    start = head.size - length - 12
    if not length or start < pos:
        return None
    if start + 12 <= len(head.data):
        last = head.data[start:start + 12]
    else:
        head.fh.seek(start)
        last = head.fh.read(12)
    if (last[:4] == b"\xe0\x7f\x10\x00" and last[4:8] in (b"OW\0\0", b"OB\0\0")
            and _U32.unpack_from(last, 8)[0] == length):
        return Pixels(start + 12, length)
    return None


def _skip_items(head: _Head, pos: int) -> int:
    """Offset after an undefined-length value that starts at ``pos``: its items and elements
    walked (nested undefined lengths counted) up to the delimiter that closes it."""
    data, end, unpack, u32 = head.data, len(head.data), _ELEMENT.unpack_from, _U32.unpack_from
    long_vrs, short_vrs, depth = LONG_VRS, SHORT_VRS, 1
    while True:
        if pos + 12 > end:
            head.have(pos + 12)
            data, end = head.data, len(head.data)
            if pos + 8 > end:
                raise EOFError
        group, elem, vr, length = unpack(data, pos)
        if group == 0xFFFE:  # items and delimiters: a 4-byte length, no VR
            length, pos = u32(data, pos + 4)[0], pos + 8
            if elem == 0xE0DD or elem == 0xE00D:
                depth -= 1
                if depth == 0:
                    return pos
            elif elem != 0xE000:
                raise Fallback
            elif length == 0xFFFFFFFF:
                depth += 1
            else:
                pos += length
            continue
        if vr in long_vrs:
            if pos + 12 > end:
                raise EOFError
            length, pos = u32(data, pos + 8)[0], pos + 12
        elif vr in short_vrs:
            pos += 8
        else:
            raise Fallback  # an implicit VR switch inside a sequence: pydicom copes
        if length == 0xFFFFFFFF:
            depth += 1
        else:
            pos += length


class Element(NamedTuple):
    """What ``ds.get(tag)`` gives for a private tag: its VR and decoded value."""

    VR: str
    value: Any


_DECODED: dict = {}  # (VR, raw bytes, encodings) -> value, shared by the files a process scans
_MISSING = object()
DECODED_MAX = 50_000


class Lite:
    """The scanned elements with the part of pydicom's Dataset interface discovery uses; an
    attribute outside `KEYWORDS` raises `Fallback` (the caller then reads the file with pydicom)."""

    def __init__(self, elements: dict[int, RawDataElement], meta: Lite | None = None) -> None:
        self._raw = elements
        self._values: dict[int, Any] = {}
        self._encodings: tuple[str, ...] | None = None
        self.file_meta = meta
        if 0x00080005 in elements:
            self._encodings = tuple(convert_encodings(self._value(0x00080005)))

    def _value(self, tag: int) -> Any:
        value = self._values.get(tag, _MISSING)
        if value is _MISSING:
            raw = self._raw[tag]
            # files of a series repeat most values: decode each distinct one once per process
            key = (raw.VR, raw.value, self._encodings)
            value = _DECODED.get(key, _MISSING)
            if value is _MISSING:
                value = empty_value_for_VR(raw.VR) if raw.length == 0 else convert_value(
                    raw.VR, raw, list(self._encodings) if self._encodings else None)
                if len(_DECODED) >= DECODED_MAX:
                    _DECODED.clear()
                _DECODED[key] = value
            self._values[tag] = value
        return value

    @staticmethod
    def _tag(key: str | int | tuple[int, int]) -> int:
        tag = _TAGS.get(key)
        if tag is None:  # an attribute the scan does not keep: the caller reads the file with pydicom
            raise Fallback(str(key))
        return tag

    def __contains__(self, key: str | int | tuple[int, int]) -> bool:
        return self._tag(key) in self._raw

    def get(self, key: str | int | tuple[int, int], default: Any = None) -> Any:
        tag = _TAGS.get(key) or self._tag(key)
        if tag not in self._raw:
            return default
        return self._value(tag) if key.__class__ is str else Element(self._raw[tag].VR, self._value(tag))

    def __getattr__(self, keyword: str) -> Any:
        if keyword.startswith("_"):
            raise AttributeError(keyword)
        tag = self._tag(keyword)
        if tag not in self._raw:
            raise AttributeError(keyword)
        return self._value(tag)

    def key(self, tags: tuple[int, ...]) -> tuple:
        """The raw values of ``tags`` (and the character set): equal keys, equal decoded values."""
        raw = self._raw
        return (self._encodings, *(raw[t].value if t in raw else None for t in tags))


def lite(scanned: Scanned) -> Lite:
    """The `Lite` dataset of a scan."""
    meta = Lite({t: r for t, r in scanned.meta.items()})
    return Lite(scanned.elements, meta)
