"""Whether the frames a DICOM header declares can be in its pixel data, checked before anything
is allocated or indexed per frame (a header may declare a million frames in 11 KB)."""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

from curation.dicom.scan import Pixels

_TAG_LEN, _U32 = struct.Struct("<HH"), struct.Struct("<L")


def pixel_fault(fh: BinaryIO, ds: Any, pixels: Pixels | None, size: int, encapsulated: bool) -> str:
    """Why the frames ``ds`` declares cannot be in its pixel data ("" when they can).

    Native pixel data must hold frames x rows x columns x samples x bits (and, for several
    frames, lie inside the file); encapsulated pixel data must hold a fragment per frame and,
    when its basic offset table is filled in, one offset per frame; an enhanced object needs a
    per-frame functional group item per frame. Reads at most 8 bytes per declared frame.
    """
    def number(keyword: str, default: int) -> int:
        value = ds.get(keyword)
        try:
            return default if value in (None, "") else int(value)
        except (TypeError, ValueError):
            return default  # as discovery reads it (`curation.dicom.header.n_frames`)

    frames, rows, cols = max(1, number("NumberOfFrames", 1)), number("Rows", 0), number("Columns", 0)
    samples, bits = max(1, number("SamplesPerPixel", 1)), max(1, number("BitsAllocated", 16))
    if rows < 1 or cols < 1:
        return f"implausible header: {rows}x{cols} pixels per frame"
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) < frames:
        return f"implausible header: {frames} frame(s) declared, {len(per_frame)} per-frame functional group item(s)"
    if pixels is None:
        return ""
    if encapsulated and pixels.length is None:
        fragments, offsets = _fragments(fh, pixels.offset, size, frames)
        if offsets and offsets != frames:
            return f"implausible header: {frames} frame(s) declared, the pixel data's offset table lists {offsets}"
        if fragments < frames:
            return (f"implausible header: {frames} frame(s) declared, the compressed pixel data holds "
                    f"{fragments} fragment(s)")
        return ""
    if encapsulated:
        return ""  # a defined length in a compressed syntax: the decoder will say what is wrong
    if str(ds.get("PhotometricInterpretation") or "").strip().upper() == "YBR_FULL_422":
        samples = 2  # two bytes' worth of samples per pixel
    need = (frames * rows * cols * samples * bits + 7) // 8
    declared = pixels.length if pixels.length is not None else need
    in_file = max(0, size - pixels.offset)
    # a single frame cut short is the loader's to report (it names the file); many frames that
    # cannot be there must not reach per-frame work
    held = min(declared, in_file) if frames > 1 else declared
    if held >= need:
        return ""
    return (f"implausible header: {frames} frame(s) of {rows}x{cols} ({samples} sample(s), {bits} bits) need "
            f"{_size(need)} of pixel data, the file holds {_size(held)}")


def _fragments(fh: BinaryIO, offset: int, size: int, frames: int) -> tuple[int, int]:
    """(fragments up to ``frames``, entries of the basic offset table) of encapsulated pixel data."""
    pos, count, offsets = offset, -1, 0
    while count < frames and pos + 8 <= size:
        fh.seek(pos)
        head = fh.read(8)
        if len(head) < 8:
            break
        group, elem = _TAG_LEN.unpack_from(head)
        length = _U32.unpack_from(head, 4)[0]
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            break
        if count < 0:
            offsets = length // 4
        elif pos + 8 + length > size:
            break
        count += 1
        pos += 8 + length
    return max(count, 0), offsets


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"
