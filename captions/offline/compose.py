"""Deterministic offline captions: grounded sentences from a slice's context.

The context (``captions.jobs.CaptionRequest.context``) holds modality, plane, position (0..1),
body_region, labels_present and dataset; `context_extras` adds what the slice row knows besides:
the MR channel name, the body fraction and ``label_regions`` (per labelled structure present:
area, side, extent; written by `curate slice` for volumes with a label map). A caption says:

- plane, modality (the MR channel when known) and what that modality shows;
- where the slice lies in the volume in words, and the body region when known;
- with a label map: which labelled structures are present, on which side of the patient, how
  large their cut is (size word and area) and whether the slice passes near their largest
  extent or one of their ends; a labelled slice without any says so;
- without a label map, or when labels are hidden (``--context metadata``): nothing about
  structures at all.

One of several phrasings is picked by a hash of the context, so the same slice always gets the
same caption and different slices read differently.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from captions.offline.phrases import (
    area_text,
    body_phrase,
    extent_phrase,
    join,
    modality_phrase,
    position_phrase,
    side_phrase,
    size_word,
)
from captions.prompts import structure_names

OFFLINE_PROVIDER = "offline"
OFFLINE_MODEL = "template"
OFFLINE_PROMPT_VERSION = "offline-v2"
MAX_NAMED = 4  # structures named with their geometry; more are counted


def context_extras(row: dict[str, Any]) -> dict[str, Any]:
    """What the offline captioner reads from a slice row besides the basic context: MR channel
    name, body fraction and the label geometry (JSON, None for unlabelled volumes). Coarse and
    PHI-free like the rest of the context; ``captions.release`` merges it in."""
    def number(key: str) -> float | None:
        v = row.get(key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            return None
        return None if math.isnan(v) else round(v, 4)

    regions = row.get("label_regions")
    channel = row.get("channel_name")
    return {
        "channel_name": channel if isinstance(channel, str) and channel else None,
        "foreground_fraction": number("foreground_fraction"),
        "label_regions": regions if isinstance(regions, str) and regions else None,
    }


def _regions(context: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The label geometry, or None when unknown (unlabelled volume, labels hidden, old rows)."""
    if "labels_present" not in context:  # --context metadata: labels hidden, not absent
        return None
    raw = context.get("label_regions")
    if raw is None:
        return None
    try:
        regions = json.loads(raw) if isinstance(raw, str) else list(raw)
    except (TypeError, ValueError):
        return None
    return [r for r in regions if isinstance(r, dict) and r.get("name")]


def _pick(seed: int, options: tuple[str, ...] | list[str], salt: int = 0) -> str:
    return options[(seed // (7 ** salt)) % len(options)] if options else ""


def _structure(r: dict[str, Any]) -> str:
    name = structure_names([r["name"]])
    name = name[0] if name else str(r["name"])
    details = [f"{size_word(float(r.get('fraction') or 0))}, {area_text(float(r.get('area_mm2') or 0))}"]
    extent = extent_phrase(float(r.get("peak") or 0))
    if extent:
        details.append(extent)
    return f"the {name}{side_phrase(r.get('side'), name)} ({', '.join(details)})"


def structures_text(context: dict[str, Any]) -> str | None:
    """"the liver on the patient's right (large, about 120 cm², near its largest extent) and ...",
    "" for a labelled slice without structures, None when nothing may be said about labels."""
    regions = _regions(context)
    if regions is not None:
        named = [r for r in regions if structure_names([r["name"]])]
        if not named:
            return ""
        named.sort(key=lambda r: (-float(r.get("area_mm2") or 0), str(r["name"])))
        parts = [_structure(r) for r in named[:MAX_NAMED]]
        if len(named) > MAX_NAMED:
            parts.append(f"{len(named) - MAX_NAMED} further labelled structures")
        return join(parts)
    if "labels_present" not in context:
        return None
    names = structure_names(context.get("labels_present"))
    return join([f"the {n}" for n in names]) if names else None  # no label map known: say nothing


def _a(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _seed(context: dict[str, Any]) -> int:
    blob = json.dumps(context, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big")


def offline_caption(context: dict[str, Any]) -> str:
    """A grounded caption from the slice's context (see the module docstring), e.g. "Axial
    T2-weighted MRI slice of the brain in the superior third of the volume, showing the left
    hippocampus (small, about 90 mm²). Fluid appears bright."
    """
    seed = _seed(context)
    mod_word, channel, looks = modality_phrase(context.get("modality"), context.get("channel_name"))
    modality = f"{channel} {mod_word}".strip() if channel and not channel.endswith("map") else (channel or mod_word)
    if channel.endswith("channel"):
        modality = f"{mod_word} ({channel})"
    plane = str(context.get("plane") or "").lower()
    plane_word = plane or "cross-sectional"
    where = position_phrase(plane, context.get("position"))
    region = context.get("body_region")
    of_region = f" of the {str(region).lower()}" if region else ""
    structs = structures_text(context)

    template = seed % 4
    where_part = f" {where}" if where else ""
    if template == 0:
        text = f"{plane_word.capitalize()} {modality} slice{of_region}{where_part}"
        text += f", showing {structs}." if structs else "."
    elif template == 1:
        lead = where[0].upper() + where[1:] if where else "In this volume"
        text = f"{lead}: {_a(plane_word)} {plane_word} {modality} slice{of_region}"
        text += f" with {structs}." if structs else "."
    elif template == 2:
        text = f"{modality[0].upper() + modality[1:]} image in the {plane_word} plane{of_region}"
        text += f", {where}." if where else "."
        if structs:
            text += f" Labelled here: {structs}."
    elif structs:
        text = f"This {plane_word} {modality} slice{of_region}"
        text += f", taken {where}," if where else ""
        text += f" contains {structs}."
    else:
        text = f"This is {_a(plane_word)} {plane_word} {modality} slice{of_region}"
        text += f", taken {where}." if where else "."
    if structs == "":
        text += " " + _pick(seed, ("None of the volume's labelled structures is in view.",
                                    "No labelled structure lies in this slice."), 1)
    extra = []
    body = body_phrase(context.get("foreground_fraction"))
    if body and (seed >> 5) % 2 == 0:
        extra.append(f"It shows {body}")
    look = _pick(seed, looks, 2)
    if look and (seed >> 9) % 3 != 0:
        extra.append(look[0].upper() + look[1:])
    for sentence in extra:
        text += f" {sentence}."
    return text
