"""The `train` CLI end to end on a tiny release: clip -> embed -> pretrain -> export -> finetune."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from conftest import phantom_ras, ras_affine, write_msd_task
from typer.testing import CliRunner

from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice
from med3dinsight.curate import app as curate
from med3dinsight.train import app as train
from training.pretrain.export import load_into_monai

TINY = str(Path(__file__).resolve().parents[1] / "training" / "models" / "configs" / "tiny-clip.json")


def test_train_stages_through_the_cli(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = {}
        for k in (0, 1, 4, 5):  # case names whose (hash) splits are 1 test, 3 train
            data, label = phantom_ras(seed=k)
            cases[f"t{k}"] = (np.roll(data, k, axis=0), ras_affine(), np.roll(label, k, axis=0))
        task = write_msd_task(tmp_path / "d", "Task09_Spleen", cases)
        w = tmp_path / "w"
        run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=32)), log=lambda *_: None)
        runner = CliRunner()
        res = runner.invoke(curate, ["caption", "--workdir", str(w), "--provider", "offline", "--all"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(train, ["clip", "--workdir", str(w), "--model", TINY, "--epochs", "1", "--batch-size", "8",
                                    "--warmup", "1", "--workers", "0", "--lr", "1e-3"])
        assert res.exit_code == 0, res.output
        assert (w / "checkpoints/clip/final.pt").exists()
        res = runner.invoke(train, ["embed", "--workdir", str(w)])
        assert res.exit_code == 0, res.output
        assert "images computed" in res.output
        res = runner.invoke(train, ["pretrain", "--workdir", str(w), "--encoder", "cnn",
                                    "--encoder-arg", "block_inplanes=[8,16,32,64]", "--steps", "3", "--batch-size", "2",
                                    "--warmup", "1", "--num-queries", "4", "--psat-width", "32", "--psat-layers", "1",
                                    "--workers", "0", "--precision", "fp32"])
        assert res.exit_code == 0, res.output
        assert (w / "checkpoints/pretrain/latest.pt").exists()
        res = runner.invoke(train, ["export", "--workdir", str(w)])
        assert res.exit_code == 0, res.output
        meta = next((w / "exports").glob("*.json"))
        net = load_into_monai(meta)
        assert json.loads(meta.read_text())["encoder"] == "cnn"
        assert sum(p.numel() for p in net.parameters()) > 0
        # downstream: fine-tune from the export (cls, labels CSV), and score a pretrain checkpoint as is
        vols = pd.read_parquet(w / "manifests/volumes.parquet")
        csv = tmp_path / "labels.csv"
        csv.write_text("case_id,label\n" + "".join(f"{c},{i % 2}\n" for i, c in enumerate(sorted(set(vols["case_id"])))))
        res = runner.invoke(train, ["finetune", "--workdir", str(w), "--task", "cls", "--encoder", "cnn",
                                    "--init", "exports/cnn_encoder.json", "--labels", str(csv), "--steps", "2",
                                    "--batch-size", "2", "--precision", "fp32"])
        assert res.exit_code == 0, res.output
        run = w / "checkpoints/finetune/cls-cnn-cnn_encoder"
        assert "accuracy" in json.loads((run / "metrics.json").read_text())["test"] and str(run) in res.output
        res = runner.invoke(train, ["finetune", "--workdir", str(w), "--task", "cls", "--encoder", "cnn",
                                    "--init", "checkpoints/pretrain/latest.pt", "--labels", str(csv), "--steps", "0",
                                    "--name", "ckpt0"])
        assert res.exit_code == 0, res.output
        got = torch.load(w / "checkpoints/finetune/ckpt0/final.pt", weights_only=True)
        for k, v in net.state_dict().items():
            assert torch.equal(got[f"encoder.resnet.{k}"], v)
        res = runner.invoke(train, ["finetune", "--workdir", str(w), "--task", "seg", "--encoder", "cnn"])
        assert res.exit_code == 2 and "error: --task seg --encoder cnn" in res.output, res.output
        # missing inputs give one clear line and exit 2
        res = runner.invoke(train, ["embed", "--workdir", str(tmp_path / "nowhere")])
        assert res.exit_code == 2 and "train clip" in res.output
        res = runner.invoke(train, ["export", "--workdir", str(tmp_path / "nowhere")])
        assert res.exit_code == 2 and "run `train pretrain` first" in res.output
        # a TrainingError from inside the trainer: one line, exit 2; resume notices as warning lines
        res = runner.invoke(train, ["pretrain", "--workdir", str(w), "--encoder", "cnn", "--encoder-arg", "bogus=1",
                                    "--workers", "0"])
        assert res.exit_code == 2 and "error: --encoder cnn:" in res.output and "bogus" in res.output, res.output
        res = runner.invoke(train, ["pretrain", "--workdir", str(w), "--encoder", "cnn",
                                    "--encoder-arg", "block_inplanes=[8,16,32,64]", "--steps", "3", "--batch-size", "2",
                                    "--warmup", "1", "--workers", "0", "--precision", "fp32", "--resume", "latest"])
        assert res.exit_code == 0, res.output
        assert "warning: resume: num_queries=300 differs from the checkpoint's 4; using the checkpoint's" in res.output
    finally:
        torch.set_num_threads(threads)
