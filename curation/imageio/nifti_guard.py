"""What a NIfTI file may make us read before its voxels: the header and its extensions,
checked by streaming through them (nothing kept) before nibabel reads them into memory.

A hostile ``.nii.gz`` can declare a 1 GB extension (or a chain of them, or a data offset far
past its end) that 1 MB of deflate data fills with zeros; nibabel would read it whole. Here the
header, extensions and data offset must stay under `MAX_HEADER_BYTES` inflated bytes, and each
extension must be at least its own 8-byte head (a negative or zero size makes nibabel read to
the end of the stream).
"""

from __future__ import annotations

import math
import struct
from typing import BinaryIO

MAX_HEADER_BYTES = 64 << 20  # header + extensions (CIFTI XML, DICOM dumps: a few MB in practice)
CHUNK = 1 << 20


def _skip(fh: BinaryIO, n: int) -> bool:
    """Read and drop ``n`` bytes in chunks (memory stays at one chunk); False at an early end."""
    while n > 0:
        got = len(fh.read(min(n, CHUNK)))
        if not got:
            return False
        n -= got
    return True


def header_fault(fh: BinaryIO, limit: int = MAX_HEADER_BYTES) -> str:
    """Why the NIfTI-1/2 header at the start of ``fh`` (an open, possibly inflating, stream)
    would make nibabel read more than ``limit`` bytes before the voxels ("" when it would not,
    or when this is not a NIfTI header at all: nibabel reports that)."""
    head = fh.read(4)
    if len(head) < 4:
        return ""
    for endian in "<>":
        size = struct.unpack(endian + "i", head)[0]
        if size in (348, 540):
            break
    else:
        return ""
    rest = fh.read(size - 4)
    if len(rest) < size - 4:
        return ""
    hdr = head + rest
    if size == 348:
        offset = struct.unpack(endian + "f", hdr[108:112])[0]
        single = hdr[344:348] == b"n+1\x00"
    else:
        offset = struct.unpack(endian + "q", hdr[168:176])[0]
        single = hdr[4:8] == b"n+2\x00"
    if single and (not math.isfinite(offset) or offset > limit):
        return f"header puts the voxel data {offset:,.0f} bytes in (over {limit:,}); refused"
    flag = fh.read(4)
    if len(flag) < 4 or flag[0] == 0:
        return ""
    remaining = int(offset) - (size + 4) if single else -1  # as nibabel walks the extensions
    total = size + 4
    while remaining >= 16 or remaining < 0:
        ext = fh.read(8)
        if len(ext) < 8:
            return ""  # nothing more (or a torn head nibabel reports)
        esize = struct.unpack(endian + "i", ext[:4])[0]
        if esize < 8:
            return f"header extension declares {esize} bytes (corrupt header); refused"
        total += esize
        if total > limit:
            return (f"header extensions inflate past {limit:,} bytes (one declares {esize:,}); "
                    "refused (a compression bomb?)")
        if not _skip(fh, esize - 8):
            return ""
        remaining -= esize
    return ""
