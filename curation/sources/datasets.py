"""Dataset adapters: a root folder in, a deterministic list of volumes to process out.

``3dseg8`` discovers every layout the Med3D 3DSeg-8 collection is assembled from (MSD task
folders, LiTS-style files, BraTS-style case folders, MedicalNet list files and
``images/`` + ``label/`` folders); ``nifti`` is any folder of NIfTI files; ``dicom`` any tree
of DICOM series; ``msd`` one Decathlon task folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from curation.imageio.volume_io import is_nifti_path
from curation.privacy.scrub import one_line
from curation.sources.dicom_tree import dicom_tree, input_id
from curation.sources.modality import known_subset, normalise_modality
from curation.sources.volume_spec import NamedProblems, VolumeSpec, root_relative

LITS_LABELS = {"1": "liver", "2": "liver tumour"}
BRATS_LABELS = {"1": "necrotic tumour core", "2": "peritumoral edema", "3": "enhancing tumour", "4": "enhancing tumour"}
BRATS_CHANNELS = ["flair", "t1", "t1ce", "t2"]
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


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_path(p))


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
    if not info_path.exists():
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
    return path.resolve()


def msd_task(task_dir: Path, root: Path, dataset: str = "msd", problems: Problems | None = None) -> list[VolumeSpec]:
    """A Medical Segmentation Decathlon task folder (imagesTr, labelsTr, dataset.json).

    A malformed dataset.json (wrong types, null, paths leaving ``root``) gives one line per
    fault in ``problems``; the task falls back to its folders where the list is unusable.
    """
    problems = problems if problems is not None else []
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
        for img in _nifti_files(task_dir / "imagesTr"):
            lab = _msd_label_for(img, label_dir)
            pairs.append((img.resolve(), lab.resolve() if lab else None))
    seen = {p for p, _ in pairs}
    for img in _nifti_files(task_dir / "imagesTs"):
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
    return specs


def _msd_label_for(img: Path, label_dir: Path) -> Path | None:
    """nnU-Net style images end in _0000; their labels do not."""
    for name in (img.name, re.sub(r"_0000(\.nii(\.gz)?)$", r"\1", img.name)):
        cand = label_dir / name
        if cand.exists():
            return cand
    return None


# --------------------------------------------------------------------------- nifti folder


def label_for(img: Path, label_roots: list[Path]) -> Path | None:
    stem = _stem(img)
    for root in label_roots:
        for cand_stem in (stem, re.sub(r"_0000$", "", stem)):
            for suffix in ("", *LABEL_SUFFIXES):
                for ext in (".nii.gz", ".nii"):
                    cand = root / f"{cand_stem}{suffix}{ext}"
                    if cand.exists() and cand.resolve() != img.resolve():
                        return cand
    return None


def _is_label_name(path: Path) -> bool:
    stem = _stem(path).lower()
    return stem.endswith(LABEL_SUFFIXES) or stem.startswith("segmentation")


def nifti_folder(
    root: Path, dataset: str = "nifti", label_root: Path | None = None, top_level_subsets: bool = False
) -> list[VolumeSpec]:
    """Every NIfTI file under ``root`` (recursively); labels from a sibling label folder,
    ``--label-root``, or ``<stem>_seg``-style files beside the image."""
    images = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and is_nifti_path(p)
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
    for img in images:
        roots = [img.parent]
        if label_root is not None:
            roots.insert(0, label_root)
        for name in LABEL_DIRS:
            roots.append(img.parent.parent / name)
            roots.append(img.parent / name)
        case_folder = is_case_folder(img.parent)
        lab = label_for(img, roots)
        if lab is None and case_folder and len(per_folder[img.parent]) == 1:
            # KiTS-style case folders: imaging.nii.gz + segmentation.nii.gz
            named = [p for p in img.parent.iterdir() if p.is_file() and is_nifti_path(p) and _is_label_name(p)]
            lab = named[0] if len(named) == 1 else None
        first = img.relative_to(root).parts[0] if img.parent != root else root.name
        subset = first if top_level_subsets or known_subset(first) != (None, None) else root.name
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


# --------------------------------------------------------------------------- 3DSeg-8


def _lits(root: Path, skip: set[Path]) -> list[VolumeSpec]:
    specs = []
    for img in sorted(root.rglob("volume-*.nii*")):
        if img.resolve() in skip or img.name.startswith("._"):
            continue
        num = re.sub(r"^volume-", "", _stem(img))
        lab = None
        for cand in img.parent.glob(f"segmentation-{num}.nii*"):
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


def _brats(root: Path, skip: set[Path]) -> list[VolumeSpec]:
    specs = []
    for seg in sorted(root.rglob("*_seg.nii*")):
        case_dir = seg.parent
        case = case_dir.name
        subset = case_dir.parent.name or "BraTS"
        for ch, mod in enumerate(BRATS_CHANNELS):
            files = [p for p in case_dir.glob(f"*_{mod}.nii*") if not p.name.startswith("._")]
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


def _list_files(root: Path, skip: set[Path], problems: Problems) -> list[VolumeSpec]:
    """MedicalNet-style list files: one ``image_path label_path`` line per case."""
    specs = []
    for txt in sorted(root.glob("*.txt")):
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
            if not img.exists():
                spec.error = f"{img}: listed in {txt.name} line {n} but missing"
            specs.append(spec)
    return specs


def _image_label_folders(root: Path, skip: set[Path]) -> list[VolumeSpec]:
    """Sub-dataset folders with ``images/`` and ``label(s)/`` (MedicalNet's data layout)."""
    specs = []
    for images in sorted(p for p in root.rglob("images") if p.is_dir()):
        subset = images.parent.name
        mod, region = known_subset(subset)
        label_roots = [images.parent / d for d in LABEL_DIRS]
        for img in _nifti_files(images):
            if img.resolve() in skip:
                continue
            skip.add(img.resolve())
            specs.append(
                VolumeSpec(
                    dataset="3dseg8",
                    subset=subset,
                    case_key=_stem(img),
                    source=img.resolve(),
                    label=label_for(img, label_roots),
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
    specs: list[VolumeSpec] = []
    task_dirs = sorted({p.parent for p in root.rglob("dataset.json")} | {p.parent for p in root.rglob("imagesTr")})
    task_dirs = [d for d in task_dirs if (d / "imagesTr").is_dir()]
    for task in task_dirs:
        specs.extend(_guarded(task / "dataset.json", problems, lambda: msd_task(task, root, "3dseg8", problems)))
    skip = {s.source.resolve() for s in specs}
    task_roots = [d.resolve() for d in task_dirs]

    def outside_tasks(spec: VolumeSpec) -> bool:
        return not any(str(spec.source).startswith(str(t) + "/") for t in task_roots)

    finders: list[Callable[[], list[VolumeSpec]]] = [
        lambda: _list_files(root, skip, problems), lambda: _lits(root, skip),
        lambda: _brats(root, skip), lambda: _image_label_folders(root, skip),
    ]
    for finder in finders:
        found = [s for s in _guarded(root, problems, finder) if outside_tasks(s)]
        skip |= {s.source.resolve() for s in found}
        specs.extend(found)
    # Anything else (e.g. KiTS case folders): the generic NIfTI rules, one subset per top folder.
    rest = [
        s for s in _guarded(root, problems, lambda: nifti_folder(root, dataset="3dseg8", top_level_subsets=True))
        if s.source.resolve() not in skip and outside_tasks(s)
    ]
    specs.extend(rest)
    return specs


def _guarded(where: Path, problems: Problems, finder: Callable[[], list[VolumeSpec]]) -> list[VolumeSpec]:
    """Run one collection's discovery; a failure is one line naming it, never the end of the run."""
    try:
        return finder()
    except Exception as exc:  # a malformed collection must not stop the others
        problems.append((where, f"collection skipped ({type(exc).__name__}: {one_line(exc, 200)})"))
        return []


def discover(dataset: str, root: Path, label_root: Path | None = None, pseudonymize: bool = False,
             series_parts: str = "anatomical", cache_dir: Path | None = None,
             id_key: bytes | None = None) -> tuple[list[VolumeSpec], list[tuple[Path, str]]]:
    """Volumes of ``dataset`` under ``root`` in a deterministic order, plus inputs not used
    (name, one-line reason).

    ``root`` is resolved first, so ids and fingerprints do not depend on how it is spelled
    (relative, absolute, through a link). ``pseudonymize`` (always on for DICOM) marks every
    spec pseudonymous and names problem inputs by content ids instead of paths. DICOM only:
    ``series_parts`` (all | first | anatomical) picks the parts of split series, ``cache_dir``
    holds the header index, keyed with ``id_key`` (the workdir's private key).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root is not a folder")
    problems: Problems = []
    finders: dict[str, Callable[[], list[VolumeSpec]]] = {
        "3dseg8": lambda: seg8(root, problems),
        "nifti": lambda: nifti_folder(root, label_root=label_root.resolve() if label_root else None),
        "msd": lambda: msd_task(root, root, dataset="msd", problems=problems),
    }
    if dataset == "dicom":
        specs, problems = dicom_tree(root, series_parts=series_parts, cache_dir=cache_dir, id_key=id_key)
    elif dataset in finders:
        specs = _guarded(root, problems, finders[dataset])
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose from 3dseg8, nifti, dicom, msd")
    for spec in specs:
        if spec.error is None and spec.kind == "nifti" and not spec.source.exists():
            spec.error = f"{spec.source}: image file is missing"
        if pseudonymize:
            spec.pseudonymous = True
    sources = dict(getattr(problems, "sources", {}))
    if pseudonymize and dataset != "dicom":
        named = [(Path(input_id(p) if p.is_file() else "collection"), p, reason) for p, reason in problems]
        sources.update({str(name): str(p) for name, p, _ in named if str(name) != "collection"})
        problems = [(name, reason.replace(str(p), "")) for name, p, reason in named]
    problems = NamedProblems([(p, one_line(reason)) for p, reason in problems], sources)
    specs.sort(key=lambda s: (s.subset, s.rel_path, -1 if s.channel is None else s.channel))
    return specs, problems
