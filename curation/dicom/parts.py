"""Parts of a DICOM series: what tells its images apart at one position, and which to keep.

A series may hold several volumes at the same positions: magnitude and phase (ImageType),
echoes, diffusion b-values and directions, ASL label/control, time points, and in enhanced
multi-frame objects per-frame functional groups (stack, frame type, echo time, diffusion,
temporal position). Each part gets a readable label (``echo2``, ``phase``, ``b1000-dir07``,
``t012``). Images still repeated at a position after that are taken in acquisition order as
time points. `--series-parts` (``all | first | anatomical``) decides which parts become volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from pydicom.dataset import Dataset

from curation.dicom.header import (
    GE_B,
    GE_DIR,
    PHILIPS_B,
    PHILIPS_DIR,
    SIEMENS_B,
    SIEMENS_DIR,
    FrameKey,
    Header,
    lookup,
    per_frame_item,
    private_floats,
    shared_item,
    text,
)

COMPONENTS = ("stack", "type", "echo", "b", "dir", "asl", "t")
TIME_LIKE = ("b", "dir", "asl", "t", "rep")  # a series split along these is a time series
POLICIES = ("all", "first", "anatomical")
ORIENTATION_ATOL = 1e-3  # direction cosines that differ by less are the same orientation
SAME_POSITION_MM = 0.01
# ImageType / FrameType tokens -> readable part names (vendors' short forms included)
TYPE_NAMES = {"M": "magnitude", "P": "phase", "R": "real", "I": "imaginary", "MAGNITUDE": "magnitude",
              "PHASE": "phase", "REAL": "real", "IMAGINARY": "imaginary", "W": "water", "F": "fat",
              "WATER": "water", "FAT": "fat", "IP": "in", "OP": "opp", "IN_PHASE": "in", "OUT_PHASE": "opp",
              "B0": "fieldmap", "FIELD_MAP": "fieldmap", "FM": "fieldmap"}

Unit = tuple[int, FrameKey]  # (index of the file's Header, one frame of it)


class Part(NamedTuple):
    """One volume's worth of a series: its label, its frames, and its place in time."""

    label: str
    units: list[Unit]
    time: tuple  # b-value, direction, ASL context, temporal position, repeat: first is smallest


def _number(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value or "").strip()
    return f"{v:g}" if np.isfinite(v) else ""


def _nested(item: Dataset | None, keyword: str) -> Any:
    """``keyword`` in ``item`` or one sequence level below it (per-frame macros)."""
    if item is None:
        return None
    if keyword in item:
        return item[keyword].value
    for elem in item:
        if elem.VR == "SQ" and elem.value:
            inner = elem.value[0]
            if keyword in inner and inner[keyword].value not in (None, ""):
                return inner[keyword].value
    return None


def _diffusion(ds: Dataset, groups: list[Dataset | None]) -> tuple[str, str]:
    b = lookup(ds, groups, "MRDiffusionSequence", "DiffusionBValue")
    direction = None
    for group in groups:
        seq = group.get("MRDiffusionSequence") if group is not None else None
        if seq:
            inner = seq[0].get("DiffusionGradientDirectionSequence")
            if inner and "DiffusionGradientOrientation" in inner[0]:
                direction = list(inner[0].DiffusionGradientOrientation)
                break
    if b is None:
        for tag, fmt in ((SIEMENS_B, "<f8"), (PHILIPS_B, "<f4"), (GE_B, "<f8")):
            value = private_floats(ds, tag, 1, fmt)
            if value is not None:
                b = value[0] % 1e5 if tag == GE_B else value[0]  # GE adds 1e9 to flag its b-values
                break
    if direction is None:
        direction = private_floats(ds, SIEMENS_DIR, 3)
        for tags, fmt in ((PHILIPS_DIR, "<f4"), (GE_DIR, "<f8")):
            if direction is None:
                values = [private_floats(ds, t, 1, fmt) for t in tags]
                direction = None if any(v is None for v in values) else [v[0] for v in values]
    b_text = _number(b) if b is not None else ""
    if not b_text or float(b_text) == 0 or direction is None or not np.any(np.abs(direction) > 1e-6):
        return b_text, ""
    return b_text, ",".join(f"{float(v):.3f}" for v in direction)


