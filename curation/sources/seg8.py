"""The ``3dseg8`` adapter: every layout the Med3D 3DSeg-8 collection is assembled from (MSD task
folders, LiTS-style files, BraTS-style case folders, MedicalNet list files and ``images/`` +
``label/`` folders), and anything else by the ``nifti`` rules; each image file is used once."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from curation.imageio.files import regular_fault
from curation.privacy.scrub import one_line
from curation.sources.modality import known_subset
from curation.sources.nifti import (
    LABEL_DIRS,
    Problems,
    _guarded,
    _inside,
    _nifti_files,
    _stem,
    label_for,
    msd_task,
    nifti_folder,
)
from curation.sources.tree import Tree
from curation.sources.volume_spec import VolumeSpec, root_relative

LITS_LABELS = {"1": "liver", "2": "liver tumour"}
BRATS_LABELS = {"1": "necrotic tumour core", "2": "peritumoral edema", "3": "enhancing tumour", "4": "enhancing tumour"}
BRATS_CHANNELS = ["flair", "t1", "t1ce", "t2"]


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def _lits(root: Path, skip: set[Path], tree: Tree) -> list[VolumeSpec]:
    specs = []
    for img in tree.glob("volume-*.nii*"):
        if img.resolve() in skip or img.name.startswith("._"):
            continue
        num = re.sub(r"^volume-", "", _stem(img))
        lab = None
        for cand in tree.in_folder(img.parent, f"segmentation-{num}.nii*"):
            lab = cand
        subset = "LiTS"
        specs.append(
            VolumeSpec(
                dataset="3dseg8",
                subset=subset,
                case_key=f"volume-{num}",
                source=img.resolve(),
                label=lab.resolve() if lab else None,
                modality="CT",
                body_region="abdomen",
                channel=0,
                label_names=dict(LITS_LABELS),
                rel_path=root_relative(img, root),
            )
        )
    return specs


def _brats(root: Path, skip: set[Path], tree: Tree) -> list[VolumeSpec]:
    specs = []
    for seg in tree.glob("*_seg.nii*"):
        case_dir = seg.parent
        case = case_dir.name
        subset = case_dir.parent.name or "BraTS"
        for ch, mod in enumerate(BRATS_CHANNELS):
            files = [p for p in tree.in_folder(case_dir, f"*_{mod}.nii*") if not p.name.startswith("._")]
            if not files or files[0].resolve() in skip:
                continue
            img = files[0]
            specs.append(
                VolumeSpec(
                    dataset="3dseg8",
                    subset=subset if "brats" in subset.lower() else "BraTS",
                    case_key=case,
                    source=img.resolve(),
                    label=seg.resolve(),
                    modality="MR",
                    body_region="brain",
                    channel=ch,
                    channel_names={str(ch): mod.upper()},
                    label_names=dict(BRATS_LABELS),
                    rel_path=root_relative(img, root),
                )
            )
    return specs


def _list_files(root: Path, skip: set[Path], problems: Problems, tree: Tree) -> list[VolumeSpec]:
    """MedicalNet-style list files: one ``image_path label_path`` line per case. An entry that
    leads outside ``root`` is refused, and no later finder may take it up (it joins ``skip``)."""
    specs = []
    for txt in tree.in_folder(root, "*.txt"):
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append((txt, f"unreadable list file ({type(exc).__name__}); skipped"))
            continue
        for n, line in enumerate(lines, start=1):
            parts = line.split()
            if not parts or not parts[0].lower().endswith((".nii", ".nii.gz")):
                continue
            if len(parts) > 2 or (len(parts) == 2 and not parts[1].lower().endswith((".nii", ".nii.gz"))):
                problems.append((txt, f"line {n}: expected 'image.nii.gz [label.nii.gz]', got {one_line(line, 120)}; skipped"))
                continue
            outside = [p for p in parts if not _inside(root / p, root)]
            if outside:
                problems.append((txt, f"line {n}: {one_line(outside[0], 200)} resolves outside --root; refused"))
                for p in parts:
                    skip |= {root / p, _resolved(root / p)}
                continue
            img = (root / parts[0]).resolve()
            if img in skip:
                continue
            skip.add(img)
            lab = (root / parts[1]).resolve() if len(parts) > 1 else None
            subset = Path(parts[0]).parts[0] if len(Path(parts[0]).parts) > 1 else txt.stem
            mod, region = known_subset(subset)
            spec = VolumeSpec(
                dataset="3dseg8",
                subset=subset,
                case_key=_stem(img),
                source=img,
                label=lab,
                modality=mod,
                body_region=region,
                channel=None,
                rel_path=root_relative(img, root),
            )
            fault = regular_fault(img)
            if fault:
                spec.error = f"{img}: listed in {txt.name} line {n} but {fault}"
            elif lab is not None and os.path.lexists(lab) and regular_fault(lab):
                spec.label, spec.note = None, f"{lab}: listed label is {regular_fault(lab)}; image sliced without labels"
            specs.append(spec)
    return specs


def _image_label_folders(root: Path, skip: set[Path], tree: Tree) -> list[VolumeSpec]:
    """Sub-dataset folders with ``images/`` and ``label(s)/`` (MedicalNet's data layout)."""
    specs = []
    for images in tree.folders_named("images"):
        subset = images.parent.name
        mod, region = known_subset(subset)
        label_roots = [images.parent / d for d in LABEL_DIRS]
        for img in _nifti_files(images, tree):
            if img.resolve() in skip:
                continue
            skip.add(img.resolve())
            specs.append(
                VolumeSpec(
                    dataset="3dseg8",
                    subset=subset,
                    case_key=_stem(img),
                    source=img.resolve(),
                    label=label_for(img, label_roots, tree),
                    modality=mod,
                    body_region=region,
                    channel=None,
                    rel_path=root_relative(img, root),
                )
            )
    return specs


def seg8(root: Path, problems: Problems | None = None) -> list[VolumeSpec]:
    """Discover every 3DSeg-8 layout under ``root``; each image file is used once.

    A collection that cannot be read is one line in ``problems``; the others go on.
    """
    problems = problems if problems is not None else []
    tree = Tree(root, problems)
    specs: list[VolumeSpec] = []
    with_images = {p.parent for p in tree.folders_named("imagesTr")}
    task_dirs = sorted({p.parent for p in tree.glob("dataset.json")} | with_images)
    task_dirs = [d for d in task_dirs if d in with_images]
    for task in task_dirs:
        specs.extend(_guarded(task / "dataset.json", problems, lambda: msd_task(task, root, "3dseg8", problems, tree)))
    skip = {s.source.resolve() for s in specs}
    task_roots = [d.resolve() for d in task_dirs]

    def outside_tasks(spec: VolumeSpec) -> bool:
        return not any(str(spec.source).startswith(str(t) + "/") for t in task_roots)

    finders: list[Callable[[], list[VolumeSpec]]] = [
        lambda: _list_files(root, skip, problems, tree), lambda: _lits(root, skip, tree),
        lambda: _brats(root, skip, tree), lambda: _image_label_folders(root, skip, tree),
    ]
    for finder in finders:
        found = [s for s in _guarded(root, problems, finder) if outside_tasks(s)]
        skip |= {s.source.resolve() for s in found}
        specs.extend(found)
    # Anything else (e.g. KiTS case folders): the generic NIfTI rules, one subset per top folder.
    rest = [
        s for s in _guarded(root, problems, lambda: nifti_folder(root, dataset="3dseg8", top_level_subsets=True, tree=tree))
        if s.source not in skip and s.source.resolve() not in skip and outside_tasks(s)
    ]
    specs.extend(rest)
    return specs
