"""What a person reads: every option of every `curate` and `train` command explained, help texts
shown as written (brackets included), flags that take no value shown without one, and the
messages and summaries of issue 23 (a missing release, an unknown dataset, the open_clip flags
of an export, the caption progress count, this run's slices, sample-data's workdir)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from conftest import phantom_ras, ras_affine, save_nifti, write_msd_task
from typer.testing import CliRunner

from curation.store.layout import Workdir
from curation.store.manifest import read_manifest
from med3dinsight.common import new_app
from med3dinsight.curate import app as curate_app
from med3dinsight.train import app as train_app

APPS = {"curate": curate_app, "train": train_app}
ENV = {"COLUMNS": "300", "NO_COLOR": "1"}
# On/off flags whose spelling DESIGN.md fixes: they must keep parsing as they are.
DESIGN_FLAGS = {
    ("curate", "slice"): ["--render-all", "--strict", "--pseudonymize"],
    ("curate", "rank"): ["--evaluate"],
    ("curate", "caption"): ["--dry-run", "--status", "--retry-refused"],
    ("train", "pretrain"): ["--no-psat", "--no-pspe"],
}


def _commands():
    for app_name, app in APPS.items():
        group = typer.main.get_command(app)
        for name, cmd in sorted(group.commands.items()):
            yield app_name, name, cmd


COMMANDS = [(a, n) for a, n, _ in _commands()]


def _help(app_name: str, command: str) -> str:
    res = CliRunner().invoke(APPS[app_name], [command, "--help"], terminal_width=300, env=ENV)
    assert res.exit_code == 0, res.output
    return res.output


def _flat(text: str) -> str:
    """Help text with the panel borders and line breaks gone (a wrapped phrase reads whole)."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


def _help_texts(commands=None):
    """(missing, thin): options without a help text, and with one too short to explain anything."""
    missing, thin = [], []
    for app_name, name, cmd in _commands():
        if commands is not None and (app_name, name) not in commands:
            continue
        assert (cmd.help or "").strip(), f"{app_name} {name} has no docstring"
        for param in cmd.params:
            text = (getattr(param, "help", None) or "").strip()
            where = f"{app_name} {name} {'/'.join(param.opts) or param.name}"
            if not text:
                missing.append(where)
            elif len(text) < 15:  # "Seed." is no explanation
                thin.append(f"{where}: {text!r}")
    return missing, thin


def test_every_option_of_every_command_has_a_help_text():
    missing, thin = _help_texts()
    assert not missing, f"options without help: {missing}"
    assert not thin, f"help texts that explain nothing: {thin}"


@pytest.mark.parametrize("app_name,command", COMMANDS)
def test_help_renders_with_no_bool_type_and_every_option_listed(app_name, command):
    text = _help(app_name, command)
    assert "<bool>" not in text, f"{app_name} {command} --help shows <bool>"
    assert "\\[" not in text  # no escape shows through
    cmd = typer.main.get_command(APPS[app_name]).commands[command]
    for param in cmd.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), f"{opt} missing from the help"


def test_brackets_in_help_texts_survive_rich_markup():
    assert "pip install 'med3dinsight[ray]'" in _flat(_help("curate", "slice"))
    app = new_app("A test app [beta].")

    @app.command("one")
    def one(x: str = typer.Option("a", "--x", help="Install 'pkg[extra]' first; [bold] stays text.")) -> None:
        """Run [red]nothing[/red]."""

    @app.command("two")
    def two() -> None:
        """Second command, so that `one` stays a subcommand."""

    res = CliRunner().invoke(app, ["one", "--help"], terminal_width=300, env=ENV)
    flat = _flat(res.output)
    assert "Install 'pkg[extra]' first; [bold] stays text." in flat, res.output
    assert "Run [red]nothing[/red]." in flat
    assert "[beta]" in _flat(CliRunner().invoke(app, ["--help"], terminal_width=300, env=ENV).output)


def test_plain_help_without_rich_shows_brackets_and_no_escape():
    env = {**os.environ, "TYPER_USE_RICH": "0", **ENV}
    script = "import sys; from med3dinsight.curate import run; sys.argv = ['curate', 'slice', '--help']; run()"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    flat = _flat(res.stdout)
    assert "'med3dinsight[ray]'" in flat and "\\[" not in flat


@pytest.mark.parametrize("argv", [
    ["curate", "slice", "--dataset", "nifti", "--root", ".", "--ct-window", "abc"],
    ["curate", "slice", "--dataset", "nifti", "--root", ".", "--series-parts", "xyz"],
    ["curate", "slice", "--dataset", "nifti", "--root", "does-not-exist"],
    ["train", "finetune", "--bogus"],
])
def test_a_bad_flag_is_one_line_naming_it_and_the_help_command(tmp_path, argv):
    """As the console scripts run (med3dinsight.common.main): a usage error is one line, status 2."""
    script = (f"import sys; from med3dinsight.{argv[0]} import run; sys.argv = {argv!r}; run()")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                         timeout=120, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    flag = next(a for a in reversed(argv) if a.startswith("--"))
    assert lines[0].startswith("error: ") and flag in lines[0], lines
    assert f"see `{argv[0]} {argv[1]} --help`" in lines[0] and "Usage:" not in res.stderr + res.stdout


