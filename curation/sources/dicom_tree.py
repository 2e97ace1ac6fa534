"""The `dicom` dataset: every image series under a root, pseudonymous from the start."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterable

from curation.privacy.scrub import Scrubber, redact
from curation.sources.modality import normalise_modality
from curation.sources.volume_spec import NamedProblems, VolumeSpec, root_relative

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
    """Replace the given patient names/IDs in ``text``, in any case, order and separator."""
    return Scrubber([("name", t) for t in tokens])(text) if tokens else text


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


def input_id(path: Path) -> str:
    """A pseudonym for an input file that is not a volume: a hash of its first MiB and size,
    so that neither its path nor its name (which may carry identifiers) is ever shown."""
    h = hashlib.sha256()
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):  # never open a FIFO (it would block) or follow a link out
            with open(path, "rb") as fh:
                h.update(fh.read(1 << 20))
            h.update(str(st.st_size).encode())
        else:
            h.update(f"special|{st.st_dev}|{st.st_ino}|{stat.S_IFMT(st.st_mode)}".encode())
    except OSError:
        h.update(b"unreadable")
    return f"input-{h.hexdigest()[:12]}"


def dicom_tree(root: Path, dataset: str = "dicom", series_parts: str = "anatomical", cache_dir: Path | None = None,
               id_key: bytes | None = None, workers: int | None = None) -> tuple[list[VolumeSpec], list[tuple[Path, str]]]:
    """Every image series (or series part) under ``root``; inputs that are not volumes come back
    as (name, reason).

    Everything is pseudonymous: a subject is a patient (``case_key`` is PatientID plus its
    issuer, hashed with the workdir key later; the parts of a series share it), series and
    skipped files are named by ids only, and reasons pass the scrubber of every identifier seen
    in the headers. ``series_parts`` (all | first | anatomical) picks the parts of split series;
    ``cache_dir`` holds the header index (keys hashed with ``id_key``) so reruns read no header.
    Localizers, secondary captures and dose reports come back as "skipped: ..." reasons.
    """
    from curation.dicom.load import find_series

    found = find_series(root, series_parts=series_parts, cache_dir=cache_dir, id_key=id_key, workers=workers)
    everyone = Scrubber([i for series in found for i in series.identifiers], generic=True)
    problems: list[tuple[Path, str]] = []
    sources: dict[str, str] = {}  # id -> real path, for the private map only
    for p, reason in getattr(found, "skipped", []):
        name = input_id(Path(p))
        sources[name] = str(p)
        problems.append((Path(name), redact(reason.replace(str(p), name).replace(Path(p).name, name), [], everyone)))
    for series, why in getattr(found, "skipped_series", []):
        name = f"series-{series.series_key[:12]}"
        sources[name] = str(Path(series.files[0]).parent)
        problems.append((Path(name), redact(f"skipped: {series.name(scrubbed=True)} is a {why}, not a volume", [],
                                            Scrubber(series.identifiers, generic=True))))
    specs = []
    for series in found:
        first = Path(series.files[0]).parent
        rel = f"{root_relative(first, root)}#{series.series_key}"
        if (series.modality or "").upper() in NON_IMAGE_MODALITIES:
            name = f"series-{series.series_key[:12]}"
            sources[name] = str(first)
            problems.append((Path(name), redact(f"skipped: {series.name(scrubbed=True)} is a {series.modality} object, "
                                                "not an image volume", [], Scrubber(series.identifiers, generic=True))))
            continue
        modality = normalise_modality(series.modality)
        body_region = dicom_body_region(series.files[0])
        specs.append(
            VolumeSpec(
                dataset=dataset,
                subset=dataset,
                # a subject is a patient; without a PatientID each series stands alone
                case_key=series.patient_key or f"series|{series.series_key}",
                source=first,
                kind="dicom",
                modality=modality,
                body_region=body_region,
                channel=0,
                series=series,
                rel_path=rel,
                pseudonymous=True,
                scrubber=Scrubber(series.identifiers),
            )
        )
    return specs, NamedProblems(problems, sources)
