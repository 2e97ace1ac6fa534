"""Vote-MI voter: features, exact blocked k-NN, vote-k greedy, global order, evaluation."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from curation.ranking.evaluate import evaluate, format_table
from curation.ranking.features import builtin_features, reduce_features
from curation.ranking.vote import global_selection_order, knn_cosine, rank_pools, vote_k

PLANES = ("axial", "coronal", "sagittal")


def _patterns(size: int = 32) -> list[np.ndarray]:
    """Four visually distinct 2D patterns in [0, 1]."""
    yy, xx = np.mgrid[:size, :size] / size
    disc = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.1).astype(float) * 0.8
    stripes = (np.sin(xx * 25) > 0).astype(float) * 0.5 + 0.2
    corner = ((yy < 0.4) & (xx < 0.4)).astype(float) * 0.9
    ramp = yy * 0.9
    return [disc, stripes, corner, ramp]


def _group_images(sizes: list[int], seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies of the patterns, group g repeated sizes[g] times, rows shuffled."""
    rng = np.random.default_rng(seed)
    pats = _patterns(size)
    groups = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)])
    rng.shuffle(groups)
    imgs = np.stack([pats[g] for g in groups]) + rng.normal(0, 0.05, (len(groups), size, size))
    return np.clip(imgs, 0, 1), groups


def _features(imgs: np.ndarray) -> np.ndarray:
    return reduce_features(builtin_features(imgs), dim=16)


def _brute_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    n = len(x)
    idx = np.stack([np.lexsort((np.arange(n), -s[i]))[:k] for i in range(n)])
    return idx, np.take_along_axis(s, idx, axis=1)


def _reference_votek(x: np.ndarray, k: int) -> list[int]:
    """fast_votek's greedy, recomputed from scratch each step (ties: votes, then index)."""
    n = len(x)
    nbr, _ = _brute_knn(x, k)
    voters = [[v for v in range(n) if c in nbr[v]] for c in range(n)]
    times = [0] * n
    selected: list[int] = []
    while len(selected) < n:
        best = None
        for c in range(n):
            if c in selected:
                continue
            score = sum(10.0 ** -times[v] for v in voters[c] if v not in selected)
            key = (score, len(voters[c]), -c)
            if best is None or key > best[0]:
                best = (key, c)
        c = best[1]
        selected.append(c)
        for v in voters[c]:
            times[v] += 1
    return selected


# ---------------------------------------------------------------------------------- features


def test_builtin_features_values():
    img = np.full((64, 64), 0.5, dtype=np.float16)
    f = builtin_features(np.stack([img, np.zeros_like(img)]))
    assert f.shape == (2, 16 * 16 + 32) and f.dtype == np.float32
    np.testing.assert_allclose(f[0, :256], 0.5 / 16, rtol=1e-3)
    assert f[0, 256 + 16] == pytest.approx(1.0)  # all foreground in the 0.5 bin
    assert np.count_nonzero(f[0, 256:]) == 1
    assert not f[1].any()  # empty slice: zero thumbnail, zero histogram
    odd = builtin_features(np.random.default_rng(0).random((3, 50, 37)))
    assert odd.shape == (3, 288) and np.isfinite(odd).all()
    small = builtin_features(np.ones((1, 8, 8)))
    np.testing.assert_allclose(small[0, :256], 1 / 16, rtol=1e-6)


