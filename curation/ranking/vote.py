"""Vote-MI-style slice voter: blocked k-NN, vote-k ranking, global order (features: features.py).

The greedy step follows ``fast_votek`` of the vote-k authors (Su et al. 2022,
HKUNLP/icl-selective-annotation, ``two_steps.py``): every item votes for its k nearest
neighbours (cosine); a candidate's score is the sum over its voters that are not selected yet
of ``10 ** -times[voter]``, where ``times[voter]`` counts the selected items that voter votes
for; after a pick, ``times`` of each of its voters goes up by one. What differs here, and why:

- self is excluded from the k-NN exactly (the authors drop the top-1 and assume it is self,
  which loses a neighbour when duplicates tie with self);
- ties: highest score, then most voters (the authors' ``max`` over a vote-count-sorted list),
  then the lowest row index; the authors stop at ``select_num`` and never rank items with no
  voters, here every item gets a rank;
- eligibility rules the authors do not have (see ``vote_k``): near-duplicates of a selected
  item wait until no distinct candidate is left; single-linkage groups (obvious groups of
  slices) and then k-means clusters each get their r-th pick before any gets its (r+1)-th.

Memory and time are linear in the number of slices: k-NN, clustering and the greedy run per
(volume, plane) pool, and the global order is a few sorts.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

from curation.ranking.features import l2_normalize
from curation.ranking.order import global_selection_order, group_starts, plane_codes, tiebreak, volume_codes

_PAD = np.iinfo(np.int64).max  # index of a padding neighbour; sorts after every real one


# ---------------------------------------------------------------------------------- k-NN


def _topk_rows(sim: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the k largest entries of ``sim`` (-inf = excluded), ties to the lower column."""
    rows_n, m = sim.shape
    if m > k:
        kth = np.partition(sim, m - k, axis=1)[:, m - k : m - k + 1]
        mask = sim >= kth  # may hold more than k on ties; trimmed below
        mask &= sim > -np.inf
    else:
        mask = sim > -np.inf
    rows, cols = np.nonzero(mask)
    vals = sim[rows, cols]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.searchsorted(rows, np.arange(rows_n))
    rank = np.arange(len(rows)) - starts[rows]
    keep = rank < k
    out_s = np.full((rows_n, k), -np.inf, dtype=np.float32)
    out_i = np.full((rows_n, k), _PAD, dtype=np.int64)
    out_s[rows[keep], rank[keep]] = vals[keep]
    out_i[rows[keep], rank[keep]] = cols[keep] + offset
    return out_s, out_i


