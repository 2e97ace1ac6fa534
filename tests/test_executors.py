"""Where `curate slice` runs: Ray tasks give the local run's outputs, bad input keeps its
promises on every executor, ``--shard auto`` reads the SLURM array, merges refuse gaps."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import phantom_ras, ras_affine, save_nifti
from typer.testing import CliRunner

from curation.executors.local import LocalExecutor, _one_thread
from curation.executors.ray_executor import RayExecutor, TaskLost
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, SliceStep, make_executor, merge_shards, parse_shard, run_slice
from curation.store.manifest import read_manifest
from med3dinsight.curate import app

G = 32
REPO = Path(__file__).resolve().parents[1]


def cfg_for(workdir: Path, **kw) -> SliceConfig:
    return SliceConfig(workdir=workdir, pre=PreprocessConfig(grid_size=G, spacing=1.0), **kw)


def quiet(*_a, **_k) -> None:
    pass


def make_folder(root: Path, good: int = 3, bad: bool = True) -> Path:
    """A nifti folder: ``good`` phantoms and, with ``bad``, a truncated file and a 2D image."""
    aff = ras_affine()
    for k in range(good):
        data, _ = phantom_ras(seed=k)
        save_nifti(root / f"case_{k}.nii.gz", np.roll(data, k, axis=0), aff)
    if bad:
        data, _ = phantom_ras()
        raw = gzip.compress(nib.Nifti1Image(data, aff).to_bytes())
        (root / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
        save_nifti(root / "flat2d.nii.gz", data[:, :, :1], aff)
    return root


def tree_digest(workdir: Path) -> dict[str, str]:
    return {p.relative_to(workdir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((workdir / "volumes").rglob("*")) if p.is_file() and p.suffix in (".npy", ".zst")}


def assert_same_manifests(a: Path, b: Path) -> None:
    for name in ("volumes.parquet", "slices.parquet"):
        pd.testing.assert_frame_equal(read_manifest(a / "manifests" / name), read_manifest(b / "manifests" / name))


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local Ray for the module (starting one costs seconds)."""
    import ray

    # Ray workers cannot import this test module: ship its step subclasses by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ctx
    ray.shutdown()


# --------------------------------------------------------------------------- Ray


def test_ray_run_equals_local_run_bad_input_included(tmp_path: Path, ray_cluster):
    root = make_folder(tmp_path / "data")
    local_lines: list[str] = []
    local = run_slice("nifti", root, cfg_for(tmp_path / "local"), log=local_lines.append, executor=LocalExecutor(1))
    ray_lines: list[str] = []
    progress: list[tuple[int, int]] = []
    on_ray = run_slice("nifti", root, cfg_for(tmp_path / "ray"), log=ray_lines.append, executor=RayExecutor(),
                       on_progress=lambda done, total, name: progress.append((done, total)))
    assert (on_ray.processed, on_ray.errors) == (local.processed, local.errors) == (3, 2)
    assert progress == [(k, 5) for k in range(1, 6)]
    assert sorted(ray_lines) == sorted(local_lines) and all("\n" not in ln for ln in ray_lines)
    assert tree_digest(tmp_path / "local") == tree_digest(tmp_path / "ray")
    assert_same_manifests(tmp_path / "local", tmp_path / "ray")
    # a rerun (here, locally) trusts what the Ray tasks wrote
    again = run_slice("nifti", root, cfg_for(tmp_path / "ray"), log=quiet)
    assert (again.skipped, again.processed) == (3, 0)


class ExitOn(SliceStep):
    """The slice step, except that the worker process dies on one file (a segfault, an OOM kill)."""

    def __init__(self, cfg: SliceConfig, name: str) -> None:
        super().__init__(cfg)
        object.__setattr__(self, "name", name)

    def __call__(self, spec):
        if spec.source.name == self.name:
            os._exit(3)
        return super().__call__(spec)


class RaiseOn(ExitOn):
    """The slice step, except that it raises on one file (a bug, not bad input)."""

    def __call__(self, spec):
        if spec.source.name == self.name:
            raise MemoryError("cannot allocate\nsecond line")
        return SliceStep.__call__(self, spec)