def test_reduce_features_unit_norm_and_deterministic():
    rng = np.random.default_rng(1)
    feats = rng.random((500, 40)).astype(np.float32)
    a = reduce_features(feats, dim=8, seed=3, max_fit=200)
    b = reduce_features(feats, dim=8, seed=3, max_fit=200)
    assert a.shape == (500, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert reduce_features(feats[:5], dim=32).shape == (5, 5)


# ---------------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("block", [16, 37, 64, 4096])
def test_knn_equals_brute_force_with_ties(block):
    rng = np.random.default_rng(2)
    # small integers: every dot product is exact in float32, so ties are real ties
    x = rng.integers(-2, 3, size=(150, 6)).astype(np.float32)
    x[40:50] = x[3]  # exact duplicates, straddling block boundaries
    x[140] = x[3]
    idx, sim = knn_cosine(x, 7, block=block)
    ref_idx, ref_sim = _brute_knn(x, 7)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(sim, ref_sim)
    assert not (idx == np.arange(150)[:, None]).any()


def test_knn_small_n_and_memory_is_blocked():
    idx, sim = knn_cosine(np.eye(3, dtype=np.float32), 10)
    assert idx.shape == (3, 2) and sim.shape == (3, 2)
    x = reduce_features(np.random.default_rng(3).random((3000, 24)), dim=16)
    tracemalloc.start()
    idx, sim = knn_cosine(x, 5, block=375)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8e6  # a full 3000^2 float32 matrix alone would be 36 MB
    rows = np.array([0, 374, 375, 2999])
    ref = x[rows] @ x.T
    ref[np.arange(4), rows] = -np.inf
    np.testing.assert_allclose(sim[rows], -np.sort(-ref, axis=1)[:, :5], atol=1e-5)


# ---------------------------------------------------------------------------------- vote-k


def test_vote_k_matches_reference_fast_votek():
    x = np.random.default_rng(4).integers(-2, 3, size=(40, 5)).astype(np.float32)
    x = x[np.linalg.norm(x, axis=1) > 0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    res = vote_k(x, k=5, n_clusters=1, dup_threshold=2.0)
    assert res.order.tolist() == _reference_votek(x, 5)


@pytest.mark.parametrize("k", [None, 8])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sizes", [[15, 15, 15, 15], [30, 8, 20, 12], [40, 5, 5, 10]])
def test_vote_k_one_pick_per_group_first(seed, sizes, k):
    imgs, groups = _group_images(sizes, seed)
    res = vote_k(_features(imgs), k=k)
    top = groups[res.order[:4]]
    assert sorted(top.tolist()) == [0, 1, 2, 3]
    assert sorted(res.vote_rank.tolist()) == list(range(len(groups)))


def test_vote_k_balance_rules():
    x = _features(_group_images([40, 10, 25, 25], 7)[0])
    res = vote_k(x, k=6, n_clusters=9, dup_threshold=2.0)
    assert res.group.max() + 1 == 4  # the four obvious groups, whatever their sizes
    g_picks = np.zeros(4, dtype=int)
    c_picks = np.zeros(res.cluster.max() + 1, dtype=int)
    left = np.ones(len(x), dtype=bool)
    for item in res.order:
        g_open = g_picks[res.group][left]
        assert g_picks[res.group[item]] == g_open.min()  # group rule
        eligible = left & (g_picks[res.group] == g_open.min())
        assert c_picks[res.cluster[item]] == c_picks[res.cluster[eligible]].min()  # cluster rule
        g_picks[res.group[item]] += 1
        c_picks[res.cluster[item]] += 1
        left[item] = False


@pytest.mark.parametrize("n_dup", [3, 30])
def test_vote_k_never_repeats_a_duplicate_while_distinct_remain(n_dup):
    imgs, _ = _group_images([6, 6, 6, 6], 8)
    imgs = np.concatenate([imgs, np.repeat(imgs[:1], n_dup, axis=0)])
    x = _features(imgs)
    res = vote_k(x, k=6)
    sim = x @ x.T
    chosen: list[int] = []
    for item in res.order:
        distinct_left = [
            i for i in range(len(x)) if i not in chosen and all(sim[i, c] <= 0.98 for c in chosen)
        ]
        if distinct_left:
            assert item in distinct_left
        chosen.append(item)


def test_vote_k_deterministic_and_small_pools():
    x = _features(_group_images([10, 10, 10], 9)[0])
    a, b = vote_k(x), vote_k(x)
    for field in ("order", "vote_score", "vote_rank", "cluster"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert vote_k(x[:1]).vote_rank.tolist() == [0]
    assert sorted(vote_k(x[:2]).vote_rank.tolist()) == [0, 1]
    assert len(vote_k(x[:0]).order) == 0
    part = vote_k(x, n_select=5)
    assert sorted(part.vote_rank.tolist()) == list(range(30))
    np.testing.assert_array_equal(part.order[:5], a.order[:5])


# ---------------------------------------------------------------------------------- pools


def _slices_df(n_vol: int, per_plane: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    for v in range(n_vol):
        for plane in PLANES:
            walk = np.cumsum(rng.normal(size=(per_plane, 12)), axis=0)
            for i in range(per_plane):
                rows.append(
                    {
                        "slice_id": f"vol{v}:{plane}:{i}",
                        "volume_id": f"vol{v}",
                        "plane": plane,
                        "index": i,
                    }
                )
                feats.append(walk[i])
    return pd.DataFrame(rows), np.asarray(feats, dtype=np.float32)


def test_rank_pools_independent_of_row_order():
    df, feats = _slices_df(4, 15, 10)
    a = rank_pools(df, feats, k=4)
    perm = np.random.default_rng(0).permutation(len(df))
    b = rank_pools(df.iloc[perm].reset_index(drop=True), feats[perm], k=4)
    cols = ["slice_id", "vote_score", "vote_rank", "selection_order"]
    pd.testing.assert_frame_equal(
        a[cols].sort_values("slice_id").reset_index(drop=True),
        b[cols].sort_values("slice_id").reset_index(drop=True),
    )
    assert sorted(a["selection_order"]) == list(range(len(df)))
    c = rank_pools(df, feats, k=4, workers=2)
    pd.testing.assert_frame_equal(a, c)
    for _, pool in a.groupby(["volume_id", "plane"]):
        assert sorted(pool["vote_rank"]) == list(range(len(pool)))


def test_global_order_round_robins_volumes_then_planes():
    df, feats = _slices_df(5, 8, 11)
    df = df[~((df.volume_id == "vol2") & (df.plane == "sagittal") & (df["index"] > 1))]
    feats = feats[df.index.to_numpy()]
    out = rank_pools(df.reset_index(drop=True), feats, k=3)
    seq = out.sort_values("selection_order")
    n_vol = 5
    assert seq["volume_id"].iloc[:n_vol].nunique() == n_vol
    assert seq[["volume_id", "plane"]].iloc[: 3 * n_vol].drop_duplicates().shape[0] == 3 * n_vol
    assert seq["plane"].iloc[:n_vol].nunique() == 3  # rotated, not all axial first
    # no volume gets its (r+1)-th slice before every volume has r of them
    counts = dict.fromkeys(out["volume_id"].unique(), 0)
    sizes = out.groupby("volume_id").size().to_dict()
    for vol in seq["volume_id"]:
        open_counts = [c for v, c in counts.items() if c < sizes[v]]
        assert counts[vol] == min(open_counts)
        counts[vol] += 1
    # inside a pool the order follows vote_rank (no duplicates here)
    for _, pool in out.groupby(["volume_id", "plane"]):
        ranked = pool.sort_values("selection_order")["vote_rank"].tolist()
        assert ranked == sorted(ranked)


def test_global_order_defers_duplicates():
    df = pd.DataFrame(
        {
            "volume_id": ["a"] * 4 + ["b"] * 2,
            "plane": ["axial"] * 6,
            "index": [0, 1, 2, 3, 0, 1],
            "vote_rank": [0, 1, 2, 3, 0, 1],
            "vote_score": [4.0, 3, 2, 1, 2, 1],
        }
    )
    feats = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [1, 0], [0.6, 0.8]], dtype=np.float32)
    order = global_selection_order(df, "vote_score", "vote_rank", feats)
    # a:1 and a:3 duplicate a:0, so they come after every distinct slice of every pool
    assert set(np.argsort(order)[:4]) == {0, 2, 4, 5}
    assert order[1] < order[3]
    no_dedup = global_selection_order(df, "vote_score", "vote_rank", None)
    assert set(np.argsort(no_dedup)[:2]) == {0, 4}


# ---------------------------------------------------------------------------------- evaluate


def test_evaluate_voter_beats_random_on_label_coverage():
    rows, imgs = [], []
    labels = ["liver", "kidney", "spleen", "lung"]
    for v in range(3):
        for plane in PLANES[:2]:
            pool_imgs, groups = _group_images([14, 6, 10, 8], 20 + v)
            order = np.argsort(groups, kind="stable")  # contiguous label bands along the axis
            for i, j in enumerate(order):
                rows.append(
                    {
                        "slice_id": f"v{v}:{plane}:{i}",
                        "volume_id": f"v{v}",
                        "plane": plane,
                        "index": i,
                        "labels_present": [labels[groups[j]]],
                    }
                )
                imgs.append(pool_imgs[j])
    df = pd.DataFrame(rows)
    feats = _features(np.stack(imgs))
    df = rank_pools(df, feats, k=6)
    res = evaluate(df, feats, ks=(1, 3, 5))
    json.dumps(res)
    m = res["methods"]
    for k in ("3", "5"):
        assert m["voter"][k]["label_coverage"] >= m["random"][k]["label_coverage"]
        assert m["voter"][k]["feature_distance"] <= m["random"][k]["feature_distance"]
    assert m["voter"]["5"]["label_coverage"] == 1.0
    assert m["voter"]["3"]["label_coverage"] > m["random"]["3"]["label_coverage"]
    assert res == evaluate(df, feats, ks=(1, 3, 5))
    table = format_table(res)
    assert "voter" in table and "central" in table and "random" in table
