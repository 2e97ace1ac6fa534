"""Body mask, deferral of near-empty/edge slices, population prior, --stratify labels, exact
random baselines in --evaluate."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import phantom_ras, ras_affine, write_msd_task

from curation.ranking.evaluate import random_hit_probability, random_min_distance
from curation.ranking.informativeness import defer_mask, population_atypicality, prior_from_scores
from curation.ranking.rank import RankConfig, run_rank
from curation.ranking.stratify import stratify_ranks
from curation.ranking.vote import vote_k
from curation.slicing.body_mask import body_mask
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.rows import slice_rows
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.manifest import read_manifest

G = 32


def _ct_with_table(g: int = G) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like normalised cube: an elliptic body (with lungs) and a thin couch below it."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, g)] * 3, indexing="ij")
    body = ((x / 0.7) ** 2 + ((y - 0.1) / 0.45) ** 2 < 1) & (np.abs(z) < 0.9)
    lung = ((x - 0.3) ** 2 + (y - 0.1) ** 2 < 0.03) & (np.abs(z) < 0.5)
    vol = np.where(body & ~lung, 0.52, 0.0)
    table = (np.abs(x) < 0.85) & (y > -0.52) & (y < -0.44)  # 1-2 voxels thick, a gap to the body
    vol[table] = 0.6
    return vol.astype(np.float16), table


def test_body_mask_drops_table_keeps_lungs():
    vol, table = _ct_with_table()
    m = body_mask(vol)
    assert not m[table].any()
    body = (vol > 0.5) & ~table
    assert m[body].mean() > 0.99  # all but a few voxels of a 2-voxel wall at this tiny grid
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, G)] * 3, indexing="ij")
    lung = ((x - 0.3) ** 2 + (y - 0.1) ** 2 < 0.03) & (np.abs(z) < 0.5)
    assert m[lung].all()  # air inside the body is body
    assert not body_mask(np.zeros((8, 8, 8))).any()
    fast = body_mask(vol, stride=2)
    assert not fast[table].any() and fast.sum() > 0.8 * (m & (vol > 0.05)).sum()


def test_slice_rows_index_no_table_only_slice():
    vol, table = _ct_with_table()
    rows = pd.DataFrame(slice_rows("v", vol, None, {}, level=0.05, min_foreground=0.01))
    table_y = sorted(set(np.argwhere(table)[:, 1]))
    cor = rows[rows["plane"] == "coronal"]
    assert not set(cor["index"]) & set(table_y)  # coronal slices through the couch alone
    assert (rows["foreground_fraction"] > 0).all()


def test_defer_mask_near_empty_and_edges():
    df = pd.DataFrame(
        {
            "volume_id": ["a"] * 20,
            "plane": ["axial"] * 20,
            "index": np.arange(20),
            "foreground_fraction": np.r_[[0.02, 0.05], np.full(16, 0.5), [0.1, 0.03]],
        }
    )
    d = defer_mask(df, rel_min=0.25, edge=0.05)
    assert d.tolist() == [True, True] + [False] * 16 + [True, True]
    x = np.random.default_rng(0).normal(size=(20, 4))
    res = vote_k(x, defer=d)
    assert set(res.order[:16]) == set(range(2, 18))  # deferred come last
    assert sorted(res.vote_rank.tolist()) == list(range(20))


def test_population_atypicality_finds_the_odd_slice():
    rng = np.random.default_rng(1)
    n_vol, n_idx, side = 8, 12, 8
    base = rng.random((n_idx, side * side)).astype(np.float32)
    rows, thumbs = [], []
    for v in range(n_vol):
        for i in range(n_idx):
            t = base[i] * rng.uniform(0.9, 1.1) + rng.normal(0, 0.01, side * side)
            if v == 3 and i == 7:
                t = t.copy()
                t[27] += 0.8  # a bright spot no other volume has here
            rows.append({"volume_id": f"v{v}", "plane": "axial", "index": i})
            thumbs.append(t)
    df = pd.DataFrame(rows)
    score = population_atypicality(np.asarray(thumbs), df, refs=5, shift=1)
    assert int(np.argmax(score)) == 3 * n_idx + 7
    prior = prior_from_scores(score)
    assert prior.max() == 1.0 and prior.min() == 0.0
    # too small a cohort: no population, NaN -> prior 0
    few = population_atypicality(np.asarray(thumbs[: 2 * n_idx]), df.iloc[: 2 * n_idx], min_refs=3)
    assert np.isnan(few).all() and not prior_from_scores(few).any()
    # the prior lifts the odd slice to the first pick of its pool; without it vote-k decides
    feats = np.asarray(thumbs)[3 * n_idx : 4 * n_idx]
    assert vote_k(feats, prior=prior[3 * n_idx : 4 * n_idx], prior_weight=2.0).order[0] == 7


def test_stratify_gives_every_class_an_early_pick():
    df = pd.DataFrame(
        {
            "volume_id": ["a"] * 6,
            "plane": ["axial"] * 6,
            "vote_rank": [0, 1, 2, 3, 4, 5],
            "labels_present": [[], [], ["liver"], ["liver", "tumour"], [], ["kidney"]],
        }
    )
    r = stratify_ranks(df)
    assert sorted(r.tolist()) == list(range(6))
    first = df.assign(r=r).sort_values("r").head(3)["labels_present"]
    assert set().union(*map(set, first)) == {"liver", "tumour", "kidney"}
    # in vote order, each slice that shows a class not shown yet; then the rest in vote order
    assert (r[2], r[3], r[5], r[0], r[1], r[4]) == (0, 1, 2, 3, 4, 5)


def test_random_expectations_are_exact():
    m, k = 7, 3
    pos = {1, 4}
    brute = np.mean([bool(pos & set(c)) for c in combinations(range(m), k)])
    assert random_hit_probability(m, 2, k) == pytest.approx(brute)
    d = np.random.default_rng(2).random((5, m))
    brute_d = np.mean([d[:, list(c)].min(axis=1).mean() for c in combinations(range(m), k)])
    assert random_min_distance(d, k) == pytest.approx(brute_d)


def _lesion_workdir(tmp_path: Path, n: int = 5) -> Path:
    cases = {}
    for k in range(n):
        data, _ = phantom_ras(seed=k)
        label = np.zeros(data.shape, dtype=np.uint8)
        c = (6 + 3 * k, 8 + (k % 3), 5 + 2 * k)  # a small bright lesion, somewhere else each time
        data[c[0] - 1 : c[0] + 2, c[1] - 1 : c[1] + 2, c[2] - 1 : c[2] + 1] = 900.0
        label[c[0] - 1 : c[0] + 2, c[1] - 1 : c[1] + 2, c[2] - 1 : c[2] + 1] = 1
        cases[f"c{k}"] = (data, ras_affine(), label)
    task = write_msd_task(tmp_path / "d", "Task06_Lesion", cases, labels={"0": "background", "1": "lesion"})
    w = tmp_path / "w"
    run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=G)), log=lambda *_: None)
    return w


def test_population_prior_finds_lesions_and_evaluation_reports_it(tmp_path: Path):
    w = _lesion_workdir(tmp_path)
    plain = run_rank(RankConfig(workdir=w, evaluate=True)).evaluation
    informed = run_rank(RankConfig(workdir=w, evaluate=True, atypicality_weight=2.0)).evaluation
    les_plain, les = plain["classes"]["lesion"], informed["classes"]["lesion"]
    assert les["voter"]["1"] > les["random"]["1"]
    assert les["voter"]["1"] >= les_plain["voter"]["1"]
    m = informed["methods"]
    assert m["voter"]["5"]["coverage_distance"] <= m["random"]["5"]["coverage_distance"] + 0.02
    assert informed["random"].startswith("exact")
    df = read_manifest(w / "manifests/slices.parquet")
    assert sorted(df["selection_order"]) == list(range(len(df)))


def test_no_near_empty_slice_among_early_picks_and_stratify(tmp_path: Path):
    w = _lesion_workdir(tmp_path, n=3)
    run_rank(RankConfig(workdir=w, stratify="labels"))
    df = read_manifest(w / "manifests/slices.parquet")
    for _, pool in df.groupby(["volume_id", "plane"]):
        early = pool.sort_values("vote_rank").head(5)
        assert (early["foreground_fraction"] >= 0.25 * pool["foreground_fraction"].max()).all()
        assert early["index"].between(pool["index"].min() + 1, pool["index"].max() - 1).all()
        present = set().union(*map(set, pool["labels_present"]))
        first = pool.sort_values("vote_rank").head(len(present))
        assert set().union(*map(set, first["labels_present"])) == present
    with pytest.raises(ValueError):
        run_rank(RankConfig(workdir=w, stratify="organs"))
