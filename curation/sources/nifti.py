"""The ``msd`` (one Decathlon task folder) and ``nifti`` (any folder of NIfTI files) adapters,
and the helpers the 3DSeg-8 adapter shares. Files come from a `Tree` (walked once, safely:
links out of the root, FIFOs and undecodable names are set aside with one line each)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curation.imageio.files import regular_fault
from curation.imageio.volume_io import is_nifti_path
from curation.privacy.scrub import one_line
from curation.sources.modality import known_subset, normalise_modality
from curation.sources.tree import Tree
from curation.sources.volume_spec import VolumeSpec, root_relative

LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_gt", "-seg", "-label")
MAX_IMAGES_PER_CASE_FOLDER = 8  # a folder with more images is a flat image folder, not one case
GENERIC_STEMS = {
    "imaging", "image", "img", "ct", "mr", "mri", "t1", "t1w", "t1ce", "t1gd", "t1c", "t2", "t2w",
    "flair", "pd", "dwi", "adc", "volume", "scan", "data",
}
LABEL_DIRS = ("labelsTr", "labels", "label", "masks", "mask", "segmentations", "seg")


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".mgz", ".mgh", ".img"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _nifti_files(folder: Path, tree: Tree) -> list[Path]:
    return [p for p in tree.in_folder(folder) if is_nifti_path(p)]


# --------------------------------------------------------------------------- MSD


Problems = list[tuple[Path, str]]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def _read_description(info_path: Path, problems: Problems) -> dict[str, Any]:
    """dataset.json as a dict; anything else is one line and an empty description."""
    if not os.path.lexists(info_path):
        return {}
    fault = regular_fault(info_path)
    if fault:
        problems.append((info_path, f"dataset.json is {fault}; using the imagesTr/labelsTr folders"))
        return {}
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append((info_path, f"unreadable dataset.json ({type(exc).__name__}: {one_line(exc, 160)}); "
                                    "using the imagesTr/labelsTr folders"))
        return {}
    if not isinstance(info, dict):
        problems.append((info_path, f"dataset.json holds a JSON {type(info).__name__}, not an object; "
                                    "using the imagesTr/labelsTr folders"))
        return {}
    return info


def _names(info: dict[str, Any], key: str, info_path: Path, problems: Problems) -> dict[str, str]:
    """A {"0": "CT", ...} field of dataset.json; a wrong type is one line and no names."""
    value = info.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float)) for v in value.values()):
        problems.append((info_path, f"dataset.json field {key!r} should map numbers to names, "
                                    f"got {type(value).__name__}; ignored"))
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _listed_path(task_dir: Path, value: Any, where: str, info_path: Path, root: Path, problems: Problems) -> Path | None:
    """A path listed in dataset.json, if it is a string that stays under ``root``."""
    if not isinstance(value, str) or not value.strip():
        problems.append((info_path, f"{where}: expected a file path, got {type(value).__name__}; entry skipped"))
        return None
    path = task_dir / value
    if not _inside(path, root):
        problems.append((info_path, f"{where}: {one_line(value, 200)} resolves outside --root; refused"))
        return None
    fault = regular_fault(path) if os.path.lexists(path) else ""
    if fault:
        problems.append((info_path, f"{where}: {one_line(value, 200)} is {fault}; refused"))
        return None
    return path.resolve()


def msd_task(task_dir: Path, root: Path, dataset: str = "msd", problems: Problems | None = None,
             tree: Tree | None = None) -> list[VolumeSpec]:
    """A Medical Segmentation Decathlon task folder (imagesTr, labelsTr, dataset.json).

    A malformed dataset.json (wrong types, null, paths leaving ``root``) gives one line per
    fault in ``problems``; the task falls back to its folders where the list is unusable.
    ``tree``: the files under ``root`` (walked here when not given).
    """
    problems = problems if problems is not None else []
    tree = tree if tree is not None else Tree(root, problems)
    info_path = task_dir / "dataset.json"
    info = _read_description(info_path, problems)
    subset = task_dir.name
    channel_names = _names(info, "modality", info_path, problems) or _names(info, "channel_names", info_path, problems)
    modality = None
    for v in channel_names.values():
        modality = normalise_modality(v) or modality
    known_mod, region = known_subset(subset)
    modality = modality or known_mod
    labels = {k: v for k, v in _names(info, "labels", info_path, problems).items() if k != "0"}
    labels = {k: v for k, v in labels.items() if v.lower() != "background"}

    pairs: list[tuple[Path, Path | None]] = []
    listed = info.get("training")
    if listed is not None and not isinstance(listed, list):
        problems.append((info_path, f"dataset.json field 'training' should be a list, got {type(listed).__name__}; "
                                    "using the imagesTr/labelsTr folders"))
        listed = None
    if listed:
        for n, item in enumerate(listed):
            if not isinstance(item, dict):
                problems.append((info_path, f"training[{n}]: expected an object with image/label, "
                                            f"got {type(item).__name__}; entry skipped"))
                continue
            img = _listed_path(task_dir, item.get("image"), f"training[{n}].image", info_path, root, problems)
            if img is None:
                continue
            lab = None
            if item.get("label") is not None:
                lab = _listed_path(task_dir, item.get("label"), f"training[{n}].label", info_path, root, problems)
            pairs.append((img, lab))
    else:
        label_dir = task_dir / "labelsTr"
        for img in _nifti_files(task_dir / "imagesTr", tree):
            lab = _msd_label_for(img, label_dir, tree)
            pairs.append((img.resolve(), lab.resolve() if lab else None))
    seen = {p for p, _ in pairs}
    special = [] if listed else tree.take_special(task_dir / "imagesTr", is_nifti_path)
    special += tree.take_special(task_dir / "imagesTs", is_nifti_path)
    for img in _nifti_files(task_dir / "imagesTs", tree):
        if img.resolve() not in seen:
            pairs.append((img.resolve(), None))

    specs = []
    for img, lab in pairs:
        stem = re.sub(r"_0000$", "", _stem(img))
        multi = len(channel_names) > 1
        specs.append(
            VolumeSpec(
                dataset=dataset,
                subset=subset,
                case_key=stem,
                source=img,
                label=lab,
                modality=modality,
                body_region=region,
                channel=None if multi else 0,
                channel_names=channel_names,
                label_names=labels,
                rel_path=root_relative(img, root),
            )
        )
    specs += [_unreadable(dataset, subset, path, root, fault) for path, fault in special]
    return specs


def _subset_of(img: Path, root: Path, top_level_subsets: bool) -> str:
    first = img.relative_to(root).parts[0] if img.parent != root else root.name
    return first if top_level_subsets or known_subset(first) != (None, None) else root.name


def _parts_under(folder: Path, root: Path) -> tuple[str, ...]:
    try:
        return Path(folder).relative_to(root).parts
    except ValueError:
        return ()


def _unreadable(dataset: str, subset: str, path: Path, root: Path, fault: str) -> VolumeSpec:
    """The error row of a file found where a volume was expected that is no regular file (a
    FIFO, socket or device): named, recorded, never opened."""
    return VolumeSpec(dataset=dataset, subset=subset, case_key=_stem(path), source=path, channel=0,
                      rel_path=root_relative(path, root), error=f"{path}: image file is {fault}")


def _msd_label_for(img: Path, label_dir: Path, tree: Tree) -> Path | None:
    """nnU-Net style images end in _0000; their labels do not."""
    for name in (img.name, re.sub(r"_0000(\.nii(\.gz)?)$", r"\1", img.name)):
        cand = label_dir / name
        if tree.has(cand):
            return cand
    return None


# --------------------------------------------------------------------------- nifti folder


def label_for(img: Path, label_roots: list[Path], tree: Tree | None = None) -> Path | None:
    """The label file of ``img`` in ``label_roots`` (a usable file of ``tree``, or a regular
    file where no tree is given)."""
    stem = _stem(img)
    for root in label_roots:
        for cand_stem in (stem, re.sub(r"_0000$", "", stem)):
            for suffix in ("", *LABEL_SUFFIXES):
                for ext in (".nii.gz", ".nii"):
                    cand = root / f"{cand_stem}{suffix}{ext}"
                    usable = tree.has(cand) if tree is not None else not regular_fault(cand)
                    if usable and cand.resolve() != img.resolve():
                        return cand
    return None


def _is_label_name(path: Path) -> bool:
    stem = _stem(path).lower()
    return stem.endswith(LABEL_SUFFIXES) or stem.startswith("segmentation")


def nifti_folder(
    root: Path, dataset: str = "nifti", label_root: Path | None = None, top_level_subsets: bool = False,
    tree: Tree | None = None, problems: Problems | None = None,
) -> list[VolumeSpec]:
    """Every NIfTI file under ``root`` (recursively); labels from a sibling label folder,
    ``--label-root``, or ``<stem>_seg``-style files beside the image. ``tree``: the files under
    ``root`` (walked here when not given; what it sets aside goes to ``problems``)."""
    tree = tree if tree is not None else Tree(root, problems)
    images = sorted(
        p
        for p in tree.files
        if is_nifti_path(p)
        and not _is_label_name(p)
        and not any(part in LABEL_DIRS for part in p.relative_to(root).parts[:-1])
    )
    per_folder: dict[Path, list[Path]] = {}
    for img in images:
        per_folder.setdefault(img.parent, []).append(img)

    def is_case_folder(folder: Path) -> bool:
        """One subject per folder: a single image, or images named by modality / folder name."""
        members = per_folder[folder]
        if folder == root or len(members) > MAX_IMAGES_PER_CASE_FOLDER:
            return False
        if len(members) == 1:
            return True
        stems = [_stem(m).lower() for m in members]
        return all(st in GENERIC_STEMS or st.startswith(folder.name.lower()) for st in stems)

    specs = []
    for folder in sorted({p.parent for p, _ in tree.problems}):
        if any(part in LABEL_DIRS for part in _parts_under(folder, root)):
            continue
        for path, fault in tree.take_special(folder, lambda p: is_nifti_path(p) and not _is_label_name(p)):
            specs.append(_unreadable(dataset, _subset_of(path, root, top_level_subsets), path, root, fault))
    for img in images:
        roots = [img.parent]
        if label_root is not None:
            roots.insert(0, label_root)
        for name in LABEL_DIRS:
            roots.append(img.parent.parent / name)
            roots.append(img.parent / name)
        case_folder = is_case_folder(img.parent)
        lab = label_for(img, roots, tree)
        if lab is None and case_folder and len(per_folder[img.parent]) == 1:
            # KiTS-style case folders: imaging.nii.gz + segmentation.nii.gz
            named = [p for p in tree.in_folder(img.parent) if is_nifti_path(p) and _is_label_name(p)]
            lab = named[0] if len(named) == 1 else None
        subset = _subset_of(img, root, top_level_subsets)
        mod, region = known_subset(subset)
        rel = img.relative_to(root)
        # one subject per case folder (all its modalities), else one per file
        case_key = rel.parent.as_posix() if case_folder else rel.with_name(_stem(img)).as_posix()
        specs.append(
            VolumeSpec(
                dataset=dataset,
                subset=subset,
                case_key=case_key,
                source=img,
                label=lab,
                modality=mod,
                body_region=region,
                channel=None,
                rel_path=root_relative(img, root),
            )
        )
    return specs


def _guarded(where: Path, problems: Problems, finder: Callable[[], list[VolumeSpec]]) -> list[VolumeSpec]:
    """Run one collection's discovery; a failure is one line naming it, never the end of the run."""
    try:
        return finder()
    except Exception as exc:  # a malformed collection must not stop the others
        problems.append((where, f"collection skipped ({type(exc).__name__}: {one_line(exc, 200)})"))
        return []
