"""What vote-k's representativeness misses: which slices are worth little (near-empty, edge)
and which are unusual (a lesion is atypical by nature).

- ``defer_mask``: slices whose body fraction is under ``rel_min`` of their pool's largest, or
  that lie in the outer ``edge`` fraction of the pool's body extent, go after every other
  slice (the CT table, the sliver at the edge of the field of view, the tip of the skull).
- ``population_atypicality``: per slice, how unlike the same position in the collection's
  other volumes it is (a population prior). Each slice's thumbnail (block means, the built-in
  descriptor's first part) is compared with up to ``refs`` other volumes of its cohort (same
  dataset, modality, channel): from each, the best-matching slice within ``shift`` grid
  positions (tolerating differences in field of view and anatomy). A per-pixel robust
  z-score against those matches, ``|t - median| / (1.4826 MAD + floor)``, is large where the
  slice shows what the population does not at that place (a tumour, a cyst, a bleed) and
  small where anatomy merely varies (edges, where the MAD is large). The slice's score is the
  mean of its ``top`` largest pixel z-scores: a lesion is local.
- ``prior_from_scores``: scores -> [0, 1], 0 at the median slice of the (cohort, plane), 1 at
  its 99th percentile and above.

Nothing here reads labels.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from scipy import ndimage


def defer_mask(df: pd.DataFrame, rel_min: float = 0.25, edge: float = 0.05) -> np.ndarray:
    """Bool per row of ``df`` (volume_id, plane, index, foreground_fraction): defer it.

    A slice is deferred when ``foreground_fraction < rel_min * max`` over its (volume, plane)
    pool, or when its index lies within ``edge * extent`` of either end of the pool's indexed
    range (at least the end slices themselves when ``edge > 0``).
    """
    n = len(df)
    if n == 0 or "foreground_fraction" not in df.columns:
        return np.zeros(n, dtype=bool)
    frac = df["foreground_fraction"].to_numpy(dtype=np.float64)
    idx = df["index"].to_numpy(dtype=np.float64)
    keys = [df["volume_id"], df["plane"]]
    fmax = pd.Series(frac).groupby(keys).transform("max").to_numpy()
    lo = pd.Series(idx).groupby(keys).transform("min").to_numpy()
    hi = pd.Series(idx).groupby(keys).transform("max").to_numpy()
    margin = np.where(edge > 0, np.maximum(np.ceil(edge * (hi - lo + 1)), 1.0), 0.0)
    near_edge = (idx < lo + margin) | (idx > hi - margin)
    out = (frac < rel_min * fmax) | near_edge
    # a pool too small to keep anything keeps its largest slice(s)
    all_out = pd.Series(out).groupby(keys).transform("all").to_numpy()
    return out & ~(all_out & (frac >= fmax))


def _hash_order(ids: list[str]) -> list[str]:
    return sorted(ids, key=lambda u: (hashlib.blake2b(u.encode(), digest_size=8).digest(), u))


def population_atypicality(
    thumbs: np.ndarray,
    df: pd.DataFrame,
    cohort: np.ndarray | None = None,
    *,
    refs: int = 16,
    shift: int | None = None,
    min_refs: int = 3,
    floor: float = 0.05,
    top: int = 2,
    highpass: int = 5,
) -> np.ndarray:
    """Atypicality score per row (NaN where the cohort has fewer than ``min_refs`` others).

    Args:
        thumbs: (n, p) thumbnails in intensity units, aligned with ``df`` rows.
        df: volume_id, plane, index per row.
        cohort: per-row cohort key (default: one cohort).
        refs: reference volumes per volume: the next ``refs`` in a hash order of the cohort's
            volume ids (deterministic, independent of row order, spread over the collection).
        shift: positions searched either side (default ``max(2, round(0.05 * grid))``, the
            grid taken as the largest index + 1).
        min_refs: fewer other volumes than this: no population, NaN.
        floor: minimum robust sigma (intensity units) so flat regions do not explode.
        top: pixels averaged into the score.
        highpass: side of the median filter whose output is taken off the residual (0: none).
    """
    t = np.asarray(thumbs, dtype=np.float32)
    n = len(t)
    out = np.full(n, np.nan)
    if n == 0:
        return out
    index = df["index"].to_numpy(dtype=np.int64)
    if shift is None:
        shift = max(2, round(0.05 * (int(index.max()) + 1)))
    sq = np.einsum("ij,ij->i", t, t)
    coh = np.zeros(n, dtype=object) if cohort is None else np.asarray(cohort, dtype=object)
    frame = pd.DataFrame({"c": coh.astype(str), "p": df["plane"].to_numpy(), "v": df["volume_id"].to_numpy()})
    for _, rows in frame.groupby(["c", "p"], sort=True).indices.items():
        by_vol = {}
        for v, local in frame.iloc[rows].groupby("v").indices.items():
            r = rows[local]
            by_vol[v] = r[np.argsort(index[r], kind="stable")]
        vids = _hash_order(list(by_vol))
        if len(vids) - 1 < min_refs:
            continue
        for pos, v in enumerate(vids):
            rv = by_vol[v]
            others = [vids[(pos + j) % len(vids)] for j in range(1, min(refs, len(vids) - 1) + 1)]
            aligned = np.empty((len(others), len(rv), t.shape[1]), dtype=np.float32)
            for r, u in enumerate(others):
                ru = by_vol[u]
                d2 = sq[rv][:, None] + sq[ru][None, :] - 2.0 * (t[rv] @ t[ru].T)
                d2[np.abs(index[rv][:, None] - index[ru][None, :]) > shift] = np.inf
                best = d2.argmin(axis=1)
                ok = np.isfinite(d2[np.arange(len(rv)), best])
                match = t[ru][best]
                # gain match: scanners, coils and windows differ in overall brightness
                gain = np.einsum("ij,ij->i", match, t[rv]) / np.maximum(sq[ru][best], 1e-9)
                match = match * np.clip(gain, 0.5, 2.0)[:, None]
                aligned[r] = np.where(ok[:, None], match, t[rv])
            med = np.median(aligned, axis=0)
            mad = np.median(np.abs(aligned - med), axis=0)
            resid = t[rv] - med
            if highpass:
                # a lesion is local; bias fields and slightly different anatomy are smooth
                side = int(round(np.sqrt(t.shape[1])))
                img = resid.reshape(-1, side, side)
                resid = (img - ndimage.median_filter(img, size=(1, highpass, highpass), mode="nearest")).reshape(len(rv), -1)
            z = np.abs(resid) / (1.4826 * mad + floor)
            kk = min(top, z.shape[1])
            out[rv] = np.partition(z, z.shape[1] - kk, axis=1)[:, -kk:].mean(axis=1)
    return out


def prior_from_scores(scores: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
    """Map atypicality scores to [0, 1] per group: 0 at the median, 1 at the 99th percentile.

    NaN scores (no population) map to 0, so those slices are ranked by votes alone.
    """
    s = np.asarray(scores, dtype=np.float64)
    out = np.zeros(len(s))
    keys = np.zeros(len(s), dtype=np.int64) if group is None else np.asarray(group).astype(str)
    for _, rows in pd.Series(np.arange(len(s))).groupby(keys).indices.items():
        v = s[rows]
        ok = np.isfinite(v)
        if ok.sum() < 2:
            continue
        lo, hi = np.percentile(v[ok], [50, 99])
        if hi <= lo:
            continue
        out[rows[ok]] = np.clip((v[ok] - lo) / (hi - lo), 0.0, 1.0)
    return out
