"""`curate rank` at full 3DSeg-8 scale (~600,000 slices), run by hand.

Two parts, in one run:
1. the voter (`rank_pools`: blocked k-NN + vote-k per (volume, plane) pool + global order) on
   synthetic slice features shaped like real ones (2000 volumes x 3 planes x 100 slices,
   32 dims, a smooth random walk per pool), wall/CPU time and peak RSS;
2. the built-in descriptor on real-sized 128^3 volumes, measured on a few volumes and scaled to
   600,000 slices (it is linear in the number of slices).
Baseline for the k-NN: the same k-NN done with one dense n x n similarity matrix per pool
versus the blocked one (equal results, memory ratio).

    .venv/bin/python benchmarks/bench_rank.py [--volumes 2000] [--per-pool 100] [--workers 1]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import pandas as pd

from curation.ranking.features import builtin_features
from curation.ranking.vote import knn_cosine, rank_pools


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(n_vol: int, per: int, d: int = 32) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    n_pools = n_vol * 3
    steps = rng.normal(size=(n_pools, per, d)).astype(np.float32)
    feats = np.cumsum(steps, axis=1) * 0.3 + rng.normal(size=(n_pools, 1, d)).astype(np.float32) * 3
    feats = feats.reshape(-1, d)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    vol = np.repeat(np.arange(n_vol), 3 * per)
    plane = np.tile(np.repeat(np.arange(3), per), n_vol)
    vids = np.array([f"vol{v:05d}" for v in range(n_vol)], dtype=object)
    df = pd.DataFrame({
        "volume_id": vids[vol],
        "plane": np.array(["axial", "coronal", "sagittal"], dtype=object)[plane],
        "index": np.tile(np.arange(per), n_pools).astype(np.int32),
    })
    df["slice_id"] = df["volume_id"] + ":" + df["plane"] + ":" + df["index"].astype(str)
    return df, feats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=2000)
    ap.add_argument("--per-pool", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    # 1. the voter at full scale
    df, feats = synthetic(args.volumes, args.per_pool)
    t, c = time.perf_counter(), time.process_time()
    out = rank_pools(df, feats, workers=args.workers)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    voter_rss = peak_rss_mb()  # before the dense baseline below inflates it
    # 2. built-in features on real-sized volumes
    rng = np.random.default_rng(1)
    vols = [rng.random((128, 128, 128), dtype=np.float32).astype(np.float16) for _ in range(3)]
    t = time.perf_counter()
    n = 0
    for v in vols:
        for axis in range(3):
            builtin_features(np.moveaxis(v, axis, 0))
            n += 128
    feat_s = (time.perf_counter() - t) / n
    # 3. k-NN: blocked vs dense on one large pool
    x = rng.normal(size=(20_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = time.perf_counter()
    idx_b, _ = knn_cosine(x, 10, block=2048)
    blocked_s = time.perf_counter() - t
    t = time.perf_counter()
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    idx_d = np.argsort(-sim, axis=1, kind="stable")[:, :10]
    dense_s = time.perf_counter() - t
    dense_mb = sim.nbytes / 1e6
    del sim
    same = float((np.sort(idx_b, axis=1) == np.sort(idx_d, axis=1)).mean())
    assert out["selection_order"].nunique() == len(out)
    print(f"slices                         {len(df):,}")
    print(f"voter (rank_pools) wall / CPU  {wall:.1f} s / {cpu:.1f} s   ({args.workers} worker(s))")
    print(f"peak RSS after the voter       {voter_rss:.0f} MB (synthetic features + manifest included)")
    print(f"built-in features              {feat_s * 1e3:.3f} ms/slice -> {feat_s * len(df):.0f} s for {len(df):,} slices")
    print(f"k-NN 20k x 32, k=10: blocked {blocked_s:.2f} s vs dense n x n {dense_s:.2f} s "
          f"({dense_s / blocked_s:.1f}x); dense needs a {dense_mb:.0f} MB matrix; same neighbours {same:.3f}")


if __name__ == "__main__":
    main()
