"""The global selection order: round-robin over volumes and planes, duplicates and deferred
slices last (the per-pool ranks come from ``curation.ranking.vote``)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from curation.ranking.features import l2_normalize
from curation.store.manifest import PLANES


def group_starts(keys: np.ndarray) -> np.ndarray:
    """Start offsets of runs of equal values in a sorted 1-D array, plus len at the end."""
    change = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    return np.concatenate([[0], change, [len(keys)]])


def cumcount(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each element inside its run of equal values (input sorted by group)."""
    starts = group_starts(sorted_groups)
    return np.arange(len(sorted_groups)) - np.repeat(starts[:-1], np.diff(starts))


def volume_codes(volume_ids: pd.Series) -> np.ndarray:
    """Volume codes ordered by a hash of the id: a stable order that mixes datasets."""
    codes, uniq = pd.factorize(volume_ids, sort=False)
    keys = [(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), str(u)) for u in uniq]
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[sorted(range(len(uniq)), key=keys.__getitem__)] = np.arange(len(uniq))
    return rank[codes]


def plane_codes(planes: pd.Series) -> tuple[np.ndarray, int]:
    codes, uniq = pd.factorize(planes, sort=False)
    key = [(PLANES.index(p) if p in PLANES else len(PLANES), str(p)) for p in uniq]
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[sorted(range(len(uniq)), key=key.__getitem__)] = np.arange(len(uniq))
    return rank[codes], max(1, len(uniq))


def tiebreak(df: pd.DataFrame) -> np.ndarray:
    if "index" in df.columns:
        return df["index"].to_numpy(dtype=np.int64)
    if "slice_id" in df.columns:
        return pd.factorize(df["slice_id"], sort=True)[0]
    return np.arange(len(df))


def duplicate_flags(x: np.ndarray, threshold: float) -> np.ndarray:
    """Walk rows in order; flag a row whose cosine to an earlier kept row exceeds threshold."""
    s = x @ x.T
    hit = np.triu(s > threshold, 1)
    flags = np.zeros(len(x), dtype=bool)
    for j in np.flatnonzero(hit.any(axis=0)):
        flags[j] = bool((hit[:j, j] & ~flags[:j]).any())
    return flags


def global_selection_order(
    df: pd.DataFrame,
    score_col: str = "vote_score",
    rank_col: str = "vote_rank",
    features: np.ndarray | None = None,
    dup_threshold: float = 0.98,
    deferred: np.ndarray | None = None,
) -> np.ndarray:
    """selection_order (0..n-1, aligned with ``df`` rows) that round-robins volumes and planes.

    Within a (volume, plane) pool slices go by ``rank_col`` (ties: higher ``score_col``, then
    ``index``). A slice whose cosine to an earlier kept slice of its pool exceeds
    ``dup_threshold`` is deferred: all kept slices of every pool come first, deferred ones
    after, in the same round-robin. A volume's own sequence interleaves its planes (round r
    takes each plane's r-th slice; the plane order is rotated by the volume's position so
    small budgets are not all axial); the global order takes the r-th slice of every volume
    before any (r+1)-th. Volumes are ordered by a hash of ``volume_id``. So the first V entries
    hold one slice of each of V volumes and the first 3V cover every (volume, plane).
    ``deferred`` (bool, aligned with ``df``: near-empty and edge slices) go after every kept
    and duplicate slice, in a third round-robin.
    """
    n = len(df)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    vol = volume_codes(df["volume_id"])
    plane, n_planes = plane_codes(df["plane"])
    rank = df[rank_col].to_numpy(dtype=np.float64)
    score = df[score_col].to_numpy(dtype=np.float64) if score_col in df.columns else np.zeros(n)
    score = np.nan_to_num(score, nan=-np.inf)
    pool = vol * n_planes + plane
    o1 = np.lexsort((tiebreak(df), -score, rank, pool))
    pool_s = pool[o1]
    dup = np.zeros(n, dtype=bool)  # in o1 order
    if features is not None:
        x = l2_normalize(np.asarray(features))
        starts = group_starts(pool_s)
        for a, b in zip(starts[:-1], starts[1:]):
            if b - a > 1:
                dup[a:b] = duplicate_flags(x[o1[a:b]], dup_threshold)
    phase = dup.astype(np.int64)
    if deferred is not None:
        phase[np.asarray(deferred, dtype=bool)[o1]] = 2
    o2 = np.lexsort((np.arange(n), phase, pool_s))
    r = np.empty(n, dtype=np.int64)
    r[o2] = cumcount(pool_s[o2] * 3 + phase[o2])  # round inside (pool, phase)
    vol_s = vol[o1]
    rot = (plane[o1] - vol_s) % n_planes
    o3 = np.lexsort((rot, r, phase, vol_s))
    pos = np.empty(n, dtype=np.int64)
    pos[o3] = cumcount(vol_s[o3] * 3 + phase[o3])  # position in the volume's sequence
    o4 = np.lexsort((vol_s, pos, phase))
    order = np.empty(n, dtype=np.int64)
    order[o1[o4]] = np.arange(n)
    return order
