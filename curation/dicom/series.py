"""`DicomSeries`: one loadable volume of a DICOM series (the whole series or one of its parts)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from curation.privacy.scrub import Scrubber, one_line


def series_key(uid: str) -> str:
    """A stable, non-identifying key for a SeriesInstanceUID (or UID#part)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:20]


@dataclass
class DicomSeries:
    """One loadable stack of images: a SeriesInstanceUID, or one part of a split series.

    A series whose images differ by geometry, image type, echo, diffusion encoding, time or
    per-frame functional groups is split into parts: ``part`` is the readable label
    (``echo2``, ``phase``, ``b1000-dir07``, ``t012``; "" for a whole series), ``part_index``
    its 1-based place among the series' ``n_parts``. ``frames`` names, per file, the frames of
    a multi-frame object that belong to this part (None: all frames of every file).
    """

    files: list[Path]
    series_key: str
    modality: str | None = None
    description: str = field(default="", repr=False)  # free text: may hold identifiers, scrub it
    number: str = ""  # SeriesNumber
    n_frames: int = 0
    patient_tokens: list[str] = field(default_factory=list, repr=False)
    identifiers: list[tuple[str, str]] = field(default_factory=list, repr=False)  # (kind, value) to scrub
    patient_key: str = field(default="", repr=False)  # PatientID|IssuerOfPatientID ("" when absent)
    rows: int = 0
    cols: int = 0
    part: str = ""
    part_index: int = 1
    n_parts: int = 1
    frames: list[tuple[int, ...] | None] | None = None

    @property
    def folder(self) -> Path:
        """The deepest folder holding all files (what error messages name)."""
        if not self.files:
            return Path(".")
        return Path(os.path.commonpath([str(p.parent) for p in self.files]))

    def name(self, scrubbed: bool = False) -> str:
        """'series 5 "T1 MPRAGE" part echo2'. The description is free text, unscrubbed: callers
        pass the line through `VolumeSpec.safe_text` / a generic `Scrubber` (or use
        ``name(scrubbed=True)``)."""
        words = [f"series {one_line(self.number, 16) or '?'}"]
        description = self.safe_description() if scrubbed else self.description
        if description:
            words.append(f'"{one_line(description, 64)}"')
        if self.part:
            words.append(f"part {self.part}")
        return " ".join(words)

    def safe_description(self) -> str:
        """SeriesDescription without identifiers (this patient's or anything shaped like one)."""
        if not self.description:
            return ""
        return Scrubber(self.identifiers, generic=True)(self.description, keep_hashes=False)


class SeriesList(list):
    """``list[DicomSeries]`` plus what was not used: ``skipped`` files (path, one-line reason)
    and ``skipped_series`` (series, reason) for localizers, secondary captures, dose reports."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[tuple[Path, str]] = []
        self.skipped_series: list[tuple[DicomSeries, str]] = []
