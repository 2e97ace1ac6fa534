"""Versioned caption prompts in chat-completions format.

A prompt sees the slice pixels plus coarse context only (modality, plane, position in words,
body region, structures from ground-truth labels). Never file paths, ids or PHI. Changing a
template's wording means a new version string: the version is part of the cache key.

``--context`` says which ground truth a prompt carries: ``labels`` (everything above, the
default), ``metadata`` (no label structures, so captions are independent of the labels) or
``none`` (the image alone). Each level has its own built-in templates (and versions).
``--prompt-file`` replaces the primary template with the user's (``load_prompt_file``): its
version is "file-" plus the hash of the file, so editing it never reuses an old answer.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_VERSION = "v1"
FALLBACK_PROMPT_VERSION = "v1-fallback"  # used by --retry-refused
CONTEXTS = ("labels", "metadata", "none")
# The context fields each --context level lets a prompt (and the offline captioner) see.
CONTEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "labels": ("modality", "plane", "level", "body_region", "structures"),
    "metadata": ("modality", "plane", "level", "body_region"),
    "none": (),
}


@dataclass(frozen=True)
class PromptTemplate:
    """One versioned prompt: a system message and a user text template."""

    version: str
    system: str
    user: str  # formatted with the keys of ``context_fields``


_SYSTEM = (
    "You are an experienced radiologist writing captions for a de-identified research "
    "dataset of 2D slices cut from 3D CT and MRI volumes. Describe only what is visible: "
    "the imaging plane and modality, the anatomical level, the main organs and "
    "structures, and any obvious abnormality. Do not guess patient identity or history. "
    "Answer with one plain paragraph of 2-4 sentences, without preamble."
)
_FALLBACK_SYSTEM = (
    "You help build an educational anatomy dataset from de-identified, publicly "
    "available research scans. This is not a request for medical advice or a "
    "diagnosis. Describe, in neutral textbook language, the anatomical structures "
    "visible in the image and the plane and level of the cut. Answer with one plain "
    "paragraph of 2-3 sentences."
)
TEMPLATES: dict[str, PromptTemplate] = {
    t.version: t for t in (
        PromptTemplate(PROMPT_VERSION, _SYSTEM, (
            "Dataset metadata (may be incomplete): modality: {modality}; plane: {plane}; "
            "level: {level}; body region: {body_region}; annotated structures in this slice: "
            "{structures}.\nWrite the caption for this slice.")),
        PromptTemplate(FALLBACK_PROMPT_VERSION, _FALLBACK_SYSTEM, (
            "Known from the dataset: {modality} image, {plane} plane, {level} level, body "
            "region {body_region}, labelled structures: {structures}.\n"
            "Describe the visible anatomy.")),
        PromptTemplate("v1-metadata", _SYSTEM, (
            "Dataset metadata (may be incomplete): modality: {modality}; plane: {plane}; "
            "level: {level}; body region: {body_region}.\nWrite the caption for this slice.")),
        PromptTemplate("v1-fallback-metadata", _FALLBACK_SYSTEM, (
            "Known from the dataset: {modality} image, {plane} plane, {level} level, body "
            "region {body_region}.\nDescribe the visible anatomy.")),
        PromptTemplate("v1-none", _SYSTEM, "Write the caption for this slice."),
        PromptTemplate("v1-fallback-none", _FALLBACK_SYSTEM, "Describe the visible anatomy."),
    )
}


def builtin_version(context: str = "labels", fallback: bool = False) -> str:
    """The built-in template version for a --context level (primary or fallback)."""
    base = FALLBACK_PROMPT_VERSION if fallback else PROMPT_VERSION
    return base if context == "labels" else f"{base}-{context}"


def load_prompt_file(path: str | Path, context: str = "labels") -> PromptTemplate:
    """The user's template from ``--prompt-file``: an optional system message, a line ``---``,
    then the user text (without ``---`` the whole file is the user text and the built-in system
    message is kept). Placeholders: those of ``CONTEXT_FIELDS[context]``.

    Raises:
        ValueError: one line naming the file and the fault (unreadable, empty, unknown
            placeholder, or one the --context level leaves out).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the prompt file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the prompt file is not UTF-8 text") from None
    lines = text.splitlines()
    if "---" in (line.strip() for line in lines):
        cut = [line.strip() for line in lines].index("---")
        system, user = "\n".join(lines[:cut]).strip(), "\n".join(lines[cut + 1:]).strip()
    else:
        system, user = _SYSTEM, text.strip()
    if not user or not system:
        raise ValueError(f"{path}: the prompt file has an empty {'system' if user else 'user'} part")
    allowed = CONTEXT_FIELDS[context]
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(user) if name is not None]
    except ValueError as exc:
        raise ValueError(f"{path}: bad placeholder syntax ({exc}); write literal braces as {{{{ }}}}") from None
    for name in names:
        if name not in CONTEXT_FIELDS["labels"]:
            raise ValueError(f"{path}: unknown placeholder {{{name}}}; known: "
                             + ", ".join("{" + f + "}" for f in CONTEXT_FIELDS["labels"]))
        if name not in allowed:
            raise ValueError(f"{path}: uses {{{name}}}, which --context {context} leaves out")
    return PromptTemplate("file-" + hashlib.sha256(raw).hexdigest()[:16], system, user)


def visible_context(context: dict[str, Any], level: str) -> dict[str, Any]:
    """The part of a slice's context that a --context level lets through (labels: all of it)."""
    if level == "labels":
        return context
    if level == "metadata":
        return {k: v for k, v in context.items() if k not in ("labels_present", "label_regions")}
    return {}


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


def template_of(version: str | PromptTemplate) -> PromptTemplate:
    """A template object, from itself or a built-in version string."""
    return version if isinstance(version, PromptTemplate) else TEMPLATES[version]


def prompt_texts(context: dict[str, Any], version: str | PromptTemplate = PROMPT_VERSION) -> tuple[str, str]:
    """(system, user) texts of a template rendered for one slice."""
    template = template_of(version)
    return template.system, template.user.format(**context_fields(context))


def prompt_digest(context: dict[str, Any], version: str | PromptTemplate = PROMPT_VERSION) -> str:
    """sha256 of the rendered prompt text: the cache key covers what was actually asked."""
    return _digest(template_of(version), tuple(sorted(context_fields(context).items())))


@functools.lru_cache(maxsize=4096)
def _digest(template: PromptTemplate, fields: tuple[tuple[str, str], ...]) -> str:
    # Coarse contexts repeat across thousands of slices; rendering once each keeps a rerun
    # over 50,000 cached rows fast.
    user = template.user.format(**dict(fields))
    return hashlib.sha256(json.dumps([template.version, template.system, user]).encode()).hexdigest()


def build_messages(
    req: Any, image_bytes: bytes, detail: str = "low", *, version: str | PromptTemplate = PROMPT_VERSION
) -> list[dict[str, Any]]:
    """Chat-completions messages for one slice: system text, then user text plus the PNG.

    Args:
        req: a ``CaptionRequest`` (only ``req.context`` is read; no ids or paths).
        image_bytes: the PNG file bytes.
        detail: "low", "high" or "auto" (OpenAI image detail).
        version: prompt template (or a built-in version string).
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