@pytest.mark.parametrize("step_cls, fault", [(ExitOn, "TaskLost: "), (RaiseOn, "MemoryError: cannot allocate")])
def test_ray_crashed_or_raising_task_is_an_error_row_and_the_rest_goes_on(tmp_path: Path, ray_cluster, step_cls, fault):
    from curation.sources.datasets import discover

    root = make_folder(tmp_path / "data", good=3, bad=False)
    cfg = cfg_for(tmp_path / "w")
    specs, _ = discover("nifti", root)
    step = step_cls(cfg, "case_1.nii.gz")
    lines: list[str] = []
    records = RayExecutor().run(step, specs, on_result=lambda item, recs, done, total: lines.extend(
        r["error"] for r in recs if r["error"]))
    assert sorted(r["status"] for r in records) == ["error", "ok", "ok"]
    (line,) = lines
    assert "case_1.nii.gz: worker failed (" in line and fault in line and "\n" not in line


def test_unwrap_keeps_one_line():
    import ray

    from curation.executors.ray_executor import _unwrap

    lost = _unwrap(ray, ray.exceptions.WorkerCrashedError())
    assert isinstance(lost, TaskLost) and str(lost).startswith("WorkerCrashedError: ") and "\n" not in str(lost)


def test_cli_executor_ray_joins_a_running_cluster_by_address(tmp_path: Path, ray_cluster):
    """`curate slice --executor ray --ray-address ADDR` in its own process, as on a cluster
    where `ray start --head` made the Ray; the manifests equal `--executor local`'s."""
    root = make_folder(tmp_path / "data", good=2)
    run_slice("nifti", root, cfg_for(tmp_path / "local"), log=quiet)
    address = ray_cluster.address_info["gcs_address"]
    cmd = [sys.executable, "-m", "med3dinsight.curate", "slice", "--dataset", "nifti", "--root", str(root), "--grid-size", str(G),
           "--workdir", str(tmp_path / "ray"), "--executor", "ray", "--ray-address", address]
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "flat2d.nii.gz" in res.stdout + res.stderr  # the bad file's line
    assert_same_manifests(tmp_path / "local", tmp_path / "ray")


def test_cli_executor_ray_in_process_relative_paths(tmp_path: Path, ray_cluster, monkeypatch):
    """Relative --root and --workdir mean the driver's folder on every worker."""
    make_folder(tmp_path / "data", good=2, bad=False)
    monkeypatch.chdir(tmp_path)
    args = ["slice", "--dataset", "nifti", "--root", "data", "--grid-size", str(G)]
    res = CliRunner().invoke(app, [*args, "--workdir", "ray", "--executor", "ray"])
    assert res.exit_code == 0, res.output
    assert CliRunner().invoke(app, [*args, "--workdir", "local"]).exit_code == 0
    assert_same_manifests(tmp_path / "local", tmp_path / "ray")
    assert tree_digest(tmp_path / "local") == tree_digest(tmp_path / "ray")


def test_curation_imports_without_ray_and_says_how_to_get_it(tmp_path: Path):
    make_folder(tmp_path / "data", good=1, bad=False)
    code = (
        "import sys; sys.modules['ray'] = None\n"  # makes `import ray` fail as if not installed
        "import med3dinsight.curate, curation.slicing.stage, curation.executors.local, curation.executors.ray_executor\n"
        "from typer.testing import CliRunner\n"
        f"r = CliRunner().invoke(med3dinsight.curate.app, ['slice', '--dataset', 'nifti', '--root', {str(tmp_path / 'data')!r},"
        f" '--workdir', {str(tmp_path / 'w')!r}, '--executor', 'ray'])\n"
        "print('EXIT', r.exit_code); print(r.output)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "EXIT 2" in res.stdout and "pip install 'med3dinsight[ray]'" in res.stdout, res.stdout
    assert not (tmp_path / "w" / "manifests").exists()


def test_make_executor_choices():
    assert isinstance(make_executor("local", 2), LocalExecutor)
    ray_ex = make_executor("ray", 3)
    assert isinstance(ray_ex, RayExecutor) and ray_ex.num_cpus == 3 and ray_ex.address is None
    assert make_executor("ray", 3, "auto").num_cpus is None
    with pytest.raises(ValueError, match="--ray-address needs --executor ray"):
        make_executor("local", 1, "auto")
    with pytest.raises(ValueError, match="choose one of local, ray"):
        make_executor("dask")


def test_local_workers_get_one_thread_without_importing_torch(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "2")  # a user's explicit choice stays
    _one_thread()
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ["MKL_NUM_THREADS"] == "2"


# --------------------------------------------------------------------------- SLURM shards


def test_parse_shard_auto_reads_the_slurm_array():
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}
    assert parse_shard("auto", env) == (2, 4)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"}) == (0, 1)
    assert parse_shard(" 1/3 ", {}) == (1, 3) and parse_shard(None, {}) is None
    with pytest.raises(ValueError, match=r"^--shard auto: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT not set"):
        parse_shard("auto", {})
    with pytest.raises(ValueError, match=r"SLURM_ARRAY_TASK_COUNT not set"):
        parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "1"})
    with pytest.raises(ValueError, match=r"--array=0-3"):  # --array=1-4
        parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"})
    with pytest.raises(ValueError, match=r"--array=0-3"):
        parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"})
    with pytest.raises(ValueError, match="not integers"):
        parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"})
    for bad in ("2/2", "a/b", "1/0", "3"):
        with pytest.raises(ValueError, match="i/n"):
            parse_shard(bad, {})


