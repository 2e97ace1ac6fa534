"""Dataset adapters: a root folder in, a deterministic list of volumes to process out.

``3dseg8`` discovers every layout the Med3D 3DSeg-8 collection is assembled from (MSD task
folders, LiTS-style files, BraTS-style case folders, MedicalNet list files and
``images/`` + ``label/`` folders; `curation.sources.seg8`); ``nifti`` is any folder of NIfTI
files and ``msd`` one Decathlon task folder (`curation.sources.nifti`); ``dicom`` any tree of
DICOM series (`curation.sources.dicom_tree`). Files are found without following links out of the
root; FIFOs, devices and undecodable names are set aside with one line each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from curation.privacy.scrub import one_line
from curation.sources import DATASETS  # noqa: F401  (re-exported)
from curation.sources.dicom_tree import dicom_tree, input_id
from curation.sources.nifti import Problems, _guarded, label_for, msd_task, nifti_folder
from curation.sources.seg8 import seg8
from curation.sources.volume_spec import NamedProblems, VolumeSpec

__all__ = ["discover", "label_for", "msd_task", "nifti_folder", "seg8"]


def discover(dataset: str, root: Path, label_root: Path | None = None, pseudonymize: bool = False,
             series_parts: str = "anatomical", cache_dir: Path | None = None,
             id_key: bytes | None = None, workers: int | None = None) -> tuple[list[VolumeSpec], list[tuple[Path, str]]]:
    """Volumes of ``dataset`` under ``root`` in a deterministic order, plus inputs not used
    (name, one-line reason).

    ``root`` is resolved first, so ids and fingerprints do not depend on how it is spelled
    (relative, absolute, through a link). ``pseudonymize`` (always on for DICOM) marks every
    spec pseudonymous and names problem inputs by content ids instead of paths. DICOM only:
    ``series_parts`` (all | first | anatomical) picks the parts of split series, ``cache_dir``
    holds the header index, keyed with ``id_key`` (the workdir's private key); ``workers``
    header-reading processes (None: one per CPU).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root is not a folder")
    problems: Problems = []
    finders: dict[str, Callable[[], list[VolumeSpec]]] = {
        "3dseg8": lambda: seg8(root, problems),
        "nifti": lambda: nifti_folder(root, label_root=label_root.resolve() if label_root else None, problems=problems),
        "msd": lambda: msd_task(root, root, dataset="msd", problems=problems),
    }
    if dataset == "dicom":
        specs, problems = dicom_tree(root, series_parts=series_parts, cache_dir=cache_dir, id_key=id_key,
                                     workers=workers)
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
        named = [(Path(input_id(p) if os.path.lexists(p) and not os.path.isdir(p) else "collection"), p, reason)
                 for p, reason in problems]
        sources.update({str(name): str(p) for name, p, _ in named if str(name) != "collection"})
        problems = [(name, reason.replace(str(p), "")) for name, p, reason in named]
    problems = NamedProblems([(p, one_line(reason)) for p, reason in problems], sources)
    specs.sort(key=lambda s: (s.subset, s.rel_path, -1 if s.channel is None else s.channel))
    return specs, problems