def test_flags_take_no_value_and_keep_their_spellings():
    found = set()
    for app_name, name, cmd in _commands():
        for param in cmd.params:
            if not getattr(param, "is_flag", False):
                continue
            for spelling, value in [(o, True) for o in param.opts] + [(o, False) for o in param.secondary_opts]:
                ctx = cmd.make_context(name, [spelling], resilient_parsing=True)
                assert ctx.params[param.name] is value, (app_name, name, spelling)
                found.add((app_name, name, spelling))
    for (app_name, name), flags in DESIGN_FLAGS.items():
        for flag in flags:
            assert (app_name, name, flag) in found, f"{app_name} {name} {flag} is gone"


# ---------------------------------------------------------------------------------- messages


def _fake_releases(w: Path, names=("v1", "v2")) -> None:
    for name in names:
        path = Workdir(w).release(int(name[1:]))
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"slice_id": ["a"]}).to_parquet(path)


def _one_line(output: str) -> str:
    lines = [x for x in output.splitlines() if x.strip()]
    assert len(lines) == 1, output
    return lines[0]


def test_a_missing_release_names_the_path_looked_for_and_the_releases_there(tmp_path):
    w = tmp_path / "w"
    _fake_releases(w)
    runner = CliRunner()
    for args in (["export", "--workdir", str(w), "--manifest", "v9"],):
        res = runner.invoke(curate_app, args)
        line = _one_line(res.output)
        assert res.exit_code == 2
        assert str(w / "manifests" / "v9.parquet") in line and "v1, v2" in line and "curate caption" not in line
    res = runner.invoke(curate_app, ["export", "--workdir", str(w), "--manifest", "manifests/v7.parquet"])
    assert str(w / "manifests" / "v7.parquet") in _one_line(res.output)
    res = runner.invoke(train_app, ["clip", "--workdir", str(w), "--manifest", "v9"])
    line = _one_line(res.output)
    assert res.exit_code == 2 and str(w / "manifests" / "v9.parquet") in line and "v1, v2" in line
    empty = tmp_path / "empty"
    res = runner.invoke(curate_app, ["export", "--workdir", str(empty), "--manifest", "v3"])
    line = _one_line(res.output)
    assert str(empty / "manifests" / "v3.parquet") in line and "curate caption" in line


def test_an_unknown_dataset_is_one_line_before_any_progress(tmp_path):
    res = CliRunner().invoke(curate_app, ["slice", "--dataset", "nifty", "--root", str(tmp_path),
                                          "--workdir", str(tmp_path / "w")])
    line = _one_line(res.output)
    assert res.exit_code == 2
    assert "nifty" in line and "3dseg8, nifti, dicom, msd" in line and "did you mean nifti" in line
    assert "slicing" not in res.output and not (tmp_path / "w").exists()


def test_webdataset_usage_names_train_and_val_data_with_their_shards(tmp_path):
    from curation.report.release_export import ExportResult

    out = tmp_path / "x"
    files = [out / n for n in ("train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar",
                               "test-000000.tar", "sizes.json")]
    res = ExportResult(manifest=tmp_path / "v1.parquet", out=out, files=files, rows={"train": 25, "val": 4, "test": 6})
    flags = res.usage("webdataset")
    assert "--dataset-type webdataset" in flags
    assert f"--train-data '{out}/train-{{000000..000002}}.tar'" in flags and "--train-num-samples 25" in flags
    assert f"--val-data '{out}/val-000000.tar'" in flags and "--val-num-samples 4" in flags
    assert "test-0" not in flags
    assert f"--val-data {out / 'val.csv'}" in res.usage("csv")
    res.rows["val"] = 0
    assert "--val-data" not in res.usage("webdataset") and "--val-data" not in res.usage("csv")


# ---------------------------------------------------------------- summaries on real (tiny) data


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> types.SimpleNamespace:
    """A workdir sliced twice through the CLI: an MSD task, then a NIfTI folder."""
    tmp = tmp_path_factory.mktemp("help")
    cases = {}
    for k in range(6):
        data, label = phantom_ras(seed=k)
        cases[f"p{k}"] = (np.roll(data, k, axis=2), ras_affine(), np.roll(label, k, axis=2))
    task = write_msd_task(tmp / "d", "Task07_Pancreas", cases)
    folder = tmp / "nii"
    for k in range(2):
        data, _ = phantom_ras(seed=10 + k)
        save_nifti(folder / f"scan{k}.nii.gz", data, ras_affine())
    w = tmp / "w"
    runner = CliRunner()
    first = runner.invoke(curate_app, ["slice", "--dataset", "msd", "--root", str(task), "--workdir", str(w),
                                       "--grid-size", "32"], env=ENV)
    assert first.exit_code == 0, first.output
    second = runner.invoke(curate_app, ["slice", "--dataset", "nifti", "--root", str(folder), "--workdir", str(w),
                                        "--grid-size", "32"], env=ENV)
    assert second.exit_code == 0, second.output
    return types.SimpleNamespace(w=w, first=first.output, second=second.output)


