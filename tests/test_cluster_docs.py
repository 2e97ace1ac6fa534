"""docs/cluster.md runs as written: its sbatch files, under a stand-in `sbatch` (bash, fake SLURM
variables, no real SLURM), slice tiny data in array shards and merge them into the manifests a
one-machine run writes; every `curate`/`train` command it shows uses flags those commands have."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import typer
from test_executors import make_folder, quiet

from curation.slicing.stage import SliceConfig, run_slice
from curation.store.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "cluster.md"

# A stand-in for sbatch: #SBATCH directives overridden by command-line options, --array a-b
# (one run per task, with SLURM's array variables), --output patterns (%A %a %j), the
# submitting environment exported, and --dependency=afterok that holds a job back (as
# DependencyNeverSatisfied) unless every task of the jobs it names exited 0. Jobs run at once,
# one after the other, so a dependent job always finds its dependencies finished.
FAKE_SBATCH = r'''
import json, os, re, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])
jobs_file = state / "jobs.json"
jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else {}
args, opts, i = sys.argv[1:], {}, 0
while args[i].startswith("-"):
    if "=" in args[i]:
        key, value = args[i].split("=", 1)
    elif args[i] == "--parsable":
        key, value = args[i], "1"
    else:
        key, value = args[i], args[i + 1]
        i += 1
    opts[key] = value
    i += 1
script = Path(args[i])
directives = {}
for line in script.read_text().splitlines()[1:]:
    if not line.startswith("#"):
        break
    m = re.match(r"#SBATCH\s+(--[\w-]+)(?:[= ](\S+))?", line)
    if m:
        directives[m.group(1)] = m.group(2)
o = {**directives, **opts}
job = str(1000 + len(jobs))
record = {"script": script.name, "options": o, "tasks": {}}
kind, _, after = (o.get("--dependency") or "afterok:").partition(":")
assert kind == "afterok", o["--dependency"]
if after and not all(jobs.get(j, {}).get("state") == "COMPLETED" for j in after.split(":")):
    record["state"] = "PENDING (DependencyNeverSatisfied)"
else:
    tasks, lo, hi = [None], None, None
    if "--array" in o:
        m = re.fullmatch(r"(\d+)-(\d+)(%\d+)?", o["--array"])
        lo, hi = int(m.group(1)), int(m.group(2))
        tasks = list(range(lo, hi + 1))
    for t in tasks:
        env = dict(os.environ, SLURM_JOB_ID=job, SLURM_SUBMIT_DIR=os.getcwd())
        if "--cpus-per-task" in o:
            env["SLURM_CPUS_PER_TASK"] = o["--cpus-per-task"]
        if t is not None:
            env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(t), SLURM_ARRAY_TASK_COUNT=str(len(tasks)),
                       SLURM_ARRAY_TASK_MIN=str(lo), SLURM_ARRAY_TASK_MAX=str(hi))
        out = o.get("--output", "slurm-%j.out").replace("%A", job).replace("%a", str(t)).replace("%j", job)
        with open(out, "w") as fh:
            record["tasks"][str(t)] = subprocess.call(["bash", str(script)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    record["state"] = "COMPLETED" if not any(record["tasks"].values()) else "FAILED"
jobs[job] = record
jobs_file.write_text(json.dumps(jobs))
print(job if "--parsable" in o else f"Submitted batch job {job}")
'''


def doc_files() -> dict[str, str]:
    """The files the page names (a line starting with `name.sbatch` or `name.sh`) and their
    bash blocks, as a user would copy them."""
    files, name = {}, None
    for block in re.split(r"(```bash\n.*?```)", DOC.read_text(), flags=re.S):
        if block.startswith("```bash"):
            if name:
                files[name] = block[len("```bash\n"):-3]
            name = None
        else:
            names = re.findall(r"^`([\w-]+\.(?:sbatch|sh))`", block, flags=re.M)
            name = names[-1] if names else None
    return files


def fake_cluster(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A submit folder with the doc's files, a stand-in sbatch on PATH and a "venv" whose
    activate puts a `curate` (this interpreter, this checkout) on PATH."""
    submit = tmp_path / "submit"
    submit.mkdir()
    for name, text in doc_files().items():
        (submit / name).write_text(text)
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)

    def script(path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    script(bin_dir / "sbatch", f"#!{sys.executable}\n{FAKE_SBATCH}")
    script(venv_bin / "curate", f'#!/bin/bash\nexec {shlex.quote(sys.executable)} -m med3dinsight.curate "$@"\n')
    (venv_bin / "activate").write_text(f'export PATH={shlex.quote(str(venv_bin))}:"$PATH"\n')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", VENV=str(tmp_path / "venv"),
               FAKE_SLURM_STATE=str(tmp_path / "slurm"), PYTHONPATH=str(REPO))
    (tmp_path / "slurm").mkdir()
    for var in [v for v in env if v.startswith("SLURM_")]:
        del env[var]
    return submit, env


