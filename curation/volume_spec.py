"""`VolumeSpec`: one source volume to process, as the dataset adapters find it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class VolumeSpec:
    """One source volume to process (a file, or a DICOM series)."""

    dataset: str
    subset: str
    case_key: str  # raw case name; hashed before it reaches any manifest
    source: Path
    label: Path | None = None
    kind: str = "nifti"  # nifti | dicom
    modality: str | None = None
    body_region: str | None = None
    channel: int | None = None  # None: expand every channel of a 4D file
    channel_names: dict[str, str] = field(default_factory=dict)
    label_names: dict[str, str] = field(default_factory=dict)
    series: Any = None  # curation.dicom.DicomSeries for kind == "dicom"
    display_path: str = ""  # root-relative source path with identifiers scrubbed
    error: str | None = None  # adapter-level problem (missing file...) recorded as an error row
    scrub_tokens: list[str] = field(default_factory=list)  # patient identifiers to keep out of text

    def volume_id(self, channel: int | None) -> str:
        key = f"{self.dataset}|{self.subset}|{self.display_path}|{channel}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return f"{slug(self.subset)}-{digest}"

    @property
    def case_id(self) -> str:
        return hashlib.sha256(f"{self.subset}|{self.case_key}".encode()).hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "volume"


def root_relative(path: Path, root: Path) -> str:
    """``path`` relative to the dataset root, as a POSIX string (the spec's display path)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