def frame_parts(ds: Dataset, frame: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(values of COMPONENTS, acquisition order) of one frame of ``ds``."""
    per, shared = per_frame_item(ds, frame), shared_item(ds)
    groups = [per, shared]
    stack = lookup(ds, [per], "FrameContentSequence", "StackID") if per is not None else None
    frame_type = None
    for seq in ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence"):
        frame_type = lookup(ds, groups, seq, "FrameType") if frame_type is None else frame_type
    image_type = list(frame_type or ds.get("ImageType") or [])
    complex_part = _nested(per, "ComplexImageComponent") or _nested(shared, "ComplexImageComponent")
    if complex_part and str(complex_part).upper() not in image_type:
        image_type.append(str(complex_part))
    echo = lookup(ds, groups, "MREchoSequence", "EffectiveEchoTime")
    if echo is None:
        echo = ds.get("EchoNumbers")
    b, direction = _diffusion(ds, groups)
    asl = _nested(per, "ASLContext") or _nested(shared, "ASLContext") or ds.get("ASLContext")
    if per is not None and "FrameContentSequence" in per:
        temporal = lookup(ds, [per], "FrameContentSequence", "TemporalPositionIndex")
    else:
        temporal = ds.get("TemporalPositionIdentifier")
    parts = (str(stack or "").strip(), "\\".join(str(v).strip().upper() for v in image_type),
             _number(echo) if echo is not None else "", b, direction, str(asl or "").strip().lower(),
             _number(temporal) if temporal is not None else "")
    trigger = lookup(ds, groups, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")
    if trigger is None:
        trigger = ds.get("TriggerTime")
    order = tuple(_float(v) for v in (ds.get("AcquisitionNumber"), trigger,
                                      text(ds, "AcquisitionTime"), ds.get("InstanceNumber"), frame))
    return parts, order


def _float(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if np.isfinite(v) else 0.0


def _same_orientation(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    return a == b or (
        a is not None and b is not None and np.allclose(a, b, atol=ORIENTATION_ATOL))


def _by_geometry(headers: Sequence[Header], units: list[Unit]) -> list[list[Unit]]:
    """Units grouped by image size and orientation, in first-seen order."""
    groups: list[list[Unit]] = []
    for unit in units:
        size, orientation = headers[unit[0]].size, unit[1].orientation
        for group in groups:
            first = group[0]
            if headers[first[0]].size == size and _same_orientation(first[1].orientation, orientation):
                group.append(unit)
                break
        else:
            groups.append([unit])
    return groups


def _repeats(units: list[Unit]) -> list[int] | None:
    """Acquisition rank of each unit among those at its position; None when none repeat."""
    if any(u[1].position is None or u[1].orientation is None for u in units):
        return None
    iop = np.array(units[0][1].orientation)
    normal = np.cross(iop[:3], iop[3:])
    along = np.array([np.dot(u[1].position, normal) for u in units])
    slots = np.round(along / SAME_POSITION_MM).astype(np.int64)
    if len(np.unique(slots)) == len(slots):
        return None
    ranks = [0] * len(units)
    by_slot: dict[int, list[int]] = {}
    for n, slot in enumerate(slots):
        by_slot.setdefault(int(slot), []).append(n)
    for members in by_slot.values():
        for rank, n in enumerate(sorted(members, key=lambda n: units[n][1].order)):
            ranks[n] = rank
    return ranks


def _sort_value(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def split_parts(headers: Sequence[Header], units: list[Unit]) -> list[Part]:
    """The parts of one series in a stable order; the label is "" when there is one part."""
    keyed: dict[tuple, list[Unit]] = {}
    for g, group in enumerate(_by_geometry(headers, units)):
        by_parts: dict[tuple[str, ...], list[Unit]] = {}
        for unit in group:
            by_parts.setdefault(unit[1].parts, []).append(unit)
        for parts, members in by_parts.items():
            ranks = _repeats(members)
            for unit, rank in zip(members, ranks or [0] * len(members)):
                keyed.setdefault((g, *parts, rank), []).append(unit)
    # diffusion directions are numbered in acquisition order (as scanners list them)
    seen: dict[str, tuple] = {}
    for unit in units:
        d = unit[1].parts[COMPONENTS.index("dir")]
        seen[d] = min(seen.get(d, unit[1].order), unit[1].order)
    # ties (no acquisition number or time) fall back to the direction text: never to set order
    directions = sorted(set(seen) - {""}, key=lambda d: (seen[d], d))
    at_dir = 1 + COMPONENTS.index("dir")

    def order(k: tuple) -> tuple:
        values = [(0, directions.index(v) + 1.0, "") if i == at_dir and v else _sort_value(v)
                  for i, v in enumerate(k[1:-1], start=1)]
        return (k[0], *values, k[-1])

    keys = sorted(keyed, key=order)
    labels = _labels(keys, directions)
    at = {c: 1 + COMPONENTS.index(c) for c in ("b", "dir", "asl", "t")}
    return [Part(label, keyed[k], (_sort_value(k[at["b"]]), k[at["dir"]], k[at["asl"]], _sort_value(k[at["t"]]), k[-1]))
            for label, k in zip(labels, keys)]


def _labels(keys: list[tuple], directions: list[str]) -> list[str]:
    """Readable labels from the components that vary among the parts."""
    names = ("geom", *COMPONENTS, "rep")
    columns = list(zip(*keys)) if keys else []
    varying = [i for i, col in enumerate(columns) if len(set(col)) > 1]
    t_varies = names.index("t") in varying
    types = [set(k[names.index("type")].split("\\")) for k in keys]
    common = set.intersection(*types) if types else set()
    echoes = sorted({k[names.index("echo")] for k in keys}, key=_sort_value)
    out = []
    for key in keys:
        words = []
        for i in varying:
            name, value = names[i], key[i]
            if name == "geom":
                words.append(f"geom{value + 1}")
            elif name == "stack":
                words.append(f"stack{value}")
            elif name == "type":
                own = [t for t in value.split("\\") if t and t not in common]
                words.append("-".join(dict.fromkeys(TYPE_NAMES.get(t, t.lower()) for t in own)) or "type")
            elif name == "echo":
                words.append(f"echo{echoes.index(value) + 1}")
            elif name == "b":
                words.append(f"b{value}" if value else "")
            elif name == "dir":
                words.append(f"dir{directions.index(value) + 1:02d}" if value else "")
            elif name == "t":
                words.append(f"t{int(float(value)):03d}" if _sort_value(value)[0] == 0 else f"t{value}")
            elif name == "rep":
                words.append(f"rep{value + 1}" if t_varies else f"t{value + 1:03d}")
            else:
                words.append(str(value))
        out.append("-".join(w for w in words if w))
    return out


def choose_parts(parts: list[Part], policy: str) -> list[int]:
    """Indexes of the parts that become volumes under ``policy`` (all | first | anatomical).

    ``anatomical`` keeps every part of a series split by geometry, stack, image type or echo
    (3D anatomical, multi-echo, Dixon, magnitude/phase) and only the first time point of what
    varies over time or diffusion encoding (fMRI, DWI, perfusion, ASL, dynamic series).
    """
    if policy not in POLICIES:
        raise ValueError(f"series parts policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if policy == "all" or len(parts) <= 1:
        return list(range(len(parts)))
    if policy == "first":
        return [0]
    first = min(p.time for p in parts)
    return [n for n, p in enumerate(parts) if p.time == first]
