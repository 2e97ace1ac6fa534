"""The order parallel `curate slice` workers get volumes in (largest first), a pool that never
waits for its caller between items, and outputs that do not depend on either."""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from conftest import phantom_ras, ras_affine, save_nifti

from curation.executors.local import Executor, LocalExecutor
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.schedule import decoded_bytes, largest_first, volume_cost
from curation.slicing.stage import SliceConfig, run_slice
from curation.sources.datasets import discover
from curation.store.manifest import read_manifest

G = 32
# discovery order (by name) puts the largest last: the order a pool should not follow
SHAPES = {"a_small": (16, 14, 10), "b_mid": (24, 20, 16), "c_small": (16, 14, 10), "d_large": (40, 36, 30)}


def cfg_for(workdir: Path, workers: int = 1) -> SliceConfig:
    return SliceConfig(workdir=workdir, pre=PreprocessConfig(grid_size=G, spacing=1.0), workers=workers)


def uneven_folder(root: Path) -> Path:
    for k, (name, shape) in enumerate(SHAPES.items()):
        data, _ = phantom_ras(shape=shape, seed=k)
        save_nifti(root / f"{name}.nii.gz", data.astype(np.int16), ras_affine())
    (root / "e_truncated.nii.gz").write_bytes(gzip.compress(b"\0" * 4000)[:60])  # an error row
    return root


def outputs(workdir: Path) -> tuple[dict[str, bytes], list]:
    files = {p.relative_to(workdir).as_posix(): p.read_bytes()
             for p in sorted((workdir / "volumes").rglob("*")) if p.is_file()}
    return files, [read_manifest(workdir / "manifests" / n) for n in ("volumes.parquet", "slices.parquet")]


def assert_same_outputs(a: Path, b: Path) -> None:
    fa, (va, sa) = outputs(a)
    fb, (vb, sb) = outputs(b)
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)  # record.json included
    assert va.equals(vb) and sa.equals(sb) and list(va.columns) == list(vb.columns)


def test_decoded_bytes_reads_the_gzip_trailer(tmp_path: Path):
    raw = os.urandom(1000) + b"\0" * 50_000
    (tmp_path / "x.nii.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "y.nii").write_bytes(raw)
    (tmp_path / "fake.gz").write_bytes(b"not gzip at all, just text")
    assert decoded_bytes(tmp_path / "x.nii.gz") == len(raw)
    assert decoded_bytes(tmp_path / "y.nii") == len(raw)
    assert decoded_bytes(tmp_path / "fake.gz") == len(b"not gzip at all, just text")
    assert decoded_bytes(tmp_path / "missing.nii.gz") == 0 and decoded_bytes(None) == 0


def test_largest_first_by_decoded_size_ties_keep_discovery_order(tmp_path: Path):
    specs, _ = discover("nifti", uneven_folder(tmp_path / "data"))
    names = [s.source.name for s in specs]
    assert names == sorted(names)  # discovery: by name
    order = [s.source.name for s in largest_first(specs)]
    assert order[:2] == ["d_large.nii.gz", "b_mid.nii.gz"]
    assert order[2:4] == ["a_small.nii.gz", "c_small.nii.gz"]  # same size: as discovered
    assert order[-1] == "e_truncated.nii.gz"
    assert volume_cost(specs[0]) == volume_cost(specs[2]) > 0


class Reversed(Executor):
    """Runs the items in this process in the order given, and reports them in reverse: what a
    pool may do when the first volume is the longest. Remembers the order it was given."""

    def __init__(self) -> None:
        self.given: list[str] = []

    def imap(self, step, items: Sequence[Any]) -> Iterator[tuple[Any, Any]]:
        self.given = [s.source.name for s in items]
        done = [(item, step(item)) for item in items]
        yield from reversed(done)


def test_parallel_runs_get_the_largest_first_and_write_what_one_worker_writes(tmp_path: Path):
    root = uneven_folder(tmp_path / "data")
    one = run_slice("nifti", root, cfg_for(tmp_path / "one"), log=lambda _m: None)
    ex = Reversed()
    rev = run_slice("nifti", root, cfg_for(tmp_path / "rev"), log=lambda _m: None, executor=ex)
    assert ex.given[:2] == ["d_large.nii.gz", "b_mid.nii.gz"] and ex.given[-1] == "e_truncated.nii.gz"
    pool = run_slice("nifti", root, cfg_for(tmp_path / "pool", workers=2), log=lambda _m: None)
    assert (one.processed, one.errors) == (rev.processed, rev.errors) == (pool.processed, pool.errors) == (4, 1)
    assert_same_outputs(tmp_path / "one", tmp_path / "rev")
    assert_same_outputs(tmp_path / "one", tmp_path / "pool")


def test_one_worker_keeps_the_discovery_order(tmp_path: Path):
    root = uneven_folder(tmp_path / "data")
    seen: list[str] = []
    run_slice("nifti", root, cfg_for(tmp_path / "one"), log=lambda _m: None,
              on_progress=lambda done, total, name: seen.append(Path(name).name))
    assert seen == sorted(seen) and not LocalExecutor(1).parallel and LocalExecutor(2).parallel


class Stamp:
    """A step that reports when it ran and where."""

    def __call__(self, item: int) -> list[dict]:
        t0 = time.time()
        time.sleep(0.05)
        return [{"item": item, "pid": os.getpid(), "start": t0}]

    def failed(self, item, exc):
        return [{"item": item, "error": repr(exc)}]


def test_pool_workers_go_on_while_the_caller_handles_a_result():
    """A slow ``on_result`` (curate slice imports pandas after the first volume) leaves the
    workers busy: the items queued behind the first start before it returns."""
    window: list[float] = []

    def slow(item, results, done, total):
        if done == 1:
            window.append(time.time())
            time.sleep(1.5)
            window.append(time.time())

    got = LocalExecutor(2).run(Stamp(), list(range(6)), on_result=slow)
    assert sorted(r["item"] for r in got) == list(range(6))
    # items 2 and 3 were queued behind the first two: they start before the slow call returns (one
    # of them may even start before it begins); with one item per worker they would wait for it
    started_before_return = [r for r in got if r["item"] >= 2 and r["start"] < window[1]]
    assert len(started_before_return) >= 2, (window, got)