def jobs(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "slurm" / "jobs.json").read_text())


def test_doc_names_the_three_files():
    files = doc_files()
    assert set(files) == {"slice.sbatch", "merge.sbatch", "submit.sh"}
    assert "--shard auto" in files["slice.sbatch"] and "curate merge" in files["merge.sbatch"]
    assert "--dependency=afterok" in files["submit.sh"]


def test_sbatch_example_slices_in_shards_and_merges_like_one_machine(tmp_path: Path):
    # two volumes and a truncated file over three array tasks: the bad file's shard succeeds
    root = make_folder(tmp_path / "data", good=2, bad=False)
    (root / "truncated.nii.gz").write_bytes((root / "case_0.nii.gz").read_bytes()[:300])
    run_slice("nifti", root, SliceConfig(workdir=tmp_path / "local"), log=quiet)  # the doc's defaults

    submit, env = fake_cluster(tmp_path)
    env.update(DATASET="nifti", DATA=str(root), WORKDIR=str(tmp_path / "cluster"), SHARDS="3")
    res = subprocess.run(["bash", "submit.sh"], cwd=submit, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    ran = jobs(tmp_path)
    (slice_id, slice_job), (merge_id, merge_job) = sorted(ran.items())
    logs = "\n".join(p.read_text() for p in sorted((submit / "logs").iterdir()))
    assert slice_job["state"] == "COMPLETED" and slice_job["tasks"] == {"0": 0, "1": 0, "2": 0}, logs
    assert merge_job["options"]["--dependency"] == f"afterok:{slice_id}" and merge_job["state"] == "COMPLETED", logs
    assert res.stdout.split() == [merge_id]
    assert "truncated.nii.gz" in logs and "merged 3 volumes" in logs  # 2 ok + the error row
    assert sorted(p.name for p in (submit / "logs").iterdir()) == [
        f"merge-{merge_id}.out", *(f"slice-{slice_id}_{t}.out" for t in range(3))]

    # the cluster's manifests (shard count, machines, order) are the one-machine run's
    assert len(list((tmp_path / "cluster/manifests/shards").glob("volumes.*-of-3.parquet"))) == 3
    for name in ("volumes.parquet", "slices.parquet"):
        pd.testing.assert_frame_equal(read_manifest(tmp_path / "local/manifests" / name),
                                      read_manifest(tmp_path / "cluster/manifests" / name))


def test_sbatch_example_holds_the_merge_back_when_a_shard_fails(tmp_path: Path):
    submit, env = fake_cluster(tmp_path)
    env.update(DATASET="nifti", DATA=str(tmp_path / "no-such-folder"), WORKDIR=str(tmp_path / "cluster"), SHARDS="1")
    res = subprocess.run(["bash", "submit.sh"], cwd=submit, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr  # submitting works; the jobs fail
    (_, slice_job), (_, merge_job) = sorted(jobs(tmp_path).items())
    assert slice_job["state"] == "FAILED" and merge_job["state"] == "PENDING (DependencyNeverSatisfied)"
    assert not (tmp_path / "cluster/manifests/volumes.parquet").exists()


def _commands(text: str) -> list[list[str]]:
    """Every `curate X ...` / `train X ...` in the page's bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.replace('"$(command -v train)"', "train")
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            for k, tok in enumerate(tokens[:-1]):
                if tok in ("curate", "train") and re.fullmatch(r"[a-z][a-z-]*", tokens[k + 1]):
                    out.append(tokens[k:])
    return out


@pytest.mark.parametrize("which", ["curate", "train"])
def test_doc_commands_use_real_flags(which: str):
    from med3dinsight.curate import app as curate_app
    from med3dinsight.train import app as train_app

    group = typer.main.get_command(curate_app if which == "curate" else train_app)
    seen = 0
    for cmd in _commands(DOC.read_text()):
        if cmd[0] != which:
            continue
        sub = group.commands.get(cmd[1])
        assert sub is not None, f"{which} {cmd[1]}: no such command"
        known = {opt for p in sub.params for opt in (*p.opts, *p.secondary_opts)}
        flags = [t.split("=")[0] for t in cmd[2:] if t.startswith("--")]
        assert set(flags) <= known, f"{' '.join(cmd[:2])}: unknown {sorted(set(flags) - known)}"
        seen += 1
    assert seen >= (3 if which == "curate" else 1)
