"""Subject-wise train/val/test splits: which cases a model may learn from and which it is judged on.

A case's split is a property of the subject alone: a hash of its ``case_id`` mapped to [0, 1)
and cut at 0.7 and 0.8 (7:1:2 in expectation). Adding a collection therefore moves no existing
case, and every stage (release, `train finetune`) recomputes the same split from the id.

One exception keeps duplicates honest: cases that share an identical source volume
(``source_sha256``) form one group, and the whole group takes the split of the member whose hash
is lowest. Only a case that gains a duplicate in another case can move, and then it moves to
where its copy is.

A user may choose instead (`train finetune`): ``read_split_file`` (CSV ``case_id,split`` or
nnU-Net's ``splits_final.json`` with a fold) and ``kfold_splits`` (deterministic subject-level
k-fold, duplicates together, stratified).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

SPLITS = (("train", 0.7), ("val", 0.1), ("test", 0.2))
# Namespaces the split hash, so it is independent of other hashes derived from the same id.
_SALT = "med3dinsight-split/1|"


def case_hash(case_id: str) -> float:
    """The case's position in [0, 1): the first 64 bits of sha256(salt + case_id)."""
    digest = hashlib.sha256(f"{_SALT}{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(case_id: str) -> str:
    """``train`` / ``val`` / ``test`` of one case, from its id alone."""
    u, edge = case_hash(str(case_id)), 0.0
    for name, share in SPLITS:
        edge += share
        if u < edge:
            return name
    return SPLITS[-1][0]


def _representatives(case_ids: Iterable[str], groups: Iterable[object] | None) -> dict[str, str]:
    """case_id -> the case whose split it takes: itself, or the lowest-hash case it shares a
    source volume with (union-find over the duplicate links)."""
    parent: dict[str, str] = {}

    def find(c: str) -> str:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb), key=lambda c: (case_hash(c), c))
            parent[hi] = lo

    ids = [str(c) for c in case_ids]
    for c in ids:
        parent.setdefault(c, c)
    if groups is not None:
        first: dict[object, str] = {}
        for c, g in zip(ids, groups):
            if g is None or (isinstance(g, float) and g != g) or g == "":
                continue
            if g in first:
                union(first[g], c)
            else:
                first[g] = c
    return {c: find(c) for c in parent}


def assign_splits(case_ids: pd.Series, source_sha256: pd.Series | None = None) -> pd.Series:
    """Subject-wise split of every row: ``split_of`` its case, duplicates grouped.

    Args:
        case_ids: one case id per row (a volume or a slice).
        source_sha256: the row's source-volume hash, when known; rows with equal hashes share a
            split even across cases.

    Returns:
        ``train`` / ``val`` / ``test`` per row, aligned with ``case_ids``.
    """
    reps = _representatives(case_ids, None if source_sha256 is None else list(source_sha256))
    splits = {c: split_of(r) for c, r in reps.items()}
    return case_ids.astype(str).map(splits)


def case_splits(volumes: pd.DataFrame) -> dict[str, str]:
    """case_id -> split for every case of a volumes table (``volumes.parquet``), duplicates
    grouped by ``source_sha256`` when the table has it. Stages that see only some volumes (a
    release, a `--where` selection) look their cases up here, so they agree with each other."""
    sha = volumes["source_sha256"] if "source_sha256" in volumes.columns else None
    split = assign_splits(volumes["case_id"].astype(str), sha)
    return dict(zip(volumes["case_id"].astype(str), split))


# ------------------------------------------------------------------ user-chosen splits


