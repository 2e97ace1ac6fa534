"""The `dicom` dataset: every image series under a root, with patient identifiers scrubbed."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterable

from .modality import normalise_modality
from .volume_spec import VolumeSpec, root_relative

# DICOM objects that carry pixels but are not images to slice (segmentations, dose grids...).
NON_IMAGE_MODALITIES = {"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "SR", "PR", "KO", "REG"}



def patient_tokens(series_list: Iterable[Any]) -> list[str]:
    """Patient names/IDs seen in the headers, and their parts, longest first (for scrubbing)."""
    found: set[str] = set()
    for series in series_list:
        for token in getattr(series, "patient_tokens", []) or []:
            token = str(token).strip()
            parts = [token, *re.split(r"[\^\s,]+", token)]
            found |= {p for p in parts if len(p) >= 3}
    return sorted(found, key=lambda t: (-len(t), t))


def scrub(text: str, tokens: list[str]) -> str:
    """Replace patient identifiers in paths and messages by a short hash."""
    for token in tokens:
        if token in text:
            text = text.replace(token, "anon-" + hashlib.sha256(token.encode()).hexdigest()[:8])
    return text


# BodyPartExamined / StudyDescription words -> body region (display window, caption context).
DICOM_BODY_PARTS: list[tuple[tuple[str, ...], str]] = [
    (("HEAD", "BRAIN", "SKULL", "NECK"), "brain"),
    (("HEART", "CARDIAC", "CORONARY"), "heart"),
    (("CHEST", "THORAX", "LUNG", "BREAST"), "chest"),
    (("ABDOMEN", "ABD", "LIVER", "KIDNEY", "PANCREAS", "SPLEEN"), "abdomen"),
    (("PELVIS", "PROSTATE", "BLADDER", "HIP"), "pelvis"),
]


def dicom_body_region(path: Path) -> str | None:
    """Coarse body region from the header of one file of a series (None when unknown)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["BodyPartExamined", "StudyDescription", "SeriesDescription"])
    except Exception:  # unreadable headers are reported by the loader
        return None
    text = " ".join(str(ds.get(t, "") or "") for t in ("BodyPartExamined", "SeriesDescription", "StudyDescription")).upper()
    words = set(re.split(r"[^A-Z]+", text))
    for keys, region in DICOM_BODY_PARTS:
        if words & set(keys):
            return region
    return None


def dicom_tree(root: Path, dataset: str = "dicom") -> tuple[list[VolumeSpec], list[tuple[Path, str]]]:
    """Every image series under ``root``; unreadable files are returned as (path, reason)."""
    from .dicom import find_series

    found = find_series(root)
    tokens = patient_tokens(found)
    problems = [(Path(scrub(str(p), tokens)), scrub(reason, tokens)) for p, reason in getattr(found, "skipped", [])]
    specs = []
    for series in found:
        if (series.modality or "").upper() in NON_IMAGE_MODALITIES:
            folder = scrub(str(series.folder), tokens)
            problems.append((Path(folder), f"{folder}: {series.modality} object, not an image volume"))
            continue
        first = Path(series.files[0]).parent
        rel = scrub(root_relative(first, root), tokens)
        modality = normalise_modality(series.modality)
        body_region = dicom_body_region(series.files[0])
        specs.append(
            VolumeSpec(
                dataset=dataset,
                subset=dataset,
                case_key=series.series_key,
                source=first,
                kind="dicom",
                modality=modality,
                body_region=body_region,
                channel=0,
                series=series,
                display_path=f"{rel}#{series.series_key[:12]}",
                scrub_tokens=tokens,
            )
        )
    return specs, list(problems)