def test_cli_shard_auto(tmp_path: Path, monkeypatch):
    root = make_folder(tmp_path / "data", good=3, bad=False)
    args = ["slice", "--dataset", "nifti", "--root", str(root), "--workdir", str(tmp_path / "w"), "--grid-size", str(G)]
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(var, raising=False)
    res = CliRunner().invoke(app, [*args, "--shard", "auto"])
    assert res.exit_code == 2
    assert " ".join(res.output.split()) == (  # one message (the terminal may wrap it)
        "error: --shard auto: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT not set "
        "(run it in an `sbatch --array` job, or pass --shard i/n)")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task in ("1", "0"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        res = CliRunner().invoke(app, [*args, "--shard", "auto"])
        assert res.exit_code == 0, res.output
    shards = sorted(p.name for p in (tmp_path / "w/manifests/shards").iterdir())
    assert shards == ["slices.0-of-2.parquet", "slices.1-of-2.parquet", "volumes.0-of-2.parquet", "volumes.1-of-2.parquet"]
    assert len(read_manifest(tmp_path / "w/manifests/shards/volumes.0-of-2.parquet")) == 2  # every 2nd from 0
    assert CliRunner().invoke(app, ["merge", "--workdir", str(tmp_path / "w")]).exit_code == 0
    assert len(read_manifest(tmp_path / "w/manifests/volumes.parquet")) == 3


def test_merge_refuses_a_missing_shard(tmp_path: Path):
    root = make_folder(tmp_path / "data", good=3, bad=False)
    for i in (0, 2):
        run_slice("nifti", root, cfg_for(tmp_path / "w", shard=(i, 3)), log=quiet)
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) 1/3 missing"):
        merge_shards(tmp_path / "w")
    res = CliRunner().invoke(app, ["merge", "--workdir", str(tmp_path / "w")])
    assert res.exit_code == 2 and "1/3 missing" in res.output
    assert not (tmp_path / "w/manifests/volumes.parquet").exists()
    run_slice("nifti", root, cfg_for(tmp_path / "w", shard=(1, 3)), log=quiet)
    assert merge_shards(tmp_path / "w")[2] == 3


def test_more_shards_than_volumes_and_a_shard_of_bad_files_succeed(tmp_path: Path):
    """With afterok, a failing shard would hold back the merge: an empty shard and one whose
    only file is bad exit 0 (the bad file is an error row); the merge equals one run."""
    root = make_folder(tmp_path / "data", good=2, bad=False)
    (root / "zz_truncated.nii.gz").write_bytes((root / "case_0.nii.gz").read_bytes()[:300])
    run_slice("nifti", root, cfg_for(tmp_path / "one"), log=quiet)
    args = ["slice", "--dataset", "nifti", "--root", str(root), "--workdir", str(tmp_path / "w"), "--grid-size", str(G)]
    outputs = []
    for i in range(4):
        res = CliRunner().invoke(app, [*args, "--shard", f"{i}/4"])
        assert res.exit_code == 0, res.output
        outputs.append(" ".join(res.output.split()))
    assert "zz_truncated.nii.gz" in outputs[2]  # the bad file's shard (sorted: case_0, case_1, zz_...)
    assert "shard 3/4: no volumes of the 3 found fall in this shard" in outputs[3]
    assert CliRunner().invoke(app, [*args, "--shard", "2/4", "--strict"]).exit_code == 1
    merge_shards(tmp_path / "w")
    assert_same_manifests(tmp_path / "one", tmp_path / "w")
    # nothing to find is still a failure, shard or not
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, [*args[:4], str(tmp_path / "empty"), *args[5:], "--shard", "0/2"])
    assert res.exit_code == 1 and "no nifti volumes found" in res.output


