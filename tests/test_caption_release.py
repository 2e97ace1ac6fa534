"""`curate caption` through the CLI on real slicing output, against a real local OpenAI-style server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.curate import app
from curation.manifest import read_manifest
from curation.preprocess import PreprocessConfig
from curation.rank import RankConfig, run_rank
from curation.slicing import SliceConfig, run_slice

from conftest import phantom_ras, ras_affine, write_msd_task
from fake_openai import TEST_KEY as KEY


@pytest.fixture(scope="module")
def ranked(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("rel")
    cases = {}
    for k in range(5):
        data, label = phantom_ras(seed=k)
        cases[f"p{k}"] = (np.roll(data, k, axis=2), ras_affine(), np.roll(label, k, axis=2))
    task = write_msd_task(tmp / "d", "Task07_Pancreas", cases)
    w = tmp / "w"
    run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=32)), log=lambda *_: None)
    run_rank(RankConfig(workdir=w))
    return w


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_caption_cli_against_local_server_then_free_rerun(ranked: Path, tmp_path: Path, monkeypatch,
                                                           fake_openai):
    w = _copy(ranked, tmp_path / "w")
    runner = CliRunner()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    fake_openai.config.faults = {"429_header": 0.15, "500": 0.1}
    fake_openai.config.retry_after = 0.05
    args = ["caption", "--workdir", str(w), "--base-url", fake_openai.base_url, "--budget", "20", "--concurrency", "4"]
    res = runner.invoke(app, [*args, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert len(fake_openai.answered()) == 0 and "USD" in res.output
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    n_answered = len(fake_openai.answered())
    rel = read_manifest(w / "manifests/v1.parquet")
    assert len(rel) == 20 and rel["caption"].notna().all()
    # identical images share one paid answer
    assert n_answered == rel["image_sha256"].nunique() <= 20, res.output
    assert set(rel["caption_model"]) == {"gpt-4o"}
    # the budget went to the first slices of the ranked order: every volume is covered
    assert rel["volume_id"].nunique() == 5
    assert list(rel["selection_order"]) == sorted(rel["selection_order"])
    # subject-wise split: a case never straddles two splits
    assert rel.groupby("case_id")["split"].nunique().max() == 1
    # immutable release, and a rerun into v2 costs nothing
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "v2.parquet" in res.output
    res = runner.invoke(app, [*args, "--out", "manifests/v2.parquet", "--budget", "0"])
    assert res.exit_code == 0, res.output
    assert len(fake_openai.answered()) == n_answered
    v2 = read_manifest(w / "manifests/v2.parquet")
    assert list(v2["caption"]) == list(rel["caption"])
    for p in list((w / "manifests").glob("*.parquet")) + list((w / "cache").glob("captions.*")):
        assert KEY.encode() not in p.read_bytes()
    res = runner.invoke(app, ["query", "SELECT split, count(*) AS n FROM captions GROUP BY 1 ORDER BY 1", "--workdir", str(w), "--format", "csv"])
    assert res.exit_code == 0 and res.output.startswith("split,n")


def test_offline_captioner_is_the_default_without_a_key(ranked: Path, tmp_path: Path, monkeypatch):
    w = _copy(ranked, tmp_path / "w")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    res = CliRunner().invoke(app, ["caption", "--workdir", str(w)])
    assert res.exit_code == 0, res.output
    rel = read_manifest(w / "manifests/v1.parquet")
    slices = read_manifest(w / "manifests/slices.parquet")
    assert len(rel) == len(slices)
    assert set(rel["caption_mode"]) == {"offline"}
    row = rel[rel["labels_present"].map(lambda v: "blob" in v)].iloc[0]
    assert "blob" in row["caption"] and row["plane"] in row["caption"].lower()
    assert set(rel["split"]) == {"train", "val", "test"}


def test_unranked_slices_need_rank_or_all(tmp_path: Path, phantom):
    data, label = phantom
    task = write_msd_task(tmp_path / "d", "Task01_X", {"a": (data, ras_affine(), label)})
    w = tmp_path / "w"
    run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=32)), log=lambda *_: None)
    runner = CliRunner()
    res = runner.invoke(app, ["caption", "--workdir", str(w), "--provider", "offline"])
    assert res.exit_code == 2 and "curate rank" in res.output
    res = runner.invoke(app, ["caption", "--workdir", str(w), "--detail", "medium"])
    assert res.exit_code == 2 and "--detail must be low, high or auto" in res.output
    res = runner.invoke(app, ["caption", "--workdir", str(w), "--provider", "offline", "--all", "--budget", "5"])
    assert res.exit_code == 0, res.output
    assert len(read_manifest(w / "manifests/v1.parquet")) == 5
