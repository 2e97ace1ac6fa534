"""The offline captioner's vocabulary: modality and channel names with what they show,
position, size and side words. Every phrase is true of the slice by construction (it comes
from the manifest: modality, plane, position, the label map's geometry), never from pixels.
"""

from __future__ import annotations

import re

MODALITY_NAMES = {"CT": "CT", "MR": "MRI", "MRI": "MRI", "PT": "PET", "PET": "PET", "US": "ultrasound"}

# What a modality (or MR channel) shows, as textbook facts about the acquisition.
APPEARANCE = {
    "CT": ("bone appears bright and air dark", "dense structures such as bone appear bright",
           "attenuation shown in Hounsfield units, air dark and bone bright"),
    "MR": ("soft-tissue contrast from MR signal", "MR signal intensities in arbitrary units"),
    "PET": ("tracer uptake shown as intensity",),
}
# MR channel names (MSD / BraTS / nnU-Net spellings, lower-cased, non-letters dropped) ->
# (name in a caption, what it shows).
MR_CHANNELS = {
    "t1": ("T1-weighted", ("fat appears bright and fluid dark", "fluid such as CSF appears dark")),
    "t1w": ("T1-weighted", ("fat appears bright and fluid dark", "fluid such as CSF appears dark")),
    "t1gd": ("contrast-enhanced T1-weighted", ("enhancing tissue appears bright after gadolinium",)),
    "t1ce": ("contrast-enhanced T1-weighted", ("enhancing tissue appears bright after gadolinium",)),
    "t1c": ("contrast-enhanced T1-weighted", ("enhancing tissue appears bright after gadolinium",)),
    "t2": ("T2-weighted", ("fluid appears bright", "fluid such as CSF appears bright")),
    "t2w": ("T2-weighted", ("fluid appears bright", "fluid such as CSF appears bright")),
    "flair": ("FLAIR", ("free fluid is suppressed and appears dark", "oedema appears bright while CSF is dark")),
    "adc": ("ADC map", ("restricted diffusion appears dark",)),
    "dwi": ("diffusion-weighted", ("restricted diffusion appears bright",)),
    "pd": ("proton-density-weighted", ("contrast mainly from proton density",)),
}

# Position along the plane's normal (0..1, increasing toward R, A, S): the ends' names.
_ENDS = {"axial": ("inferior", "superior"), "coronal": ("posterior", "anterior"), "sagittal": ("left", "right")}


def modality_phrase(modality: str | None, channel_name: str | None) -> tuple[str, str, tuple[str, ...]]:
    """(modality word, channel words or "", appearance phrases) e.g. ("MRI", "T2-weighted", (...))."""
    mod = str(modality or "").upper()
    word = MODALITY_NAMES.get(mod, mod or "medical")
    key = re.sub(r"[^a-z0-9]", "", str(channel_name or "").lower())
    if mod in ("MR", "MRI") and key in MR_CHANNELS:
        channel, looks = MR_CHANNELS[key]
        return word, channel, looks
    if mod in ("MR", "MRI") and key and key not in ("mr", "mri", "0"):
        return word, f"{channel_name} channel", APPEARANCE["MR"]
    looks = APPEARANCE.get("MR" if mod in ("MR", "MRI") else mod, ())
    return word, "", looks


def position_phrase(plane: str, position: float | None) -> str:
    """Where the slice lies in the volume, e.g. "in the superior third of the volume (70% of the
    way from its inferior end)"."""
    if position is None:
        return ""
    lo, hi = _ENDS.get(plane, ("first", "last"))
    p = min(max(float(position), 0.0), 1.0)
    if p < 0.12:
        where = f"near the {lo} end of the volume"
    elif p < 1 / 3:
        where = f"in the {lo} third of the volume"
    elif p < 2 / 3:
        where = "through the middle of the volume" if plane != "sagittal" else "near the middle of the volume"
    elif p <= 0.88:
        where = f"in the {hi} third of the volume"
    else:
        where = f"near the {hi} end of the volume"
    return f"{where} ({round(p * 100)}% of the way from its {lo} end)"


def body_phrase(fraction: float | None) -> str:
    """How much of the field of view the body fills (the slice's body-mask fraction)."""
    if fraction is None:
        return ""
    f = float(fraction)
    share = f"{round(f * 100)}% of the field of view"
    if f < 0.15:
        return f"a small cross-section of the body ({share})"
    if f < 0.45:
        return f"a medium-sized cross-section of the body ({share})"
    return f"a large cross-section of the body ({share})"


def size_word(fraction: float) -> str:
    """Size of a structure's cut relative to the slice's body area."""
    if fraction < 0.01:
        return "tiny"
    if fraction < 0.05:
        return "small"
    if fraction < 0.2:
        return "medium-sized"
    return "large"


def area_text(area_mm2: float) -> str:
    """e.g. "about 40 mm²", "about 12 cm²" (two significant figures)."""
    if area_mm2 >= 1000:
        cm2 = area_mm2 / 100
        return f"about {float(f'{cm2:.2g}'):g} cm²"
    return f"about {float(f'{area_mm2:.2g}'):g} mm²"


def extent_phrase(peak: float) -> str:
    """Where along the structure the slice cuts it (its area over its largest along the plane)."""
    if peak >= 0.85:
        return "near its largest extent"
    if peak < 0.25:
        return "near one of its ends"
    return ""


def side_phrase(side: str | None, name: str) -> str:
    """" on the right" etc.; nothing when the name says the side already or it is unknown."""
    if not side or re.search(r"\b(left|right)\b", name):
        return ""
    return {"right": " on the patient's right", "left": " on the patient's left", "midline": " in the midline",
            "bilateral": " on both sides"}.get(side, "")


def join(names: list[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]
