"""Honest evaluation of the voter against random and central-slice baselines.

For the first k slices per (volume, plane) pool, averaged over pools:

- hit rate: for each label class present in a pool, whether at least one chosen slice shows
  it; averaged over (pool, class) pairs, overall and per class (a lesion class is the one
  that matters: "a tumour slice among the first k");
- label coverage: of the classes present in the pool, the fraction shown by a chosen slice;
- feature distance: mean over the pool's slices of the cosine distance to the nearest chosen
  slice, in the space the voter used (``feats``) and, as ``coverage_distance``, in a second
  space it did not optimise (``coverage_feats``, e.g. raw thumbnails when the voter used
  their PCA, or the reverse);
- near-empty picks: the fraction of chosen slices whose ``foreground_fraction`` is under a
  quarter of the pool's largest.

Methods: ``voter`` (top-k by ``vote_rank``), ``random`` (its exact expectation over all
k-subsets: hypergeometric for hits and coverage, order statistics for distances — no seed
average), ``central`` (the k slices nearest the middle of the pool's index range).
"""

from __future__ import annotations

from math import comb
from typing import Any

import numpy as np
import pandas as pd

METHODS: tuple[str, ...] = ("voter", "random", "central")
METRICS: tuple[str, ...] = ("hit_rate", "label_coverage", "feature_distance", "coverage_distance", "near_empty")
NEAR_EMPTY = 0.25


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


def evaluate(
    df: pd.DataFrame,
    feats: np.ndarray,
    ks: tuple[int, ...] = (1, 3, 5),
    coverage_feats: np.ndarray | None = None,
) -> dict[str, Any]:
    """Hit rate, label and feature coverage of voter, random (exact) and central (JSON-ready).

    ``df`` needs volume_id, plane, index, vote_rank and (for labels) labels_present, (for
    near-empty picks) foreground_fraction; ``feats`` and ``coverage_feats`` are aligned with
    its rows.
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
    sums = {m: {k: dict.fromkeys(METRICS, 0.0) for k in ks} for m in METHODS}
    per_class: dict[str, dict[str, dict[int, list[float]]]] = {}
    n_pools = n_labelled = n_pairs = 0
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
        n_pairs += len(vocab)
        dists = {name: np.clip(1.0 - x[rows] @ x[rows].T, 0.0, 2.0) for name, x in spaces.items()}
        empty = frac_all[rows] < NEAR_EMPTY * frac_all[rows].max() if frac_all is not None else np.zeros(m, bool)
        index = index_all[rows]
        mid = (index.min() + index.max()) / 2.0
        picks_of = {
            "voter": np.lexsort((index, rank_all[rows])),
            "central": np.lexsort((index, np.abs(index - mid))),
        }
        for k in ks:
            kk = min(k, m)
            for method in METHODS:
                s = sums[method][k]
                if method == "random":
                    hits = np.array([random_hit_probability(m, int(n), kk) for n in lab.sum(axis=0)])
                    for name, d in dists.items():
                        s[name] += random_min_distance(d, kk)
                    s["near_empty"] += float(empty.mean())
                else:
                    chosen = picks_of[method][:kk]
                    hits = lab[chosen].any(axis=0).astype(np.float64)
                    for name, d in dists.items():
                        s[name] += float(d[:, chosen].min(axis=1).mean())
                    s["near_empty"] += float(empty[chosen].mean())
                if vocab:
                    s["hit_rate"] += float(hits.sum())
                    s["label_coverage"] += float(hits.mean())
                    for name, h in zip(vocab, hits):
                        per_class.setdefault(name, {}).setdefault(method, {}).setdefault(k, []).append(float(h))

    def norm(metric: str, total: float) -> float | None:
        denom = {"hit_rate": n_pairs, "label_coverage": n_labelled}.get(metric, n_pools)
        if metric == "coverage_distance" and coverage_feats is None:
            return None
        return total / denom if denom else None

    methods = {
        method: {str(k): {mt: norm(mt, sums[method][k][mt]) for mt in METRICS} for k in ks} for method in METHODS
    }
    classes = {
        name: {
            "pools": len(next(iter(by_m.values()))[ks[0]]),
            **{method: {str(k): float(np.mean(v)) for k, v in per_k.items()} for method, per_k in by_m.items()},
        }
        for name, by_m in sorted(per_class.items())
    }
    return {
        "ks": list(ks),
        "n_pools": n_pools,
        "n_labelled_pools": n_labelled,
        "random": "exact expectation over all k-subsets",
        "methods": methods,
        "classes": classes,
    }


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of ``evaluate`` output, with the voter's gain over random."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"pools: {result['n_pools']} ({result['n_labelled_pools']} with labels), random: exact expectation",
        f"{'k':>3}  {'method':<8}  {'hit_rate':>9}  {'label_cov':>9}  {'feat_dist':>9}  {'cover_dist':>10}  {'near_empty':>10}",
    ]
    for k in result["ks"]:
        for method in METHODS:
            row = result["methods"][method][str(k)]
            lines.append(
                f"{k:>3}  {method:<8}  {fmt(row['hit_rate']):>9}  {fmt(row['label_coverage']):>9}"
                f"  {fmt(row['feature_distance']):>9}  {fmt(row['coverage_distance']):>10}  {fmt(row['near_empty']):>10}"
            )
        voter, rand = result["methods"]["voter"][str(k)], result["methods"]["random"][str(k)]
        if voter["hit_rate"] is not None and rand["hit_rate"] is not None:
            lines.append(f"{'':>3}  {'voter-random':<12}  hit rate {voter['hit_rate'] - rand['hit_rate']:+.3f}")
    if result.get("classes"):
        lines.append("hit rate per class (voter / random / central):")
        for name, c in result["classes"].items():
            cells = "  ".join(
                f"k={k}: {c['voter'][str(k)]:.2f}/{c['random'][str(k)]:.2f}/{c['central'][str(k)]:.2f}" for k in result["ks"]
            )
            lines.append(f"  {name} ({c['pools']} pools)  {cells}")
    return "\n".join(lines)
