"""bench_selection.py end to end at --quick: disjoint cohorts, every arm over paired seeds, the voter arm is
`curate caption --budget B`'s picks, the random arms match its per-pool counts, and every metric has a
difference with a bootstrap interval. The outcome (which arm wins) is not asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

pytest.importorskip("nilearn")
pytest.importorskip("sklearn")


def test_bootstrap_interval_covers_the_mean_and_sees_a_shift():
    import bench_selection as bs

    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(20), 10).astype(str)
    w = np.full(200, 1 / 200)
    shifted = bs.bootstrap_diff(rng.normal(0.1, 0.05, (4, 200)), w, subjects, reps=500)
    lo, hi = shifted["ci95"]
    assert lo < shifted["diff"] < hi and lo > 0
    lo0, hi0 = bs.bootstrap_diff(rng.normal(0.0, 0.05, (4, 200)), w, subjects, reps=500)["ci95"]
    assert lo0 < 0 < hi0


def test_random_picks_match_pool_counts_and_prefer_eligible():
    import bench_selection as bs
    import pandas as pd

    slices = pd.DataFrame({"volume_id": ["a"] * 6 + ["b"] * 4, "plane": ["axial"] * 10,
                           "slice_id": [f"x{i}" for i in range(10)]})
    eligible = np.array([1, 1, 0, 0, 1, 0, 0, 1, 1, 0], bool)
    counts = pd.Series({("a", "axial"): 3, ("b", "axial"): 3})
    for seed in range(5):
        rng = np.random.default_rng(seed)
        picks = bs.random_picks(slices, counts, eligible, rng, from_eligible=True)
        assert len(picks) == 6 and len(set(picks)) == 6
        a, b = picks[picks < 6], picks[picks >= 6]
        assert set(a) == {0, 1, 4}  # pool a has exactly 3 eligible
        assert len(b) == 3 and {7, 8} <= set(b)  # pool b: both eligible, then one deferred
        allp = bs.random_picks(slices, counts, eligible, np.random.default_rng(seed), from_eligible=False)
        assert len(allp) == 6 and len(allp[allp < 6]) == 3


def test_quick_end_to_end(tmp_path):
    import bench_selection as bs

    out_json = tmp_path / "r.json"
    out = bs.main(["--quick", "--keep", str(tmp_path / "work"), "--json", str(out_json)])
    assert json.loads(out_json.read_text())["arms"] == out["arms"] == list(bs.ARMS)
    size = out["size"]
    # disjoint cohorts of the sizes asked for
    assert len(out["selection_subjects"]) == size["subjects"] and len(out["held_out_subjects"]) == size["held_out"]
    assert not set(out["selection_subjects"]) & set(out["held_out_subjects"])
    assert 0 < out["budget"] < out["selection_eligible"] <= out["selection_slices"]
    # paired seeds: every arm trained and evaluated once per seed, on budget-sized training sets
    assert out["seeds"] == list(range(size["seeds"])) and size["seeds"] >= 2
    for arm in out["arms"]:
        assert [r["seed"] for r in out["per_seed"][arm]] == out["seeds"]
        assert all(p["pairs"] == out["budget"] for p in out["picks"][arm])
        for m in out["metrics"] + out["point_metrics"]:
            assert all(np.isfinite(r[m]) for r in out["per_seed"][arm]), (arm, m)
    assert set(out["untrained"]) == set(out["metrics"] + out["point_metrics"])
    assert all(p["eligible_share"] == 1.0 for p in out["picks"]["voter"] + out["picks"]["random_eligible"])
    # the voter arm is what `curate caption --budget B` releases: its first B slices in selection order
    from curation.store.manifest import read_manifest

    voter = read_manifest(tmp_path / "work" / "arm-voter" / "manifests" / "v1.parquet")
    assert len(voter) == out["budget"] and voter["selection_order"].tolist() == list(range(out["budget"]))
    # differences with subject x seed bootstrap intervals for every per-slice metric
    for pair in ("voter-random_eligible", "voter-random_all"):
        for m in out["metrics"]:
            d = out["differences"][pair][m]
            assert np.isfinite(d["diff"]) and d["ci95"][0] <= d["ci95"][1], (pair, m, d)
    assert out["bootstrap"]["unit"] == "held-out subject x seed"
