"""Honest evaluation of the voter against random and central-slice baselines.

For k chosen slices per (volume, plane) pool, two coverage measures, each averaged over pools:

- label coverage: of the ground-truth label classes present anywhere in the pool (union of
  ``labels_present``), the fraction present in at least one chosen slice (higher is better;
  pools without labels are left out);
- feature distance: mean over the pool's slices of the cosine distance to the nearest chosen
  slice (lower is better; every pool counts).

Methods: ``voter`` (top-k by ``vote_rank``), ``random`` (k slices drawn without replacement,
averaged over seeds), ``central`` (the k slices nearest the middle of the pool's index range).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

METHODS: tuple[str, ...] = ("voter", "random", "central")


def _labels(value: Any) -> tuple[str, ...]:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def evaluate(
    df: pd.DataFrame,
    feats: np.ndarray,
    ks: tuple[int, ...] = (1, 3, 5),
    n_random_seeds: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Label and feature-space coverage of voter, random and central choices (JSON-ready).

    ``df`` needs volume_id, plane, index, vote_rank and (for label coverage) labels_present;
    ``feats`` is aligned with its rows. Random choices: the first k of ``n_random_seeds``
    permutations per pool, drawn from a generator seeded with (seed, pool number in sorted
    (volume_id, plane) order), so results are reproducible.
    """
    x = np.asarray(feats, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(x) != len(df):
        raise ValueError(f"features have {len(x)} rows, slices {len(df)}")
    df = df.reset_index(drop=True)  # positions double as feature rows
    has_labels = "labels_present" in df.columns
    labels = [_labels(v) for v in df["labels_present"]] if has_labels else None
    index_all = df["index"].to_numpy(dtype=np.float64)
    rank_all = df["vote_rank"].to_numpy(dtype=np.float64)
    sums = {m: {k: [0.0, 0.0] for k in ks} for m in METHODS}  # [label sum, feature sum]
    n_pools = n_labelled = 0
    pools = df.groupby(["volume_id", "plane"], sort=True).indices
    for pool_no, key in enumerate(sorted(pools)):
        rows = pools[key]
        rows = rows[np.argsort(index_all[rows], kind="stable")]
        m = len(rows)
        sim = x[rows] @ x[rows].T
        lab = None
        if labels is not None:
            vocab = sorted(set().union(*(labels[r] for r in rows)))
            if vocab:
                col = {name: j for j, name in enumerate(vocab)}
                lab = np.zeros((m, len(vocab)), dtype=bool)
                for i, r in enumerate(rows):
                    lab[i, [col[n] for n in labels[r]]] = True
        n_pools += 1
        n_labelled += lab is not None
        index = index_all[rows]
        mid = (index.min() + index.max()) / 2.0
        by_rank = np.lexsort((index, rank_all[rows]))
        by_centre = np.lexsort((index, np.abs(index - mid)))
        rng = np.random.default_rng([seed, pool_no])
        shuffled = np.argsort(rng.random((n_random_seeds, m)), axis=1)  # one permutation per seed
        for k in ks:
            kk = min(k, m)
            picks = {
                "voter": by_rank[None, :kk],
                "random": shuffled[:, :kk],
                "central": by_centre[None, :kk],
            }
            for method, chosen in picks.items():  # chosen: (draws, kk)
                if lab is not None:
                    sums[method][k][0] += float(lab[chosen].any(axis=1).mean(axis=1).mean())
                dist = np.clip(1.0 - sim[:, chosen].max(axis=2), 0.0, 2.0)
                sums[method][k][1] += float(dist.mean())
    methods = {
        method: {
            str(k): {
                "label_coverage": sums[method][k][0] / n_labelled if n_labelled else None,
                "feature_distance": sums[method][k][1] / n_pools if n_pools else None,
            }
            for k in ks
        }
        for method in METHODS
    }
    return {
        "ks": list(ks),
        "n_pools": n_pools,
        "n_labelled_pools": n_labelled,
        "n_random_seeds": n_random_seeds,
        "seed": seed,
        "methods": methods,
    }


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of ``evaluate`` output, with the voter's gain over random."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"pools: {result['n_pools']} ({result['n_labelled_pools']} with labels), "
        f"random: mean of {result['n_random_seeds']} seeds",
        f"{'k':>3}  {'method':<8}  {'label_cov (up)':>14}  {'feat_dist (down)':>16}",
    ]
    for k in result["ks"]:
        for method in METHODS:
            row = result["methods"][method][str(k)]
            lines.append(
                f"{k:>3}  {method:<8}  {fmt(row['label_coverage']):>14}"
                f"  {fmt(row['feature_distance']):>16}"
            )
        voter, rand = result["methods"]["voter"][str(k)], result["methods"]["random"][str(k)]
        if voter["label_coverage"] is not None and rand["label_coverage"] is not None:
            gain = voter["label_coverage"] - rand["label_coverage"]
            lines.append(f"{'':>3}  {'':<8}  {'voter-random':>14}  {gain:+.3f} label coverage")
    return "\n".join(lines)