def knn_cosine(feats: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by cosine, self excluded; rows must be L2-normalised.

    Query and database are both cut into ``block`` rows, so memory is O(block^2 + n * k)
    whatever n is. Neighbours are ordered by decreasing similarity, ties by increasing index.

    Returns:
        (idx, sim): int64 and float32 arrays of shape (n, min(k, n - 1)).
    """
    x = np.ascontiguousarray(feats, dtype=np.float32)
    n = len(x)
    k = max(0, min(int(k), n - 1))
    idx = np.empty((n, k), dtype=np.int64)
    sim = np.empty((n, k), dtype=np.float32)
    if k == 0:
        return idx, sim
    for qs in range(0, n, block):
        q = x[qs : qs + block]
        best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        best_i = np.full((len(q), k), _PAD, dtype=np.int64)
        for ds in range(0, n, block):
            s = q @ x[ds : ds + block].T
            lo, hi = max(qs, ds), min(qs + len(q), ds + block)
            if lo < hi:  # this block holds some of the queries themselves
                r = np.arange(lo, hi)
                s[r - qs, r - ds] = -np.inf
            bs, bi = _topk_rows(s, k, ds)
            cs = np.concatenate([best_s, bs], axis=1)
            ci = np.concatenate([best_i, bi], axis=1)
            pick = np.lexsort((ci, -cs), axis=1)[:, :k]
            best_s = np.take_along_axis(cs, pick, axis=1)
            best_i = np.take_along_axis(ci, pick, axis=1)
        idx[qs : qs + len(q)] = best_i
        sim[qs : qs + len(q)] = best_s
    return idx, sim


# ---------------------------------------------------------------------------------- vote-k


def _kmeans(x: np.ndarray, n_clusters: int, seed: int, n_iter: int = 30) -> np.ndarray:
    """Seeded k-means++ then Lloyd; labels 0..c-1 (fewer clusters when points coincide)."""
    n = len(x)
    if n_clusters <= 1 or n <= 1:
        return np.zeros(n, dtype=np.int64)
    x = x.astype(np.float64)
    rng = np.random.default_rng(seed)
    centers = [int(rng.integers(n))]
    d2 = ((x - x[centers[0]]) ** 2).sum(axis=1)
    for _ in range(1, min(n_clusters, n)):
        total = d2.sum()
        if total <= 1e-12:
            break
        c = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
        centers.append(min(c, n - 1))
        d2 = np.minimum(d2, ((x - x[centers[-1]]) ** 2).sum(axis=1))
    cen = x[centers]
    labels = np.full(n, -1)
    for _ in range(n_iter):
        dist = (x**2).sum(1)[:, None] - 2.0 * x @ cen.T + (cen**2).sum(1)[None, :]
        new = dist.argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=len(cen))
        sums = np.zeros_like(cen)
        np.add.at(sums, labels, x)
        filled = counts > 0
        cen[filled] = sums[filled] / counts[filled, None]
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def _gap_groups(x: np.ndarray, min_size: int, factor: float) -> np.ndarray:
    """Single-linkage groups: cut the minimum spanning tree (cosine-chord lengths) at edges
    longer than ``factor`` x the median positive edge; groups under ``min_size`` items join
    the group of their most similar item in a large one."""
    n = len(x)
    if n < 2 * min_size:
        return np.zeros(n, dtype=np.int64)
    d = np.sqrt(np.maximum(2.0 - 2.0 * (x @ x.T).astype(np.float64), 0.0)) + 1e-9
    np.fill_diagonal(d, 0.0)  # zeros are "no edge" to scipy, hence the 1e-9 above
    tree = minimum_spanning_tree(d).tocoo()
    positive = tree.data[tree.data > 1e-6]
    if len(positive) == 0:
        return np.zeros(n, dtype=np.int64)
    keep = tree.data <= factor * np.median(positive)
    graph = sparse.coo_matrix((tree.data[keep], (tree.row[keep], tree.col[keep])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    big = np.bincount(label)[label] >= min_size
    if not big.any():
        return np.zeros(n, dtype=np.int64)
    small = np.flatnonzero(~big)
    if len(small):
        label[small] = label[np.flatnonzero(big)[(x[small] @ x[big].T).argmax(axis=1)]]
    return np.unique(label, return_inverse=True)[1].astype(np.int64)


@dataclass(frozen=True)
class VoteResult:
    """Output of ``vote_k``; per-item arrays are aligned with the input rows."""

    order: np.ndarray  # item indices, best first
    vote_score: np.ndarray  # float64: greedy score when the item was picked
    vote_rank: np.ndarray  # int64: position in ``order`` (0 = best)
    n_votes: np.ndarray  # int64: how many items have this one among their k-NN
    group: np.ndarray  # int64: single-linkage group (coarse balance)
    cluster: np.ndarray  # int64: k-means cluster (fine balance)


def auto_k(n: int) -> int:
    """Default neighbourhood size for a pool of n items: n // 3, clipped to [3, 40].

    A neighbourhood this wide makes the first picks representative of the whole pool (close
    to its medoid); n // 10 or n // 5 favour slowly-varying ends of a slice stack instead.
    """
    return int(min(40, max(3, n // 3)))


def vote_k(
    feats: np.ndarray,
    k: int | None = None,
    n_select: int | None = None,
    *,
    n_clusters: int | None = None,
    max_clusters: int = 16,
    min_group: int = 3,
    gap_factor: float = 3.0,
    dup_threshold: float = 0.98,
    seed: int = 0,
    prior: np.ndarray | None = None,
    prior_weight: float = 0.0,
    defer: np.ndarray | None = None,
) -> VoteResult:
    """Rank items by vote-k greedy selection with balance rules and duplicate deferral.

    Each step picks, among the eligible unselected items, the highest
    ``score(c) = sum(10 ** -times[v] for unselected voters v of c)`` (ties: more voters, then
    lower index); ``k`` defaults to ``auto_k(n)``. With a ``prior`` (per item, in [0, 1]: how
    informative, e.g. atypical, an item is) and ``prior_weight`` w > 0 the greedy maximises
    ``score(c) / max(n_votes) + w * prior(c)`` instead: representativeness (1 for the best
    voted item before any pick, decaying as its voters get covered) plus informativeness.
    ``defer`` (bool per item: near-empty, edge) items are ranked after all others, by their
    own vote-k among themselves, and neither vote for nor are voted by the others. Eligible,
    each rule applied to the candidates the one before leaves:

    1. not a near-duplicate (cosine > ``dup_threshold``) of a selected item, unless only
       near-duplicates are left;
    2. in a group with the fewest picks so far among groups holding a candidate;
    3. in a k-means cluster with the fewest picks so far among clusters holding a candidate.

    So no group (cluster) gets a second pick before every group (cluster) with a candidate
    has one; in general its (r+1)-th pick waits until all such have r. Groups: the minimum
    spanning tree cut at edges longer than ``gap_factor`` x its median edge, groups under
    ``min_group`` items joined to the most similar large one; they separate obvious groups
    of slices whatever their sizes, and a continuum stays one group. Clusters: seeded
    k-means++/Lloyd with ``n_clusters`` (default ``min(max_clusters, ceil(sqrt(n)))``)
    spread picks along a continuum. The greedy runs ``n_select`` steps (default: all);
    the items left are ranked after them by their final score with the same tie-breaks, and
    their ``vote_score`` is that final score. Cost O(n^2 * (d + k)), memory
    O(n * k): meant for one (volume, plane) pool, not a whole dataset.
    """
    x = l2_normalize(np.asarray(feats))
    n = len(x)
    empty = np.zeros(0, dtype=np.int64)
    if n == 0:
        return VoteResult(empty, np.zeros(0), empty, empty, empty, empty)
    opts = dict(n_clusters=n_clusters, max_clusters=max_clusters, min_group=min_group,
                gap_factor=gap_factor, dup_threshold=dup_threshold, seed=seed, prior_weight=prior_weight)
    if defer is not None and np.any(defer) and not np.all(defer):
        return _split_deferred(x, k, n_select, np.asarray(defer, dtype=bool), prior, opts)
    k = auto_k(n) if k is None else int(k)
    nbr, _ = knn_cosine(x, k)
    kk = nbr.shape[1]
    n_votes = np.bincount(nbr.ravel(), minlength=n).astype(np.int64)
    voters = np.repeat(np.arange(n), kk)[np.argsort(nbr.ravel(), kind="stable")]
    vptr = np.concatenate([[0], np.cumsum(n_votes)])
    if n_clusters is None:
        n_clusters = min(max_clusters, math.ceil(math.sqrt(n)))
    cluster = _kmeans(x, n_clusters, seed)
    picks = np.zeros(cluster.max() + 1, dtype=np.int64)
    group = _gap_groups(x, min_group, gap_factor)
    group_picks = np.zeros(group.max() + 1, dtype=np.int64)
    balance = [(lab, c) for lab, c in ((group, group_picks), (cluster, picks)) if len(c) > 1]

    # cnt[c, t]: unselected voters of c that vote for t selected items (exact integers kept
    # as float64). Scores are recomputed from these counts row by row, so equal situations
    # give bit-equal scores whatever the row order.
    width = kk + 2
    cnt = np.zeros((n, width), dtype=np.float64)
    cnt[:, 0] = n_votes
    cnt_flat = cnt.reshape(-1)  # a view: a voter moving level t -> t+1 is flat f -> f+1
    weight = 10.0 ** -np.arange(width)
    score = n_votes.astype(np.float64)
    bonus = None
    if prior is not None and prior_weight > 0:
        bonus = prior_weight * np.clip(np.nan_to_num(np.asarray(prior, dtype=np.float64)), 0.0, 1.0)
    scale = float(max(n_votes.max(), 1))
    times = np.zeros(n, dtype=np.int64)
    selected = np.zeros(n, dtype=bool)
    max_sim = np.full(n, -np.inf, dtype=np.float32)
    vote_score = np.zeros(n, dtype=np.float64)
    order: list[int] = []
    steps = n if n_select is None else max(0, min(int(n_select), n))
    for _ in range(steps):
        cand = ~selected
        distinct = cand & (max_sim <= dup_threshold)
        if distinct.any():
            cand = distinct
        for label, count in balance:
            have = count[label]
            cand &= have == have[cand].min()
        eff = score if bonus is None else score / scale + bonus
        s = _best(cand, eff, n_votes)
        order.append(s)
        vote_score[s] = eff[s]
        selected[s] = True
        group_picks[group[s]] += 1
        picks[cluster[s]] += 1
        np.maximum(max_sim, x @ x[s], out=max_sim)
        # s stops voting; each unselected voter of s now covers one more selected item
        cnt_flat[nbr[s] * width + times[s]] -= 1.0
        vs = voters[vptr[s] : vptr[s + 1]]
        live = vs[~selected[vs]]
        if len(live):
            flat = (nbr[live] * width + times[live][:, None]).ravel()
            moved = np.bincount(flat, minlength=n * width).astype(np.float64)
            cnt_flat -= moved
            cnt_flat[1:] += moved[:-1]
        times[vs] += 1
        score = np.einsum("ij,j->i", cnt, weight)  # own loop, same order for every row
    eff = score if bonus is None else score / scale + bonus
    rest = np.flatnonzero(~selected)
    rest = rest[np.lexsort((rest, -n_votes[rest], -eff[rest]))]
    vote_score[rest] = eff[rest]
    full = np.concatenate([np.asarray(order, dtype=np.int64), rest])
    rank = np.empty(n, dtype=np.int64)
    rank[full] = np.arange(n)
    return VoteResult(full, vote_score, rank, n_votes, group, cluster)


def _split_deferred(
    x: np.ndarray, k: int | None, n_select: int | None, defer: np.ndarray, prior: np.ndarray | None, opts: dict
) -> VoteResult:
    """vote_k on the kept items, then on the deferred ones, concatenated (see ``vote_k``)."""
    n = len(x)
    parts = [np.flatnonzero(~defer), np.flatnonzero(defer)]
    order, vote_score = [], np.zeros(n)
    n_votes, group, cluster = (np.zeros(n, dtype=np.int64) for _ in range(3))
    offset = 0
    for rows in parts:
        sub = vote_k(x[rows], k, n_select, prior=None if prior is None else np.asarray(prior)[rows], **opts)
        order.append(rows[sub.order])
        vote_score[rows] = sub.vote_score
        n_votes[rows] = sub.n_votes
        group[rows] = sub.group + offset
        cluster[rows] = sub.cluster + offset
        offset = int(max(group.max(), cluster.max())) + 1
    full = np.concatenate(order)
    rank = np.empty(n, dtype=np.int64)
    rank[full] = np.arange(n)
    return VoteResult(full, vote_score, rank, n_votes, group, cluster)


def _best(cand: np.ndarray, score: np.ndarray, n_votes: np.ndarray) -> int:
    """Index of the best candidate: max score, then max votes, then lowest index."""
    sc = np.where(cand, score, -np.inf)
    tie = np.flatnonzero(sc == sc.max())
    if len(tie) > 1:
        tie = tie[n_votes[tie] == n_votes[tie].max()]
    return int(tie[0])


# ---------------------------------------------------------------------------------- pools

def _single_thread_blas() -> None:
    # BLAS threads of two worker processes spin against each other on tiny matrices
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a transitive dependency (scikit-learn); only a speed loss without
        return
    threadpool_limits(1)


def _rank_chunk(job: tuple[list[tuple], int | None, dict]) -> list[tuple[np.ndarray, ...]]:
    pools, k, opts = job
    out = []
    for xp, pp, dp in pools:
        r = vote_k(xp, k, prior=pp, defer=dp, **opts)
        out.append((r.vote_score, r.vote_rank))
    return out


def rank_pools(
    df: pd.DataFrame,
    feats: np.ndarray,
    k: int | None = None,
    *,
    dup_threshold: float = 0.98,
    max_clusters: int = 16,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    prior: np.ndarray | None = None,
    prior_weight: float = 0.0,
    defer: np.ndarray | None = None,
) -> pd.DataFrame:
    """Run ``vote_k`` per (volume_id, plane) pool and fill vote_score, vote_rank, selection_order.

    ``feats`` is aligned with ``df`` rows; ``k`` defaults to ``auto_k`` of each pool's size.
    ``prior`` (informativeness in [0, 1]), ``prior_weight`` and ``defer`` (bool) are aligned
    with ``df`` rows and passed to ``vote_k`` per pool; deferred slices also come last in
    the global order.
    Each pool's rows are put in a canonical order (by ``index``, else ``slice_id``) first, so
    the result does not depend on the row order of ``df``, nor on ``workers`` (processes,
    pools are independent). ``progress`` is called with the number of pools done so far.
    Returns a copy of ``df``.
    """
    out = df.copy()
    n = len(df)
    x = l2_normalize(np.asarray(feats))
    if len(x) != n:
        raise ValueError(f"features have {len(x)} rows, slices {n}")
    vol = volume_codes(df["volume_id"])
    plane, n_planes = plane_codes(df["plane"])
    pool = vol * n_planes + plane
    o = np.lexsort((tiebreak(df), pool))
    starts = group_starts(pool[o])
    bounds = list(zip(starts[:-1], starts[1:]))
    chunks = [bounds[i : i + 64] for i in range(0, len(bounds), 64)]
    opts = {"dup_threshold": dup_threshold, "max_clusters": max_clusters, "seed": seed, "prior_weight": prior_weight}
    pr = None if prior is None else np.asarray(prior, dtype=np.float64)
    de = None if defer is None else np.asarray(defer, dtype=bool)

    def pool_args(a: int, b: int) -> tuple:
        rows = o[a:b]
        return x[rows], None if pr is None else pr[rows], None if de is None else de[rows]

    jobs = (([pool_args(a, b) for a, b in chunk], k, opts) for chunk in chunks)
    vote_score = np.zeros(n, dtype=np.float64)
    vote_rank = np.zeros(n, dtype=np.int64)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork of BLAS/torch thread state
            pool_ex = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=ctx, initializer=_single_thread_blas)
            )
            results = pool_ex.map(_rank_chunk, jobs)
        else:
            results = map(_rank_chunk, jobs)
        done = 0
        for chunk, res in zip(chunks, results):
            for (a, b), (score, rank) in zip(chunk, res):
                vote_score[o[a:b]] = score
                vote_rank[o[a:b]] = rank
            done += len(chunk)
            if progress is not None:
                progress(done)
    out["vote_score"] = vote_score
    out["vote_rank"] = vote_rank.astype(np.int32)
    out["selection_order"] = global_selection_order(
        out, "vote_score", "vote_rank", x, dup_threshold=dup_threshold, deferred=de
    )
    return out
