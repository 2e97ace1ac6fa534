"""Deterministic offline captioner: grounded text from slice metadata and ground-truth labels.

The default provider when no API key is set (and for the demo). It never looks at pixels, so
every statement is true by construction: modality, plane, coarse level, body region and the
annotated structures present in the slice. Same context in, same caption out.
"""

from __future__ import annotations

from typing import Any

from captions.prompts import position_word, structure_names

OFFLINE_PROVIDER = "offline"
OFFLINE_MODEL = "template"
OFFLINE_PROMPT_VERSION = "offline-v1"

_MODALITY_NAMES = {"CT": "CT", "MR": "MRI", "MRI": "MRI", "PT": "PET", "US": "ultrasound"}
_PLANE_AXIS = {"axial": "craniocaudal", "coronal": "anteroposterior", "sagittal": "left-right"}


def _join(names: list[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def offline_caption(context: dict[str, Any]) -> str:
    """Caption from coarse context, e.g. "Axial CT slice at the upper level of the abdomen,
    showing the liver and spleen."
    """
    modality = str(context.get("modality") or "").upper()
    modality_name = _MODALITY_NAMES.get(modality, modality or "medical")
    plane = str(context.get("plane") or "").lower()
    level = position_word(plane, context.get("position"))
    region = context.get("body_region")
    structures = structure_names(context.get("labels_present"))

    head = f"{plane.capitalize() or 'A'} {modality_name} slice".strip()
    if plane in _PLANE_AXIS:
        where = f" at the {level} level along the {_PLANE_AXIS[plane]} axis"
    else:
        where = ""
    region_text = f" of the {str(region).lower()}" if region else ""
    if structures:
        shown = f", showing the {_join(structures)}."
    elif "labels_present" not in context:  # --context metadata: labels hidden, not absent
        shown = "."
    else:
        shown = ", with no annotated structures in view."
    return f"{head}{region_text}{where}{shown}"
