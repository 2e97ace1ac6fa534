"""The three trainers share one spelling of their common flags, with defaults from their config
dataclasses; named runs get their own folder; old outputs still load after the package moves."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from typer.testing import CliRunner

from curation.store.layout import Workdir
from med3dinsight.train import app
from training.clip.config import ClipTrainConfig
from training.finetune.config import FinetuneConfig
from training.pretrain.config import PretrainConfig

SHARED = ["--steps", "--epochs", "--stop-after", "--batch-size", "--lr", "--wd", "--warmup", "--grad-clip-norm",
          "--precision", "--workers", "--name", "--resume", "--seed", "--log-every", "--device"]
CONFIGS = {"clip": ClipTrainConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig}


def _help(command: str) -> str:
    res = CliRunner().invoke(app, [command, "--help"], terminal_width=200, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_trainer_shows_the_shared_flags_with_its_config_defaults(command):
    text = _help(command)
    for flag in SHARED:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"train {command} lacks {flag}"
    cfg = CONFIGS[command]
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    # one precision and one workers default across the trainers
    assert defaults["precision"] == "amp" and defaults["workers"] == 2
    for field, flag in (("lr", "--lr"), ("batch_size", "--batch-size"), ("warmup", "--warmup")):
        line = next(x for x in text.splitlines() if re.search(rf"{flag}\b", x))
        block = text[text.index(line):text.index(line) + 600]
        assert f"[default: {defaults[field]}]" in block, (command, flag, block)


def test_on_off_flags_have_both_spellings():
    assert "--psat" in _help("pretrain") and "--no-psat" in _help("pretrain") and "--no-pspe" in _help("pretrain")
    assert "--no-lock-image" in _help("clip")


def test_run_dir_keeps_todays_paths_and_refuses_odd_names(tmp_path):
    wd = Workdir(tmp_path)
    assert wd.run_dir("pretrain") == tmp_path / "checkpoints" / "pretrain"
    assert wd.run_dir("clip", "big") == tmp_path / "checkpoints" / "clip" / "big"
    for bad in ("..", "a/b", "."):
        with pytest.raises(ValueError):
            wd.run_dir("clip", bad)


def test_a_final_json_naming_the_old_module_path_still_builds():
    from training.finetune.nets import build_net

    args = {"encoder": "cnn", "encoder_config": {"block_inplanes": [4, 8, 8, 8], "img_size": 32}, "num_classes": 2}
    for path in ("training.finetune_nets.EncoderClassifier", "training.finetune.nets.EncoderClassifier"):
        net = build_net({"class": path, "args": args}).eval()
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2)


def test_report_to_writes_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    from training.loop.errors import TrainingError
    from training.loop.runlog import MetricsLog, parse_report_to

    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsLog(tmp_path, None, report_to="tensorboard,wandb", run_name="clip/t", config={"lr": 0.1}) as log:
        log.write({"step": 1, "loss": 0.5, "val/i2t_R@1": 0.25})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))  # offline: nothing left the machine
    assert runs and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    with pytest.raises(TrainingError, match="--report-to"):
        parse_report_to("tensorbord")


def test_few_distinct_captions_are_warned_about(caplog):
    import logging

    from training.loop.runlog import warn_few_captions

    with caplog.at_level(logging.WARNING, logger="training"):
        warn_few_captions(["a liver"] * 50 + ["a kidney"] * 50, [f"text {i}" for i in 9 * [0, 1]])
    text = caplog.text
    assert "2 distinct captions for 100 pairs" in text and "over 2 distinct texts" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training"):
        warn_few_captions([f"t{i}" for i in range(40)], [f"v{i}" for i in range(25)])
    assert caplog.text == ""


def test_clip_step_raises_on_a_non_finite_loss_like_every_trainer():
    """One non-finite policy: the shared accumulation step raises, naming the step, instead of
    skipping the update silently."""
    import open_clip

    from training.clip.train import train_step
    from training.loop.errors import TrainingError
    from training.loop.precision import Precision
    from training.models.clip_models import register_tiny

    class NaNLoss(torch.nn.Module):
        def forward(self, img, txt, scale, positives=None):
            return (img.sum() + txt.sum() + scale) * float("nan")

    register_tiny()
    model = open_clip.create_model("tiny-clip")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chunk = [(torch.randn(4, 3, 32, 32), torch.randint(1, 400, (4, 32)))]
    with pytest.raises(TrainingError, match="at step 5"):
        train_step(model, chunk, NaNLoss(), opt, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"),
                   Precision("fp32", "cpu"), step=5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no update


@pytest.mark.parametrize("command,configs", [
    ("slice", ("curation.slicing.config:SliceConfig", "curation.slicing.config:PreprocessConfig")),
    ("rank", ("curation.ranking.config:RankConfig",)),
])
def test_curate_options_take_their_defaults_from_the_config_classes(command, configs):
    """Every default in one place: an option named like a config field has that field's default."""
    import importlib

    import typer

    from med3dinsight.curate import app as curate_app

    fields = {}
    for spec in configs:
        module, name = spec.split(":")
        for f in dataclasses.fields(getattr(importlib.import_module(module), name)):
            if f.default is not dataclasses.MISSING:
                fields[f.name] = f.default
    cmd = typer.main.get_command(curate_app).commands[command]
    checked = [p.name for p in cmd.params if p.name in fields]
    assert len(checked) >= 8, checked
    for p in cmd.params:
        if p.name in fields and p.name != "query_weight":  # None there means "not given" (checked with --query)
            default = p.default
            if isinstance(fields[p.name], tuple) and isinstance(default, str):  # --ct-window LOW,HIGH
                default = tuple(float(v) for v in default.split(","))
            assert default == fields[p.name], (command, p.name, p.default, fields[p.name])
