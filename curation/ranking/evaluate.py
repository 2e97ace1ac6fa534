"""Honest evaluation of the voter against random and central-slice baselines.

What it measures: representative coverage of each (volume, plane) pool by its first k picks,
not "finds lesions" (the hit rate says whether it does). For the first k slices per pool,
averaged over pools:

- hit rate: for each label class present in a pool, whether at least one chosen slice shows
  it; averaged over (pool, class) pairs, overall and per class (a lesion class is the one
  that matters: "a tumour slice among the first k");
- label coverage: of the classes present in the pool, the fraction shown by a chosen slice;
- feature distance: mean over the pool's slices of the cosine distance to the nearest chosen
  slice, in the space the voter used (``feats``) and, as ``coverage_distance``, in a second
  space it did not optimise (``coverage_feats``, e.g. raw thumbnails when the voter used
  their PCA, or the reverse); lower is better;
- near-empty picks: the fraction of chosen slices whose ``foreground_fraction`` is under a
  quarter of the pool's largest.

Methods: ``voter`` (top-k by ``vote_rank``); ``random_eligible`` (random k of the slices the
voter could pick, i.e. those not deferred as near-empty or edge slices; deferred ones only when k
exceeds the eligible: the like-for-like baseline); ``random`` (random k of all the pool's
slices); ``central`` (the k slices nearest the middle of the pool's index range). Random figures
are exact expectations over k-subsets (hypergeometric for hits and coverage, order statistics
for distances — no seed average).

``differences``: voter - random_eligible and voter - central per k and metric, with 95%
percentile intervals from a bootstrap over subjects (all pools of a subject resampled together).
"""

from __future__ import annotations

from math import comb
from typing import Any

import numpy as np
import pandas as pd

METHODS: tuple[str, ...] = ("voter", "random_eligible", "random", "central")
METRICS: tuple[str, ...] = ("hit_rate", "label_coverage", "feature_distance", "coverage_distance", "near_empty")
PAIRS: tuple[tuple[str, str], ...] = (("voter", "random_eligible"), ("voter", "central"))
NEAR_EMPTY = 0.25
RANDOM_TEXT = "exact expectation over all k-subsets of the pool's slices"
RANDOM_ELIGIBLE_TEXT = ("exact expectation over k-subsets of the slices the voter could pick (not deferred as "
                        "near-empty or edge; deferred slices only when k exceeds the eligible ones)")


def label_tuple(value: Any) -> tuple[str, ...]:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def random_hit_probability(m: int, n_pos: int, k: int) -> float:
    """P(at least one of ``n_pos`` marked items among k drawn without replacement from m)."""
    k = min(k, m)
    return 1.0 - comb(m - n_pos, k) / comb(m, k)


def random_min_distance(dist: np.ndarray, k: int) -> float:
    """Exact expectation over random k-subsets of mean_i min_{j in subset} dist[i, j]."""
    m = dist.shape[1]
    k = min(k, m)
    d = np.sort(dist, axis=1)
    # the j-th smallest (1-based) is the minimum iff it is drawn and the j-1 smaller are not
    p = np.array([comb(m - j, k - 1) for j in range(1, m + 1)], dtype=np.float64) / comb(m, k)
    return float((d @ p).mean())


def random_expectation(
    lab: np.ndarray, dists: dict[str, np.ndarray], empty: np.ndarray, eligible: np.ndarray, k: int
) -> tuple[np.ndarray, dict[str, float], float]:
    """Exact expectations for k slices drawn at random from the ``eligible`` slices of a pool
    (all eligible plus random deferred ones when k exceeds them): (hit probability per class,
    {space: mean min distance}, near-empty share). With ``eligible`` all True: plain random."""
    e_idx, d_idx = np.flatnonzero(eligible), np.flatnonzero(~eligible)
    k_e = min(k, len(e_idx))
    k_d = min(k - k_e, len(d_idx))
    if k_d == 0:
        hits = np.array([random_hit_probability(len(e_idx), int(n), k_e) for n in lab[e_idx].sum(axis=0)])
        dist = {name: random_min_distance(d[:, e_idx], k_e) for name, d in dists.items()}
        return hits, dist, float(empty[e_idx].mean())
    pos_e, pos_d = lab[e_idx].any(axis=0), lab[d_idx].sum(axis=0)
    hits = np.array([1.0 if pe else random_hit_probability(len(d_idx), int(n), k_d) for pe, n in zip(pos_e, pos_d)])
    dist = {}
    for name, d in dists.items():
        rest = d[:, d_idx]
        if k_e:  # every eligible slice is chosen: a deferred one matters only where it is nearer
            rest = np.minimum(rest, d[:, e_idx].min(axis=1, keepdims=True))
        dist[name] = random_min_distance(rest, k_d)
    near = (float(empty[e_idx].sum()) + k_d * float(empty[d_idx].mean())) / (k_e + k_d)
    return hits, dist, near


