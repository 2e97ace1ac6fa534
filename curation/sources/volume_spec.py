"""`VolumeSpec`: one source volume to process, as the dataset adapters find it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.privacy.scrub import Scrubber, keyed_hash, redact

PSEUDONYM = "(pseudonymised)"  # what a pseudonymous spec shows before it has its workdir key


@dataclass
class VolumeSpec:
    """One source volume to process (a file, or a DICOM series).

    A pseudonymous spec (DICOM, or ``--pseudonymize``) shows only keyed ids: ``display_path``
    (the manifests' ``source_path``), ``volume_id`` and ``case_id`` need ``id_key`` (the
    workdir's key, set by the slice step); ``rel_path``, ``source``, ``label`` and ``case_key``
    stay in memory and in the private map.
    """

    dataset: str
    subset: str
    case_key: str  # raw subject key (case name, PatientID|Issuer); hashed before any manifest
    source: Path
    label: Path | None = None
    kind: str = "nifti"  # nifti | dicom
    modality: str | None = None
    body_region: str | None = None
    channel: int | None = None  # None: expand every channel of a 4D file
    channel_names: dict[str, str] = field(default_factory=dict)
    label_names: dict[str, str] = field(default_factory=dict)
    series: Any = None  # curation.dicom.load.DicomSeries for kind == "dicom"
    rel_path: str = ""  # root-relative source path (real: never written for pseudonymous specs)
    error: str | None = None  # adapter-level problem (missing file...) recorded as an error row
    note: str | None = None  # adapter-level remark kept in the row (e.g. listed label missing)
    pseudonymous: bool = False
    scrubber: Scrubber | None = None  # this patient's identifiers, for any text that leaves
    id_key: bytes | None = field(default=None, repr=False)

    def _key(self) -> bytes:
        if self.id_key is None:
            raise RuntimeError("pseudonymous ids need the workdir key (SliceStep sets it)")
        return self.id_key

    def volume_id(self, channel: int | None) -> str:
        if self.pseudonymous:
            return f"{slug(self.dataset)}-{keyed_hash(self._key(), f'v|{self.dataset}|{self.rel_path}|{channel}', 12)}"
        key = f"{self.dataset}|{self.subset}|{self.rel_path}|{channel}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return f"{slug(self.subset)}-{digest}"

    @property
    def case_id(self) -> str:
        if self.pseudonymous:
            return keyed_hash(self._key(), f"c|{self.subset}|{self.case_key}", 16)
        return hashlib.sha256(f"{self.subset}|{self.case_key}".encode()).hexdigest()[:16]

    @property
    def display_path(self) -> str:
        """What manifests, logs and progress show as the source: the real root-relative path,
        or ``<dataset>/<case_id>/<source id>`` for a pseudonymous spec."""
        if not self.pseudonymous:
            return self.rel_path
        if self.id_key is None:
            return PSEUDONYM
        return f"{self.dataset}/{self.case_id}/{keyed_hash(self._key(), f's|{self.rel_path}', 12)}"

    def label_display(self) -> str | None:
        """The label file as rows show it (its name; a pseudonym when pseudonymous)."""
        if self.label is None:
            return None
        return f"{self.display_path}#label" if self.pseudonymous else self.label.name

    def safe_text(self, text: str) -> str:
        """``text`` on one line with this spec's real paths replaced by pseudonyms and the
        patient's identifiers, and anything shaped like one, scrubbed (a no-op besides
        one-lining for plain specs, whose paths show root-relative, as in ``source_path``)."""
        if not self.pseudonymous:
            return redact(text, self._root_prefixes())
        files = [Path(f) for f in (self.series.files if self.series is not None else [])]
        reps: list[tuple[str, str]] = []
        for path, pseudo in [(self.source, self.display_path), *[(f, self.display_path) for f in files],
                             (self.label, self.label_display() or "")]:
            if path is None:
                continue
            for variant in {str(path), str(Path(path).resolve()), Path(path).name}:
                if len(variant) >= 4:
                    reps.append((variant, pseudo))
        if files:
            folder = str(self.series.folder)
            reps += [(folder, self.display_path), (str(Path(folder).resolve()), self.display_path)]
        if self.rel_path:
            reps.append((self.rel_path.split("#")[0], self.display_path))
        # header free text may hold identifiers the name fields lack: scrub what looks like one
        return redact(text, reps, (self.scrubber or Scrubber()).with_generic())


    def _root_prefixes(self) -> list[tuple[str, str]]:
        """(``--root`` + "/", "") for a plain spec: its files then read root-relative in any text, so
        rows and logs carry no absolute path (a home folder, a hospital mount) the manifests lack."""
        rel = self.rel_path.split("#")[0]
        if not rel:
            return []
        reps = []
        for variant in {str(self.source), str(Path(self.source).resolve())}:
            if variant.endswith("/" + rel):
                reps.append((variant[: -len(rel)], ""))
        return reps


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "volume"


def root_relative(path: Path, root: Path) -> str:
    """``path`` relative to the dataset root, as a POSIX string (the spec's display path).

    Lexical first (a file found under ``root`` keeps its place even when it is a link), then
    through resolved paths.
    """
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        pass
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


class NamedProblems(list):
    """Problems of a pseudonymous discovery, named by ids (``input-...``, ``series-...``);
    ``sources`` maps each id to the real path behind it, for the workdir's private map only."""

    def __init__(self, items=(), sources: dict[str, str] | None = None) -> None:
        super().__init__(items)
        self.sources: dict[str, str] = dict(sources or {})