def read_split_file(path: str | Path, fold: int | None = None) -> dict[str, str]:
    """A split the user chose: identifier -> ``train`` / ``val`` / ``test``.

    - CSV with a header ``case_id,split`` (split: train, val / validation, test; ``--fold`` not
      allowed);
    - nnU-Net's ``splits_final.json`` (a list of ``{"train": [...], "val": [...]}``, one per fold):
      fold ``fold`` (default 0 when the file has one fold; required otherwise); its ``val`` cases are
      the ones scored (``test``), as in nnU-Net's cross-validation.

    ValueError (one line, naming the file) for anything else.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(f"--split-file {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        return _nnunet_split(path, text, fold)
    if fold is not None:
        raise ValueError(f"--fold {fold}: {path} is a CSV split (case_id,split); --fold goes with a "
                         "splits_final.json or --folds N")
    return _csv_split(path, text)


def _csv_split(path: Path, text: str) -> dict[str, str]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in reader.fieldnames or []]
    if not {"case_id", "split"} <= set(fields):
        raise ValueError(f"{path}: needs a header with columns case_id,split (or nnU-Net's splits_final.json)")
    reader.fieldnames = fields
    out: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        case, split = (row["case_id"] or "").strip(), (row["split"] or "").strip().lower()
        split = {"validation": "val", "valid": "val"}.get(split, split)
        if not case:
            raise ValueError(f"{path}:{line}: empty case_id")
        if split not in ("train", "val", "test"):
            raise ValueError(f"{path}:{line}: split {row['split']!r} is not train, val or test")
        if out.get(case, split) != split:
            raise ValueError(f"{path}:{line}: case {case} is in two splits ({out[case]}, {split})")
        out[case] = split
    if not out:
        raise ValueError(f"{path}: no cases")
    return out


def _nnunet_split(path: Path, text: str, fold: int | None) -> dict[str, str]:
    try:
        folds = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(folds, dict):
        folds = [folds]
    if not isinstance(folds, list) or not folds or not all(
            isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list) for f in folds):
        raise ValueError(f"{path}: expected nnU-Net's splits_final.json: a list of {{\"train\": [...], \"val\": [...]}}")
    if fold is None:
        if len(folds) > 1:
            raise ValueError(f"{path} has {len(folds)} folds: choose one with --fold k (0..{len(folds) - 1})")
        fold = 0
    if not 0 <= fold < len(folds):
        raise ValueError(f"--fold {fold}: {path} has folds 0..{len(folds) - 1}")
    out: dict[str, str] = {}
    for split, key in (("train", "train"), ("test", "val")):
        for case in folds[fold][key]:
            case = str(case)
            if out.get(case, split) != split:
                raise ValueError(f"{path}: fold {fold} puts {case} in both train and val")
            out[case] = split
    return out


def kfold_splits(case_ids: Iterable[str], folds: int, fold: int, strata: dict[str, str] | None = None,
                 groups: Iterable[object] | None = None) -> dict[str, str]:
    """Subject-level k-fold: case_id -> ``test`` for the cases of fold ``fold``, ``train`` for the
    rest. Deterministic (no seed): cases sharing a source volume (``groups``, aligned with
    ``case_ids``) stay together; groups are dealt round-robin in order of (stratum, split hash),
    so every fold gets its share of each stratum (e.g. lesion present or not)."""
    if folds < 2:
        raise ValueError(f"--folds {folds}: needs at least 2")
    if not 0 <= fold < folds:
        raise ValueError(f"--fold {fold}: must be in 0..{folds - 1} for --folds {folds}")
    ids = [str(c) for c in case_ids]
    reps = _representatives(ids, None if groups is None else list(groups))
    members: dict[str, list[str]] = {}
    for c in dict.fromkeys(ids):
        members.setdefault(reps[c], []).append(c)
    if len(members) < folds:
        raise ValueError(f"--folds {folds}: only {len(members)} subjects to split")
    strata = strata or {}
    order = sorted(members, key=lambda r: (min(str(strata.get(c, "")) for c in members[r]), case_hash(r), r))
    out: dict[str, str] = {}
    for i, rep in enumerate(order):
        for c in members[rep]:
            out[c] = "test" if i % folds == fold else "train"
    return out
