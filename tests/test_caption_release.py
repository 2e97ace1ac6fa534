"""`curate caption` through the CLI on real slicing output, against a real local OpenAI-style server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import phantom_ras, ras_affine, write_msd_task
from fake_openai import TEST_KEY as KEY
from typer.testing import CliRunner

from curation.ranking.rank import RankConfig, run_rank
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.manifest import read_manifest
from med3dinsight.curate import app


def make_ranked(tmp: Path) -> Path:
    """A sliced and ranked workdir of 5 small phantom cases (one MSD task)."""
    cases = {}
    for k in range(5):
        data, label = phantom_ras(seed=k)
        cases[f"p{k}"] = (np.roll(data, k, axis=2), ras_affine(), np.roll(label, k, axis=2))
    task = write_msd_task(tmp / "d", "Task07_Pancreas", cases)
    w = tmp / "w"
    run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=32)), log=lambda *_: None)
    run_rank(RankConfig(workdir=w))
    return w


@pytest.fixture(scope="module")
def ranked(tmp_path_factory) -> Path:
    return make_ranked(tmp_path_factory.mktemp("rel"))


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
    assert "distinct captions of" in res.output  # the caption-diversity line
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
    # The identical command converges: v1 already holds exactly this release, nothing is sent.
    before = len(fake_openai.chat_log())
    v1_bytes = (w / "manifests/v1.parquet").read_bytes()
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "already holds this release" in res.output, res.output
    # A different release (more slices) is refused before anything is paid, naming v2.
    res = runner.invoke(app, [*args[:-4], "--budget", "25", "--concurrency", "4"])
    assert res.exit_code == 2 and "v2.parquet" in res.output
    assert len(fake_openai.chat_log()) == before and (w / "manifests/v1.parquet").read_bytes() == v1_bytes
    # The same slices into v2 cost nothing: cached answers count toward --budget and are free.
    res = runner.invoke(app, [*args, "--out", "manifests/v2.parquet"])
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


def test_export_webdataset_and_csv_read_back_by_open_clip_train(ranked: Path, tmp_path: Path, monkeypatch):
    import types

    import typer
    from PIL import Image

    pytest.importorskip("webdataset")  # open_clip_train's shard reader (dev dependency)
    from open_clip_train.data import CsvDataset, get_wds_dataset

    from med3dinsight.release_export import export_cmd

    w = _copy(ranked, tmp_path / "w")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    runner = CliRunner()
    assert runner.invoke(app, ["caption", "--workdir", str(w), "--budget", "30"]).exit_code == 0
    rel = read_manifest(w / "manifests/v1.parquet")
    cli = typer.Typer()
    cli.command("export")(export_cmd)
    cli.command("noop")(lambda: None)  # two commands: typer keeps "export" as a subcommand
    res = runner.invoke(cli, ["export", "--workdir", str(w), "--format", "csv"])
    assert res.exit_code == 0 and "--csv-separator ," in res.output, res.output
    total = 0
    for split in ("train", "val", "test"):
        data = CsvDataset(str(w / f"exports/v1-csv/{split}.csv"), lambda im: im.size, "filepath", "title", sep=",",
                          tokenizer=lambda texts: texts)
        total += len(data)
        if len(data):
            size, caption = data[0]
            first = rel[rel["split"] == split].iloc[0]
            assert size == Image.open(w / first["image_path"]).size and caption == first["caption"]
    assert total == len(rel)
    res = runner.invoke(cli, ["export", "--workdir", str(w), "--format", "webdataset", "--shard-size", "8"])
    assert res.exit_code == 0 and "--dataset-type webdataset" in res.output, res.output
    shards = sorted((w / "exports/v1-webdataset").glob("train-*.tar"))
    n_train = int((rel["split"] == "train").sum())
    assert len(shards) == -(-n_train // 8)
    args = types.SimpleNamespace(val_data=f"{w}/exports/v1-webdataset/train-{{000000..{len(shards) - 1:06d}}}.tar",
                                 val_num_samples=n_train, batch_size=4, workers=0, world_size=1, seed=0)
    # open_clip_train tokenizes one text at a time as tokenizer(text)[0]: keep the text.
    info = get_wds_dataset(args, lambda im: im.size, is_train=False, tokenizer=lambda text: [text])
    seen = [caption for _, captions in info.dataloader for caption in captions]
    assert seen == list(rel[rel["split"] == "train"]["caption"])
