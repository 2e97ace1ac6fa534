"""The order parallel `curate slice` workers get their volumes: the largest first.

Workers take the next volume as they finish one, so a large CT handed out last keeps one
worker busy while the others idle (a 512x512x600 CT takes ten times a 256x256x24 MR).
Longest-processing-time-first puts the large volumes at the start and leaves the small ones to
even out the finish. A volume's cost is estimated without reading it: the bytes its image (and
label) decode to, from the gzip trailer of a ``.gz`` file (its uncompressed size, 4 bytes at
the end), the file size of anything else, and rows x columns x frames of a DICOM series'
headers (already read by discovery). The order changes no output: the manifests are sorted
by volume id, and each volume's files depend only on that volume.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

from curation.sources.volume_spec import VolumeSpec

__all__ = ["decoded_bytes", "largest_first", "volume_cost"]


def decoded_bytes(path: Path | str | None) -> int:
    """Bytes ``path`` decodes to: a gzip file's uncompressed size (its ISIZE trailer, mod 2^32,
    lifted to at least the compressed size), else its size on disk; 0 when it cannot be read."""
    if path is None:
        return 0
    try:
        size = os.path.getsize(path)
        if not str(path).lower().endswith(".gz") or size < 18:
            return size
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return size
            fh.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", fh.read(4))
        while isize < size:  # over 4 GiB uncompressed: ISIZE wrapped around
            isize += 1 << 32
        return isize
    except (OSError, struct.error):
        return 0


def volume_cost(spec: VolumeSpec) -> int:
    """The work ``spec`` will take, in bytes decoded (image and label); 0 for a spec that is an
    error already (it costs nothing)."""
    if spec.error:
        return 0
    if spec.kind == "dicom" and spec.series is not None:
        series = spec.series  # a DicomSeries: geometry from the headers discovery read
        return 2 * series.rows * series.cols * max(series.n_frames, len(series.files))
    return decoded_bytes(spec.source) + decoded_bytes(spec.label)


def largest_first(specs: Sequence[VolumeSpec]) -> list[VolumeSpec]:
    """``specs`` by decreasing `volume_cost`; equal costs keep their order (the sort is stable,
    so the order is the same on every run)."""
    return sorted(specs, key=volume_cost, reverse=True)  # reverse keeps a stable sort stable
