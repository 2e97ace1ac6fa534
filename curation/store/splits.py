"""Subject-wise train/val/test splits: which cases a model may learn from and which it is judged on.

A case's split is a property of the subject alone: a hash of its ``case_id`` mapped to [0, 1)
and cut at 0.7 and 0.8 (7:1:2 in expectation). Adding a collection therefore moves no existing
case, and every stage (release, `train finetune`) recomputes the same split from the id.

One exception keeps duplicates honest: cases that share an identical source volume
(``source_sha256``) form one group, and the whole group takes the split of the member whose hash
is lowest. Only a case that gains a duplicate in another case can move, and then it moves to
where its copy is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

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
