"""bench_downstream.py end to end at --size tiny: disjoint cohorts, every arm, the linear probes and
fine-tuning, per-case results, paired differences with bootstrap intervals, the table and the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

pytest.importorskip("nilearn")


def test_paired_bootstrap_interval_covers_mean_and_detects_shift():
    import downstream_eval as de

    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 0.05, (8, 150))
    mean, lo, hi = de.paired_bootstrap(d, reps=500)
    assert lo < mean < hi and lo > 0
    _, lo0, hi0 = de.paired_bootstrap(rng.normal(0, 0.05, (8, 150)), reps=500)
    assert lo0 < 0 < hi0


def test_token_labels_follow_monai_patch_order():
    import downstream_eval as de
    import torch

    y = torch.zeros(1, 32, 32, 32, dtype=torch.long)
    y[0, 20, 3, 30] = 1  # block (1, 0, 1) -> index 1*4 + 0*2 + 1 = 5
    assert de.token_labels(y).tolist() == [[0, 0, 0, 0, 0, 1, 0, 0]]


def test_tiny_end_to_end(tmp_path):
    import bench_downstream as bd

    out_json, png = tmp_path / "r.json", tmp_path / "r.png"
    bd.main(["--size", "tiny", "--keep", str(tmp_path / "work"), "--out", str(out_json), "--plot", str(png)])
    out = json.loads(out_json.read_text())
    arms = list(bd.ARMS)
    assert out["arms"] == arms
    size = bd.SIZES["tiny"]
    evals = ["probe token", "probe case"] + [f"finetune n={n}" for n in size.train_sizes]
    assert list(out["summary"]) == evals
    n_test = len(out["test_cases"])
    assert n_test == size.n_test and len(out["test_lesion"]) == n_test
    # the probes score every arm; fine-tuning the size's ft_arms (scratch, both caption arms, shuffled)
    assert out["ft_arms"] == list(size.ft_arms) and "no-psat" not in out["ft_arms"]
    for ev in evals:
        for a in (arms if ev.startswith("probe") else size.ft_arms):
            cell = out["summary"][ev][a]
            rows = out["per_case"][ev][a]
            seeds = size.pre_seeds if ev.startswith("probe") else size.ft_seeds
            assert len(rows) == seeds and all(len(r) == n_test for r in rows)
            assert np.isfinite(cell["mean"])
            d = cell["diff"]
            assert d["lo"] <= d["mean"] <= d["hi"]
            if a != "scratch":
                diff = np.asarray(rows) - np.asarray(out["per_case"][ev]["scratch"])
                assert d["mean"] == pytest.approx(float(diff.mean()))
    assert "| evaluation | scratch |" in out["table"] and "shuffled - scratch" in out["table"]
    assert set(out["summary_lesion_cases"]) == {f"finetune n={n}" for n in size.train_sizes}
    n_lesion = sum(out["test_lesion"])
    assert all(by["scratch"]["n_cases"] == n_lesion for by in out["summary_lesion_cases"].values())
    # the collapse probe of every pretraining run is reported
    assert all(len(ps) == size.pre_seeds and "between_volume_share" in ps[0] for ps in out["pretrain_probe"].values())
    assert png.stat().st_size > 0 and out["command"].startswith("benchmarks/bench_downstream.py")
    # the cohorts are disjoint by subject: no downstream case id or source among the pretraining ones
    from curation.store.manifest import read_manifest

    pre = read_manifest(tmp_path / "work" / "pre-labels" / "manifests" / "v1.parquet")
    assert not set(pre["case_id"].astype(str)) & set(out["test_cases"])
    assert all("Task96_p" == s for s in pre["subset"].unique())
    # the shuffled control pairs every subject's captions with another subject's volume
    shuf = read_manifest(tmp_path / "work" / "pre-shuffled" / "manifests" / "v1.parquet")
    assert len(shuf) == len(pre) and (shuf["volume_path"].to_numpy() != pre["volume_path"].to_numpy()).all()
    assert (shuf["caption"].to_numpy() == pre["caption"].to_numpy()).all()
