"""Versioned caption prompts in chat-completions format.

A prompt sees the slice pixels plus coarse context only (modality, plane, position in words,
body region, structures from ground-truth labels). Never file paths, ids or PHI. Changing a
template's wording means a new version string: the version is part of the cache key.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

PROMPT_VERSION = "v1"
FALLBACK_PROMPT_VERSION = "v1-fallback"  # used by --retry-refused


@dataclass(frozen=True)
class PromptTemplate:
    """One versioned prompt: a system message and a user text template."""

    version: str
    system: str
    user: str  # formatted with the keys of ``context_fields``


TEMPLATES: dict[str, PromptTemplate] = {
    PROMPT_VERSION: PromptTemplate(
        version=PROMPT_VERSION,
        system=(
            "You are an experienced radiologist writing captions for a de-identified research "
            "dataset of 2D slices cut from 3D CT and MRI volumes. Describe only what is visible: "
            "the imaging plane and modality, the anatomical level, the main organs and "
            "structures, and any obvious abnormality. Do not guess patient identity or history. "
            "Answer with one plain paragraph of 2-4 sentences, without preamble."
        ),
        user=(
            "Dataset metadata (may be incomplete): modality: {modality}; plane: {plane}; "
            "level: {level}; body region: {body_region}; annotated structures in this slice: "
            "{structures}.\nWrite the caption for this slice."
        ),
    ),
    FALLBACK_PROMPT_VERSION: PromptTemplate(
        version=FALLBACK_PROMPT_VERSION,
        system=(
            "You help build an educational anatomy dataset from de-identified, publicly "
            "available research scans. This is not a request for medical advice or a "
            "diagnosis. Describe, in neutral textbook language, the anatomical structures "
            "visible in the image and the plane and level of the cut. Answer with one plain "
            "paragraph of 2-3 sentences."
        ),
        user=(
            "Known from the dataset: {modality} image, {plane} plane, {level} level, body "
            "region {body_region}, labelled structures: {structures}.\n"
            "Describe the visible anatomy."
        ),
    ),
}

# Position along the plane's normal increases toward R, A, S (see the manifest contract).
_POSITION_WORDS: dict[str, tuple[str, str, str]] = {
    "axial": ("lower", "mid", "upper"),
    "coronal": ("posterior", "central", "anterior"),
    "sagittal": ("left", "midline", "right"),
}


def position_word(plane: str, position: float | None) -> str:
    """Coarse level of a slice in words, e.g. axial 0.8 -> "upper"."""
    words = _POSITION_WORDS.get(plane, ("first third", "middle third", "last third"))
    if position is None:
        return "unknown"
    p = min(max(float(position), 0.0), 1.0)
    return words[0] if p < 1 / 3 else words[1] if p < 2 / 3 else words[2]


def structure_names(labels: list[str] | None) -> list[str]:
    """Readable, de-duplicated structure names ("right_kidney" -> "right kidney")."""
    out: list[str] = []
    for label in labels or []:
        name = str(label).replace("_", " ").strip().lower()
        if name and name not in ("background", "bg") and name not in out:
            out.append(name)
    return out


def context_fields(context: dict[str, Any]) -> dict[str, str]:
    """The coarse, PHI-free values a template may use; nothing else reaches a prompt."""
    plane = str(context.get("plane") or "unknown")
    structures = structure_names(context.get("labels_present"))
    return {
        "modality": str(context.get("modality") or "unknown"),
        "plane": plane,
        "level": position_word(plane, context.get("position")),
        "body_region": str(context.get("body_region") or "unknown"),
        "structures": ", ".join(structures) if structures else "none annotated",
    }


def prompt_texts(context: dict[str, Any], version: str = PROMPT_VERSION) -> tuple[str, str]:
    """(system, user) texts of a template rendered for one slice."""
    template = TEMPLATES[version]
    return template.system, template.user.format(**context_fields(context))


def prompt_digest(context: dict[str, Any], version: str = PROMPT_VERSION) -> str:
    """sha256 of the rendered prompt text: the cache key covers what was actually asked."""
    return _digest(version, tuple(sorted(context_fields(context).items())))


@functools.lru_cache(maxsize=4096)
def _digest(version: str, fields: tuple[tuple[str, str], ...]) -> str:
    # Coarse contexts repeat across thousands of slices; rendering once each keeps a rerun
    # over 50,000 cached rows fast.
    template = TEMPLATES[version]
    user = template.user.format(**dict(fields))
    return hashlib.sha256(json.dumps([version, template.system, user]).encode()).hexdigest()


def build_messages(
    req: Any, image_bytes: bytes, detail: str = "low", *, version: str = PROMPT_VERSION
) -> list[dict[str, Any]]:
    """Chat-completions messages for one slice: system text, then user text plus the PNG.

    Args:
        req: a ``CaptionRequest`` (only ``req.context`` is read; no ids or paths).
        image_bytes: the PNG file bytes.
        detail: "low", "high" or "auto" (OpenAI image detail).
        version: prompt template version.
    """
    system, user = prompt_texts(req.context, version)
    url = "data:image/png;base64," + base64.b64encode(image_bytes).decode("ascii")
    return [
        {"role": "system", "content": system},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": user},
                {"type": "image_url", "image_url": {"url": url, "detail": detail}},
            ],
        },
    ]


def text_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text (not image) in a message list, for token estimates."""
    total = 0
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            total += len(content)
        else:
            total += sum(len(part.get("text", "")) for part in content if part["type"] == "text")
    return total
