"""The voter's evaluation: random over the same eligible slices, the central slice, and
subject-bootstrap intervals of the differences, on tiny pools whose answer is known."""

from __future__ import annotations

import json
from itertools import combinations
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_rank import _workdir
from typer.testing import CliRunner

from curation.ranking.evaluate import evaluate, format_table, random_expectation

N = 10
ELIGIBLE = np.array([False, False, True, True, True, True, True, True, False, False])  # 2..7
LESION = (3, 6)  # eligible, away from the middle: the central slice (4) misses it


def _pools(subjects: list[str], voter_first: dict[str, int] | None = None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """One axial pool of N slices per subject; the voter ranks ``voter_first[s]`` (default slice 3,
    a lesion slice) first, then the other eligible ones, the deferred ones last."""
    rows, feats = [], []
    rng = np.random.default_rng(0)
    for s in subjects:
        first = (voter_first or {}).get(s, 3)
        order = [first] + [i for i in range(N) if ELIGIBLE[i] and i != first] + [i for i in range(N) if not ELIGIBLE[i]]
        rank = {i: r for r, i in enumerate(order)}
        for i in range(N):
            rows.append({"volume_id": f"vol-{s}", "plane": "axial", "index": i, "vote_rank": rank[i],
                         "foreground_fraction": 1.0 if ELIGIBLE[i] else 0.0,
                         "labels_present": ["lesion"] if i in LESION else []})
            feats.append(rng.normal(size=4))
    df = pd.DataFrame(rows)
    return df, np.stack(feats), np.tile(ELIGIBLE, len(subjects))


def test_random_over_eligible_slices_and_central_with_known_answers():
    df, feats, elig = _pools(["a", "b", "c"])
    res = evaluate(df, feats, ks=(1, 3, 8), eligible=elig, resamples=200)
    json.dumps(res)
    m = res["methods"]
    assert m["voter"]["1"]["hit_rate"] == 1.0 and m["central"]["1"]["hit_rate"] == 0.0
    assert m["random_eligible"]["1"]["hit_rate"] == pytest.approx(2 / 6)  # 2 lesion slices of 6 eligible
    assert m["random"]["1"]["hit_rate"] == pytest.approx(2 / 10)  # of all 10
    assert m["random_eligible"]["3"]["hit_rate"] == pytest.approx(1 - comb(4, 3) / comb(6, 3))
    assert m["random"]["3"]["hit_rate"] == pytest.approx(1 - comb(8, 3) / comb(10, 3))
    # k beyond the eligible slices: all 6 eligible + 2 of the 4 deferred (near-empty) ones
    assert m["random_eligible"]["8"]["hit_rate"] == 1.0
    assert m["random_eligible"]["8"]["near_empty"] == pytest.approx(2 / 8)
    assert m["random"]["8"]["near_empty"] == pytest.approx(4 / 10)
    assert m["random_eligible"]["1"]["near_empty"] == 0.0
    # every pool gives the same difference: the interval is the point
    d = res["differences"]["voter-random_eligible"]["1"]["hit_rate"]
    assert d["diff"] == pytest.approx(2 / 3) and d["ci95"] == pytest.approx([2 / 3, 2 / 3])
    c = res["differences"]["voter-central"]["1"]["hit_rate"]
    assert c["diff"] == 1.0 and c["ci95"] == [1.0, 1.0]
    assert res["n_subjects"] == 3 and res["n_eligible_slices"] == 18 and res["bootstrap"]["unit"] == "subject"
    assert res["classes"]["lesion"]["random_eligible"]["1"] == pytest.approx(2 / 6)
    text = format_table(res)
    assert "random_eligible" in text and "voter-central" in text and "[+0.667, +0.667]" in text
    # without eligibility every slice is eligible: random_eligible is random
    plain = evaluate(df, feats, ks=(1, 3), resamples=50)
    assert plain["methods"]["random_eligible"] == plain["methods"]["random"]


def test_subject_bootstrap_resamples_subjects_not_pools():
    # subject a: two pools (two volumes) where the voter hits; subject b: one pool where it misses
    df_a, f_a, e_a = _pools(["a1", "a2"])
    df_b, f_b, e_b = _pools(["b"], voter_first={"b": 2})  # slice 2: eligible, no lesion
    df = pd.concat([df_a, df_b], ignore_index=True)
    feats, elig = np.concatenate([f_a, f_b]), np.concatenate([e_a, e_b])
    subjects = np.where(df["volume_id"].str.startswith("vol-a"), "a", "b")
    res = evaluate(df, feats, ks=(1,), eligible=elig, subjects=subjects, resamples=2000, seed=1)
    d = res["differences"]["voter-random_eligible"]["1"]["hit_rate"]
    assert d["diff"] == pytest.approx((2 * (1 - 1 / 3) + (0 - 1 / 3)) / 3)
    # resamples: {a, a} -> 2/3, {b, b} -> -1/3, mixed -> the point; never a pool split off a subject
    lo, hi = d["ci95"]
    assert lo == pytest.approx(-1 / 3) and hi == pytest.approx(2 / 3)
    assert res["n_subjects"] == 2 and res == evaluate(df, feats, ks=(1,), eligible=elig, subjects=subjects,
                                                       resamples=2000, seed=1)


def test_random_expectation_matches_enumeration():
    rng = np.random.default_rng(3)
    m = 7
    lab = rng.random((m, 2)) < 0.3
    d = rng.random((m, m))
    empty = rng.random(m) < 0.4
    elig = np.array([True, False, True, True, False, False, True])
    for k in (1, 2, 4, 5, 7):
        hits, dist, near = random_expectation(lab, {"x": d}, empty, elig, k)
        e, rest = np.flatnonzero(elig), np.flatnonzero(~elig)
        subsets = ([list(c) for c in combinations(e, k)] if k <= len(e)
                   else [list(e) + list(c) for c in combinations(rest, k - len(e))])
        assert hits == pytest.approx(np.mean([lab[s].any(axis=0) for s in subsets], axis=0))
        assert dist["x"] == pytest.approx(np.mean([d[:, s].min(axis=1).mean() for s in subsets]))
        assert near == pytest.approx(np.mean([empty[s].mean() for s in subsets]))


def test_curate_rank_evaluate_writes_and_prints_the_comparison(tmp_path: Path):
    from med3dinsight.curate import app

    w = _workdir(tmp_path)
    res = CliRunner().invoke(app, ["rank", "--workdir", str(w), "--evaluate"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    assert "random_eligible" in res.output and "voter-central" in res.output and "bootstrap over subjects" in res.output
    ev = json.loads((w / "reports/rank_eval.json").read_text())["result"]
    assert set(ev["methods"]) == {"voter", "random_eligible", "random", "central"}
    assert set(ev["differences"]) == {"voter-random_eligible", "voter-central"}
    assert ev["n_subjects"] == 3 and ev["n_eligible_slices"] < ev["n_slices"]
    assert ev["differences"]["voter-central"]["1"]["feature_distance"]["ci95"][0] <= \
        ev["differences"]["voter-central"]["1"]["feature_distance"]["diff"]