def test_local_pool_a_dying_worker_is_one_error_row_and_the_rest_goes_on(tmp_path: Path):
    """A worker that dies breaks a process pool for every item in it; only the item that dies
    again when run alone is an error row, and the other volumes match a serial run."""
    from curation.sources.datasets import discover

    root = make_folder(tmp_path / "data", good=3, bad=False)
    specs, _ = discover("nifti", root)
    lines: list[str] = []
    records = LocalExecutor(2).run(ExitOn(cfg_for(tmp_path / "pool"), "case_1.nii.gz"), specs,
                                   on_result=lambda item, recs, done, total: lines.extend(r["error"] for r in recs if r["error"]))
    assert sorted(r["status"] for r in records) == ["error", "ok", "ok"]
    (line,) = lines
    assert "case_1.nii.gz: worker failed (BrokenProcessPool" in line and "\n" not in line
    serial = LocalExecutor(1).run(SliceStep(cfg_for(tmp_path / "serial")), [s for s in specs if s.source.name != "case_1.nii.gz"])
    assert len(serial) == 2
    assert tree_digest(tmp_path / "pool") == tree_digest(tmp_path / "serial")


class ThreadProbe:
    """A step that reports the worker it ran in."""

    def __call__(self, item):
        import threading

        torch = sys.modules.get("torch")
        return [{"item": item, "pid": os.getpid(), "omp": os.environ.get("OMP_NUM_THREADS"),
                 "torch_threads": torch.get_num_threads() if torch else None, "threads": threading.active_count()}]

    def failed(self, item, exc):
        return [{"item": item, "error": repr(exc)}]


def test_local_pool_workers_run_one_thread_each(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    got = LocalExecutor(2).run(ThreadProbe(), [0, 1, 2, 3])
    assert sorted(r["item"] for r in got) == [0, 1, 2, 3] and not any("error" in r for r in got)
    assert {r["omp"] for r in got} == {"1"} and os.getpid() not in {r["pid"] for r in got}
    assert {r["torch_threads"] for r in got} <= {None, 1}
    assert "OMP_NUM_THREADS" not in os.environ  # the caller's environment is left as it was


def test_ray_address_that_finds_no_cluster_is_one_line_naming_our_flag():
    class NoCluster:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**_kw):
            raise ConnectionError("Could not find any running Ray instance. Please specify ... `--address` flag\nmore")

    with pytest.raises(ConnectionError, match=r"^--ray-address auto: Could not find any running Ray instance\. .*flag$"):
        RayExecutor(address="auto")._connect(NoCluster())


def test_console_script_with_workers_prestarts_its_pool_and_matches_one_process(tmp_path: Path):
    """`curate slice --workers 2` as the console script runs it (med3dinsight.launch: the fork server
    starts before the command line is parsed): a bad file is one line and an error row, the
    manifests equal an in-process single-worker run's, and the exit status is the command's."""
    from med3dinsight.launch import prestart_slice_workers

    assert not prestart_slice_workers(["slice", "--workers", "1"])
    assert not prestart_slice_workers(["slice", "--workers", "2", "--executor", "ray"])
    assert not prestart_slice_workers(["slice", "--workers=x"])
    assert not prestart_slice_workers(["rank", "--workers", "2"])
    root = make_folder(tmp_path / "data", good=3)
    run_slice("nifti", root, cfg_for(tmp_path / "one"), log=quiet)
    code = "import sys; from med3dinsight.launch import curate; sys.argv[0] = 'curate'; curate()"
    cmd = [sys.executable, "-c", code, "slice", "--dataset", "nifti", "--root", str(root), "--grid-size", str(G),
           "--workdir", str(tmp_path / "two"), "--workers=2"]
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "flat2d.nii.gz" in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert "processed" in res.stdout  # the summary reached a pipe before the fast exit
    assert_same_manifests(tmp_path / "one", tmp_path / "two")
    bad = subprocess.run([*cmd[:3], "slice", "--dataset", "nifti", "--root", str(tmp_path / "none"), "--workers", "2"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