def _row(output: str, label: str) -> int:
    m = re.search(rf"{re.escape(label)}\s*│\s*(\d+)", output)
    assert m, f"no {label!r} row in:\n{output}"
    return int(m.group(1))


def test_slice_summary_counts_this_runs_slices_and_the_workdir_apart(two_datasets):
    slices = read_manifest(Workdir(two_datasets.w).slices_manifest)
    vols = read_manifest(Workdir(two_datasets.w).volumes_manifest)
    per = slices.merge(vols[["volume_id", "dataset"]], on="volume_id")["dataset"].value_counts().to_dict()
    assert per["msd"] and per["nifti"]
    assert _row(two_datasets.first, "slices indexed (this run)") == per["msd"]
    assert _row(two_datasets.second, "slices indexed (this run)") == per["nifti"]
    assert _row(two_datasets.second, "slices in the workdir (all datasets)") == len(slices) == per["msd"] + per["nifti"]


def test_caption_progress_counts_the_offline_successes(two_datasets, monkeypatch):
    from curation.ranking.rank import RankConfig, run_rank

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    run_rank(RankConfig(workdir=two_datasets.w))
    res = CliRunner().invoke(curate_app, ["caption", "--workdir", str(two_datasets.w), "--provider", "offline",
                                          "--budget", "40"], env=ENV)
    assert res.exit_code == 0, res.output
    assert re.search(r"\bok 40\b", res.output) and not re.search(r"\bok 0\b", res.output), res.output


def test_caption_progress_note_takes_the_bar_count_when_the_summary_lags():
    from med3dinsight.caption import _progress_note

    s = types.SimpleNamespace(cached=5, succeeded=0, refused=2, truncated=0, failed=0, prompt_tokens=0,
                              completion_tokens=0, usd_actual=0.0)
    assert "ok 2998 · refused 2" in _progress_note(s, 3000)
    s.succeeded = 7  # a live count (sync mode) is shown as it is
    assert "ok 7 " in _progress_note(s, 9)


def test_export_prints_the_open_clip_flags_for_train_and_val(two_datasets, tmp_path):
    w = two_datasets.w
    rel = read_manifest(Workdir(w).release(1))
    rel["split"] = ["val" if i % 4 == 0 else "train" for i in range(len(rel))]  # a val split for sure
    rel.to_parquet(Workdir(w).release(2))
    res = CliRunner().invoke(curate_app, ["export", "--workdir", str(w), "--manifest", "v2", "--shard-size", "8",
                                          "--out", str(tmp_path / "wds")], env=ENV)
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    n_val = sum(rel["split"] == "val")
    n_train = len(rel) - n_val
    assert "--dataset-type webdataset" in flat and f"--train-num-samples {n_train}" in flat
    assert f"--val-num-samples {n_val}" in flat
    m = re.search(r"--val-data '([^']+)'", flat)
    assert m, flat
    expanded = _braces(m.group(1))
    assert sorted(expanded) == sorted(str(p) for p in (tmp_path / "wds").glob("val-*.tar")) and len(expanded) > 1


def _braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    width = len(m.group(1))
    return [pattern[: m.start()] + f"{i:0{width}d}" + pattern[m.end():]
            for i in range(int(m.group(1)), int(m.group(2)) + 1)]


def test_sample_data_writes_under_the_workdir_and_keeps_out(tmp_path, monkeypatch):
    import curation.sample.sample_data as sample

    made = []

    def fake(out, resolution=2):  # the real one reads nilearn/pydicom files: covered in test_slicing
        made.append(Path(out))
        return {"3dseg8": Path(out) / "3dseg8", "dicom": Path(out) / "dicom"}

    monkeypatch.setattr(sample, "make_sample_data", fake)
    runner = CliRunner()
    res = runner.invoke(curate_app, ["sample-data", "--workdir", str(tmp_path / "w")], env=ENV)
    assert res.exit_code == 0, res.output
    assert made[-1] == tmp_path / "w" / "data" / "sample"
    assert f"--workdir {tmp_path / 'w'}" in " ".join(res.output.split())
    res = runner.invoke(curate_app, ["sample-data", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")],
                        env=ENV)
    assert res.exit_code == 0 and made[-1] == tmp_path / "o"
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(curate_app, ["sample-data"], env=ENV).exit_code == 0
    assert made[-1] == Path("data/sample")  # no --workdir: ./data/sample, as before