def evaluate(
    df: pd.DataFrame,
    feats: np.ndarray,
    ks: tuple[int, ...] = (1, 3, 5),
    coverage_feats: np.ndarray | None = None,
    eligible: np.ndarray | None = None,
    subjects: np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Hit rate, label and feature coverage of voter, random over the eligible slices, random
    over all slices (exact) and central, with subject-bootstrap intervals of the differences
    (JSON-ready).

    ``df`` needs volume_id, plane, index, vote_rank and (for labels) labels_present, (for
    near-empty picks) foreground_fraction; ``feats``, ``coverage_feats``, ``eligible`` (bool: the
    voter could pick it; default every slice) and ``subjects`` (the bootstrap unit; default the
    volume) are aligned with its rows.
    """
    if len(feats) != len(df):
        raise ValueError(f"features have {len(feats)} rows, slices {len(df)}")
    spaces = {"feature_distance": _unit(feats)}
    if coverage_feats is not None:
        spaces["coverage_distance"] = _unit(coverage_feats)
    df = df.reset_index(drop=True)  # positions double as feature rows
    labels = [label_tuple(v) for v in df["labels_present"]] if "labels_present" in df.columns else None
    frac_all = df["foreground_fraction"].to_numpy(np.float64) if "foreground_fraction" in df.columns else None
    index_all = df["index"].to_numpy(dtype=np.float64)
    rank_all = df["vote_rank"].to_numpy(dtype=np.float64)
    elig_all = np.ones(len(df), bool) if eligible is None else np.asarray(eligible, dtype=bool)
    subj_all = df["volume_id"].astype(str).to_numpy() if subjects is None else np.asarray(subjects).astype(str)
    if len(elig_all) != len(df) or len(subj_all) != len(df):
        raise ValueError("eligible and subjects must have one value per slice")
    # per pool, k, method, metric: (sum, count); the count is the metric's denominator
    sums = np.zeros((0, len(ks), len(METHODS), len(METRICS)))
    counts = np.zeros((0, len(ks), len(METRICS)))
    pool_sums, pool_counts, pool_subjects = [], [], []
    per_class: dict[str, dict[str, dict[int, list[float]]]] = {}
    n_pools = n_labelled = n_eligible = 0
    pools = df.groupby(["volume_id", "plane"], sort=True).indices
    for key in sorted(pools):
        rows = pools[key]
        rows = rows[np.argsort(index_all[rows], kind="stable")]
        m = len(rows)
        vocab = sorted(set().union(*(labels[r] for r in rows))) if labels is not None else []
        lab = np.zeros((m, len(vocab)), dtype=bool)
        for i, r in enumerate(rows):
            for name in labels[r] if vocab else ():
                lab[i, vocab.index(name)] = True
        n_pools += 1
        n_labelled += bool(vocab)
        n_eligible += int(elig_all[rows].sum())
        dists = {name: np.clip(1.0 - x[rows] @ x[rows].T, 0.0, 2.0) for name, x in spaces.items()}
        empty = frac_all[rows] < NEAR_EMPTY * frac_all[rows].max() if frac_all is not None else np.zeros(m, bool)
        index = index_all[rows]
        mid = (index.min() + index.max()) / 2.0
        picks_of = {
            "voter": np.lexsort((index, rank_all[rows])),
            "central": np.lexsort((index, np.abs(index - mid))),
        }
        ps = np.zeros((len(ks), len(METHODS), len(METRICS)))
        pc = np.zeros((len(ks), len(METRICS)))
        for ki, k in enumerate(ks):
            kk = min(k, m)
            pc[ki] = [len(vocab), bool(vocab), 1.0, float(coverage_feats is not None), 1.0]
            for mi, method in enumerate(METHODS):
                if method.startswith("random"):
                    elig = elig_all[rows] if method == "random_eligible" else np.ones(m, bool)
                    hits, dist, near = random_expectation(lab, dists, empty, elig, kk)
                else:
                    chosen = picks_of[method][:kk]
                    hits = lab[chosen].any(axis=0).astype(np.float64)
                    dist = {name: float(d[:, chosen].min(axis=1).mean()) for name, d in dists.items()}
                    near = float(empty[chosen].mean())
                ps[ki, mi] = [float(hits.sum()), float(hits.mean()) if vocab else 0.0,
                              dist["feature_distance"], dist.get("coverage_distance", 0.0), near]
                for name, h in zip(vocab, hits):
                    per_class.setdefault(name, {}).setdefault(method, {}).setdefault(k, []).append(float(h))
        pool_sums.append(ps)
        pool_counts.append(pc)
        pool_subjects.append(subj_all[rows[0]])
    if pool_sums:
        sums, counts = np.stack(pool_sums), np.stack(pool_counts)

    def ratio(total: float, denom: float) -> float | None:
        return float(total / denom) if denom else None

    tot_s, tot_c = sums.sum(axis=0), counts.sum(axis=0)
    methods = {
        method: {str(k): {mt: ratio(tot_s[ki, mi, ti], tot_c[ki, ti]) for ti, mt in enumerate(METRICS)}
                 for ki, k in enumerate(ks)}
        for mi, method in enumerate(METHODS)
    }
    classes = {
        name: {
            "pools": len(next(iter(by_m.values()))[ks[0]]),
            **{method: {str(k): float(np.mean(v)) for k, v in per_k.items()} for method, per_k in by_m.items()},
        }
        for name, by_m in sorted(per_class.items())
    }
    differences, n_subjects = _bootstrap_differences(sums, counts, np.asarray(pool_subjects), ks, resamples, seed)
    return {
        "ks": list(ks),
        "n_pools": n_pools,
        "n_labelled_pools": n_labelled,
        "n_subjects": n_subjects,
        "n_slices": int(len(df)),
        "n_eligible_slices": n_eligible,
        "measures": "representative coverage of each (volume, plane) by its first k picks",
        "random": RANDOM_TEXT,
        "random_eligible": RANDOM_ELIGIBLE_TEXT,
        "methods": methods,
        "classes": classes,
        "differences": differences,
        "bootstrap": {"unit": "subject", "resamples": resamples, "seed": seed, "interval": "95% percentile"},
    }


def _bootstrap_differences(
    sums: np.ndarray, counts: np.ndarray, subjects: np.ndarray, ks: tuple[int, ...], resamples: int, seed: int
) -> tuple[dict[str, Any], int]:
    """{"voter-<other>": {k: {metric: {"diff", "ci95": [lo, hi]}}}}: the difference of the pooled
    means, and its 95% percentile interval over ``resamples`` draws of subjects with replacement
    (a subject's pools together). ``None`` where a metric has no pools."""
    names, inverse = np.unique(subjects, return_inverse=True) if len(subjects) else (np.array([]), np.array([], int))
    n_subj = len(names)
    subj_s = np.zeros((n_subj, *sums.shape[1:]))
    subj_c = np.zeros((n_subj, *counts.shape[1:]))
    np.add.at(subj_s, inverse, sums)
    np.add.at(subj_c, inverse, counts)
    out: dict[str, Any] = {}
    for a, b in PAIRS:
        ia, ib = METHODS.index(a), METHODS.index(b)
        diff = (subj_s[:, :, ia] - subj_s[:, :, ib]).reshape(n_subj, len(ks) * len(METRICS))
        cnt = subj_c.reshape(n_subj, len(ks) * len(METRICS))
        total_c = cnt.sum(axis=0)
        point = np.divide(diff.sum(axis=0), total_c, out=np.full(diff.shape[1], np.nan), where=total_c > 0)
        parts = []
        with np.errstate(invalid="ignore", divide="ignore"):
            for w in _resample_weights(n_subj, resamples, seed):  # the same draws for every pair
                parts.append((w @ diff) / (w @ cnt))
        boot = np.concatenate(parts) if parts else np.full((0, diff.shape[1]), np.nan)
        lo = np.full(diff.shape[1], np.nan)
        hi = np.full(diff.shape[1], np.nan)
        for j in range(diff.shape[1]):
            col = boot[:, j][np.isfinite(boot[:, j])] if len(boot) else np.array([])
            if len(col) and total_c[j] > 0:
                lo[j], hi[j] = np.percentile(col, [2.5, 97.5])
        point, lo, hi = (x.reshape(len(ks), len(METRICS)) for x in (point, lo, hi))
        out[f"{a}-{b}"] = {
            str(k): {mt: None if not np.isfinite(point[ki, ti]) else
                     {"diff": float(point[ki, ti]), "ci95": [float(lo[ki, ti]), float(hi[ki, ti])]}
                     for ti, mt in enumerate(METRICS)}
            for ki, k in enumerate(ks)
        }
    return out, n_subj


def _resample_weights(n_subj: int, resamples: int, seed: int, chunk: int = 250):
    """Bootstrap draws as per-subject multiplicities, ``chunk`` resamples at a time (memory stays
    chunk x subjects however large the collection)."""
    if not n_subj:
        return
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        idx = rng.integers(0, n_subj, (n, n_subj)) + (np.arange(n) * n_subj)[:, None]
        yield np.bincount(idx.ravel(), minlength=n * n_subj).reshape(n, n_subj).astype(np.float64)


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of ``evaluate`` output, with the voter's differences from random over the
    eligible slices and from the central slice (subject-bootstrap 95% intervals)."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    methods = [m for m in METHODS if m in result["methods"]]
    lines = [
        f"pools: {result['n_pools']} ({result['n_labelled_pools']} with labels) from {result.get('n_subjects', '?')} "
        f"subjects; eligible slices (not near-empty or edge): {result.get('n_eligible_slices', '?')} of "
        f"{result.get('n_slices', '?')}",
        "measures representative coverage (feat/cover dist: lower is better); random_eligible: random k of the "
        "slices the voter could pick; random: of all slices (exact expectations)",
        f"{'k':>3}  {'method':<21}  {'hit_rate':>9}  {'label_cov':>9}  {'feat_dist':>9}  {'cover_dist':>10}  {'near_empty':>10}",
    ]
    for k in result["ks"]:
        for method in methods:
            row = result["methods"][method][str(k)]
            lines.append(
                f"{k:>3}  {method:<21}  {fmt(row['hit_rate']):>9}  {fmt(row['label_coverage']):>9}"
                f"  {fmt(row['feature_distance']):>9}  {fmt(row['coverage_distance']):>10}  {fmt(row['near_empty']):>10}"
            )
        for pair, per_k in result.get("differences", {}).items():
            cells = []
            for mt, short in (("hit_rate", "hit"), ("label_coverage", "label_cov"), ("feature_distance", "feat_dist"),
                              ("coverage_distance", "cover_dist")):
                d = per_k[str(k)].get(mt)
                if d is not None:
                    cells.append(f"{short} {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
            if cells:
                lines.append(f"{'':>3}  {pair:<21}  " + "  ".join(cells))
    if result.get("differences"):
        lines.append("[95% intervals: bootstrap over subjects]")
    if result.get("classes"):
        lines.append("hit rate per class (" + " / ".join(methods) + "):")
        for name, c in result["classes"].items():
            cells = "  ".join(
                f"k={k}: " + "/".join(f"{c[m][str(k)]:.2f}" for m in methods if m in c) for k in result["ks"]
            )
            lines.append(f"  {name} ({c['pools']} pools)  {cells}")
    return "\n".join(lines)
