"""Modality and body region: names normalised, and what known sub-datasets are."""

from __future__ import annotations

import re

# Known sub-datasets: (pattern in the lower-cased subset name) -> (modality, body region).
KNOWN_SUBSETS: list[tuple[str, str, str]] = [
    ("brats", "MR", "brain"),
    ("braintumour", "MR", "brain"),
    ("mrbrains", "MR", "brain"),
    ("hippocampus", "MR", "brain"),
    ("mni", "MR", "brain"),
    ("brain", "MR", "brain"),
    ("heart", "MR", "heart"),
    ("prostate", "MR", "pelvis"),
    ("lits", "CT", "abdomen"),
    ("liver", "CT", "abdomen"),
    ("lung", "CT", "chest"),
    ("pancreas", "CT", "abdomen"),
    ("hepaticvessel", "CT", "abdomen"),
    ("hepatic", "CT", "abdomen"),
    ("spleen", "CT", "abdomen"),
    ("colon", "CT", "abdomen"),
    ("kits", "CT", "abdomen"),
    ("kidney", "CT", "abdomen"),
]

MR_SEQUENCE_NAMES = {"MRI", "MR", "T1", "T1W", "T1GD", "T1CE", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD"}


def known_subset(name: str) -> tuple[str | None, str | None]:
    low = re.sub(r"[^a-z0-9]", "", name.lower())
    for pattern, modality, region in KNOWN_SUBSETS:
        if pattern in low:
            return modality, region
    return None, None


def normalise_modality(value: str | None) -> str | None:
    if not value:
        return None
    up = value.strip().upper()
    if up in ("CT", "CTA", "PET/CT"):
        return "CT"
    if up in MR_SEQUENCE_NAMES or up.startswith("MR") or up.startswith("T1") or up.startswith("T2"):
        return "MR"
    return up
