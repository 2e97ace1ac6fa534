"""`curate slice`, the stage: volumes -> preprocessed arrays + per-slice rows, resumable and shardable.

`run_slice` discovers the dataset's volumes, keeps its shard, skips the ones whose "done" marker
(``record.json``) still matches, hands the rest to an executor running `SliceStep` (the
per-volume work, `curation.slicing.step`; the largest first when they run side by side,
`curation.slicing.schedule`), and assembles ``volumes.parquet`` + ``slices.parquet``
from the records (or a shard's manifests, which `merge_shards` combines).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from curation.executors.local import Executor, LocalExecutor
from curation.privacy.private_map import PrivateMap
from curation.slicing.resume import Redo, read_record, read_volume_rows, verify_outputs
from curation.slicing.rows import ROWS_COLUMNS
from curation.slicing.schedule import largest_first
from curation.slicing.step import SliceConfig, SliceStep
from curation.sources.datasets import discover
from curation.sources.volume_spec import VolumeSpec
from curation.store.layout import Workdir
from curation.store.manifest import (
    RANK_COLUMNS,
    SLICES_SCHEMA,
    VOLUMES_SCHEMA,
    flag_duplicates,
    read_manifest,
    write_manifest,
)

if TYPE_CHECKING:  # imported where manifests are assembled: not before the workers start
    import pandas as pd

__all__ = ["SliceConfig", "SliceStep", "SliceSummary", "assemble", "make_executor", "merge_shards", "parse_shard", "run_slice"]

SLURM_SHARD_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
EXECUTORS = ("local", "ray")


def make_executor(kind: str = "local", workers: int = 1, address: str | None = None) -> Executor:
    """The executor ``curate slice --executor KIND`` names.

    Args:
        kind: "local" (this machine, ``workers`` processes) or "ray" (Ray tasks).
        workers: local processes; for "ray" without ``address``, the CPUs of the local Ray
            started here.
        address: "ray" only: the cluster to join (``auto`` for the one ``ray start`` made).

    Raises:
        ValueError: an unknown kind, or an address without "ray".
        ImportError: "ray" where Ray is not installed (one line saying how).
    """
    if kind == "local":
        if address:
            raise ValueError("--ray-address needs --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        from curation.executors.ray_executor import RayExecutor, import_ray  # only now: curation imports without Ray

        import_ray()  # fail before any work when Ray is missing
        return RayExecutor(address=address or None, num_cpus=None if address else max(1, workers))
    raise ValueError(f"--executor {kind!r}: choose one of {', '.join(EXECUTORS)}")


def parse_shard(value: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``--shard``: ``"i/n"`` (0 <= i < n), ``"auto"`` (this SLURM array task's), or None.

    ``auto`` is i = ``SLURM_ARRAY_TASK_ID`` of n = ``SLURM_ARRAY_TASK_COUNT``, for an array
    submitted as ``--array=0-(n-1)`` (a ``%k`` throttle is fine). Anything else (``--array=1-4``,
    a rerun of one task as ``--array=2``) is refused rather than guessed: pass ``--shard i/n``.

    Raises:
        ValueError: one line saying what is wrong (bad form, variables missing or out of range).
    """
    if value is None:
        return None
    if value.strip().lower() == "auto":
        env = os.environ if environ is None else environ
        missing = [v for v in SLURM_SHARD_VARS if not env.get(v, "").strip()]
        if missing:
            raise ValueError(f"--shard auto: {' and '.join(missing)} not set (run it in an `sbatch --array` job, or pass --shard i/n)")
        try:
            i, n = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "").strip() or 0)
        except ValueError:
            raise ValueError("--shard auto: SLURM_ARRAY_TASK_ID/COUNT/MIN are not integers") from None
        if first != 0 or n < 1 or not 0 <= i < n:
            raise ValueError(f"--shard auto: array task {i} of {n} (first {first}) is not in 0..{n - 1}: "
                             f"submit with --array=0-{max(n - 1, 0)}, or pass --shard i/n")
        return i, n
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ValueError("--shard takes i/n with 0 <= i < n (e.g. 0/4) or auto (SLURM array)")
    return int(m.group(1)), int(m.group(2))


@dataclass
class SliceSummary:
    """What `run_slice` did: counts, error lines, time and the manifests it wrote."""

    discovered: int = 0  # sources found in the dataset, before sharding (bad files included)
    processed: int = 0
    skipped: int = 0
    errors: int = 0
    slices: int = 0  # rows of the slices manifest written (other datasets of the workdir included)
    run_slices: int = 0  # slices of this run's dataset (or shard)
    seconds: float = 0.0
    error_lines: list[str] = field(default_factory=list)
    volumes_path: Path | None = None
    slices_path: Path | None = None


def run_slice(
    dataset: str,
    root: Path,
    cfg: SliceConfig,
    label_root: Path | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> SliceSummary:
    """Discover, process (or resume), and write volumes.parquet + slices.parquet.

    Args:
        dataset, root, label_root: what to discover (`curation.sources.datasets.discover`).
        cfg: the run's settings; ``cfg.shard = (i, n)`` keeps every n-th volume from i and
            writes shard manifests for `merge_shards`.
        on_progress: called as ``on_progress(done, total, source_path)`` after each volume.
        log: one line per skipped file, error and resume.
        executor: where the volumes are processed (default: ``LocalExecutor(cfg.workers)``).
    """
    t0 = time.perf_counter()
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    wd = Workdir(workdir)
    dicom = dataset == "dicom"
    specs, problems = discover(
        dataset, Path(root), label_root=label_root, pseudonymize=cfg.pseudonymize, series_parts=cfg.series_parts,
        cache_dir=wd.dicom_header_cache if dicom else None, id_key=PrivateMap(workdir).key() if dicom else None,
        workers=cfg.workers if dicom else None,
    )
    summary = SliceSummary(discovered=len(specs) + len(problems))
    sources = getattr(problems, "sources", {})
    if sources:  # `curate lookup input-...` / `series-...`: the real path, in the private map only
        PrivateMap(workdir).register([{"id": name, "source": path} for name, path in sorted(sources.items())])
    for path, reason in problems:
        line = f"{path}: {reason}" if str(path) not in reason else reason
        if reason.startswith("skipped:"):  # a localizer, secondary capture...: set aside, not an error
            log(f"set aside: {line}")
            continue
        summary.error_lines.append(line)
        log(f"skipped file: {line}")
    if cfg.shard is not None:
        i, n = cfg.shard
        specs = specs[i::n]
    step = SliceStep(cfg)
    todo: list[VolumeSpec] = []
    records: list[dict[str, Any]] = []
    resumed_ids: set[str] = set()
    for spec in specs:
        done = step.done(spec)
        if done is not None:
            records.extend(done)
            resumed_ids |= {r["volume_id"] for r in done}
            summary.skipped += 1
        else:
            todo.append(spec)
    if summary.skipped:
        log(f"resuming: {summary.skipped} volume(s) already done, {len(todo)} to process")

    def collect(spec: VolumeSpec, recs: list[dict[str, Any]], done: int, total: int) -> None:
        for rec in recs:
            if rec["status"] == "ok":
                summary.processed += 1
            else:
                summary.errors += 1
                summary.error_lines.append(rec["error"])
                log(f"error: {rec['error']}")
        if done == 1 and total > 1:  # the manifests need pandas: load it while volumes run
            import pandas  # noqa: F401
        if on_progress:
            on_progress(done, total, spec.display_path)

    executor = executor if executor is not None else LocalExecutor(cfg.workers)
    if executor.parallel:  # so that the workers finish together; no output depends on it
        todo = largest_first(todo)
    records.extend(executor.run(step, todo, on_result=collect))

    records.sort(key=lambda r: r["volume_id"])
    vol_df, slice_df = assemble(records, workdir)
    summary.run_slices = len(slice_df)
    if cfg.shard is not None:
        i, n = cfg.shard
        summary.volumes_path = _write_volumes(vol_df, wd.shard_manifest("volumes", i, n))
        summary.slices_path = write_manifest(slice_df, wd.shard_manifest("slices", i, n), SLICES_SCHEMA)
    else:
        prev = Previous.read(wd, log)
        slice_df = _keep_rank_columns(slice_df, prev.slices, resumed_ids)
        vol_df, slice_df = _with_other_datasets(vol_df, slice_df, wd, dataset, prev)
        summary.volumes_path = _write_volumes(vol_df, wd.volumes_manifest)
        summary.slices_path = write_manifest(slice_df, wd.slices_manifest, SLICES_SCHEMA)
    summary.slices = len(slice_df)
    summary.seconds = time.perf_counter() - t0
    return summary


def _write_volumes(vol_df: pd.DataFrame, path: Path, extra_meta: dict[str, Any] | None = None) -> Path:
    """volumes.parquet (or a shard's): every writer flags duplicate scans the same way, and
    writes ``quality_flags`` as a list (empty for volumes sliced before the flags existed)."""
    vol_df = vol_df.copy()
    flags = vol_df["quality_flags"] if "quality_flags" in vol_df.columns else [None] * len(vol_df)
    import numpy as np
    import pandas as pd

    vol_df["quality_flags"] = pd.Series(
        [[str(f) for f in v] if isinstance(v, (list, tuple, np.ndarray)) else [] for v in flags],
        index=vol_df.index, dtype=object)
    return write_manifest(flag_duplicates(vol_df), path, VOLUMES_SCHEMA, extra_meta)


def assemble(records: list[dict[str, Any]], workdir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Volume rows from records; slice rows from each ok volume's ``slices.json``."""
    import pandas as pd

    cols = [f.name for f in VOLUMES_SCHEMA]
    vol_df = pd.DataFrame([{k: r.get(k) for k in cols} for r in records], columns=cols)
    wd = Workdir(workdir)
    rows = [row for r in records if r.get("status") == "ok" for row in read_volume_rows(wd, r["volume_id"])]
    slice_df = pd.DataFrame(rows, columns=ROWS_COLUMNS) if rows else pd.DataFrame(columns=[f.name for f in SLICES_SCHEMA])
    return vol_df, slice_df


@dataclass
class Previous:
    """The manifests a run is about to replace, as read before it writes; a damaged one is
    None with ``damaged`` set (one line said so), and the volume records rebuild it."""

    volumes: pd.DataFrame | None = None
    slices: pd.DataFrame | None = None
    damaged: bool = False

    @classmethod
    def read(cls, wd: Workdir, log: Callable[[str], None]) -> Previous:
        prev = cls()
        for name, path, lost in (("volumes", wd.volumes_manifest, "other datasets' failed volumes left out"),
                                 ("slices", wd.slices_manifest, "without its rank columns (rerun `curate rank`)")):
            if not path.exists():
                continue
            try:
                setattr(prev, name, read_manifest(path))
            except Exception as exc:  # truncated or foreign
                prev.damaged = True
                why = getattr(exc, "reason", type(exc).__name__)
                log(f"{path}: unreadable ({why}); rebuilt from the volume records, {lost}")
        return prev


def _keep_rank_columns(slice_df: pd.DataFrame, old: pd.DataFrame | None, resumed_ids: set[str]) -> pd.DataFrame:
    """A rerun keeps what later stages wrote for volumes that did not change."""
    if old is None or slice_df.empty:
        return slice_df
    keep = [c for c in RANK_COLUMNS if c in old.columns]
    if not keep:
        return slice_df
    old = old[old["volume_id"].isin(resumed_ids)][["slice_id", *keep]]
    merged = slice_df.drop(columns=[c for c in keep if c in slice_df.columns]).merge(old, on="slice_id", how="left")
    return merged


def _with_other_datasets(
    vol_df: pd.DataFrame, slice_df: pd.DataFrame, wd: Workdir, dataset: str | set[str], prev: Previous
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One workdir can hold several datasets: a run replaces only its own dataset's rows. When
    the manifests were damaged, the other datasets' finished volumes come back from their folders."""
    import pandas as pd

    datasets = {dataset} if isinstance(dataset, str) else set(dataset)
    old_v = prev.volumes
    if old_v is None:
        if not prev.damaged:
            return vol_df, slice_df
        old_v = _other_records(wd, datasets, set(vol_df["volume_id"]))
    old_v = old_v[~old_v["dataset"].isin(datasets) & ~old_v["volume_id"].isin(vol_df["volume_id"])]
    if old_v.empty:
        return vol_df, slice_df
    vol_df = pd.concat([old_v, vol_df], ignore_index=True).sort_values("volume_id", ignore_index=True)
    old_s = prev.slices
    if old_s is None:  # damaged: the other volumes' rows from their folders
        ok = old_v[old_v["status"] == "ok"]["volume_id"]
        old_s = pd.DataFrame([row for vid in ok for row in read_volume_rows(wd, vid)], columns=ROWS_COLUMNS)
    old_s = old_s[old_s["volume_id"].isin(old_v["volume_id"])]
    slice_df = pd.concat([old_s, slice_df], ignore_index=True)
    slice_df = slice_df.sort_values(["volume_id", "plane_index", "index"], ignore_index=True)
    return vol_df, slice_df


def _other_records(wd: Workdir, datasets: set[str], skip: set[str]) -> pd.DataFrame:
    """Volume rows of every finished volume folder of another dataset (whole ones only)."""
    import pandas as pd

    cols = [f.name for f in VOLUMES_SCHEMA]
    rows = []
    for rec_path in sorted(wd.volumes.glob("*/record.json")) if wd.volumes.exists() else []:
        try:
            rec = read_record(rec_path)
            if rec and rec.get("status") == "ok" and rec.get("dataset") not in datasets and rec["volume_id"] not in skip:
                verify_outputs(wd.root, rec)
                rows.append({k: rec.get(k) for k in cols})
        except (Redo, KeyError):
            continue
    return pd.DataFrame(rows, columns=cols)


def merge_shards(workdir: Path, log: Callable[[str], None] = print) -> tuple[Path, Path, int, int]:
    """`curate merge`: combine shard manifests into volumes.parquet and slices.parquet."""
    import pandas as pd

    wd = Workdir(workdir)
    shard_dir = wd.shards
    vols = sorted(shard_dir.glob("volumes.*-of-*.parquet"))
    if not vols:
        raise FileNotFoundError(f"{shard_dir}: no shard manifests to merge (run `curate slice --shard i/n` first)")
    _check_complete(wd, vols)
    vol_df = pd.concat([read_manifest(p) for p in vols], ignore_index=True)
    sl_paths = sorted(shard_dir.glob("slices.*-of-*.parquet"))
    slice_df = pd.concat([read_manifest(p) for p in sl_paths], ignore_index=True)
    vol_df = vol_df.drop_duplicates("volume_id", keep="last").sort_values("volume_id", ignore_index=True)
    slice_df = slice_df.drop_duplicates("slice_id", keep="last")
    slice_df = slice_df.sort_values(["volume_id", "plane_index", "index"], ignore_index=True)
    vol_df, slice_df = _with_other_datasets(vol_df, slice_df, wd, set(vol_df["dataset"].dropna()), Previous.read(wd, log))
    vp = _write_volumes(vol_df, wd.volumes_manifest, {"merged_shards": len(vols)})
    sp = write_manifest(slice_df, wd.slices_manifest, SLICES_SCHEMA, {"merged_shards": len(vols)})
    return vp, sp, len(vol_df), len(slice_df)


def _check_complete(wd: Workdir, vols: list[Path]) -> None:
    """A merge after a shard died would silently drop its volumes: refuse, naming what is missing."""
    seen: dict[int, set[int]] = {}
    for p in vols:
        m = re.fullmatch(r"volumes\.(\d+)-of-(\d+)\.parquet", p.name)
        if m:
            seen.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    for n, got in sorted(seen.items()):
        missing = [f"{i}/{n}" for i in range(n) if i not in got or not wd.shard_manifest("slices", i, n).exists()]
        if missing:
            raise FileNotFoundError(f"{wd.shards}: shard(s) {', '.join(missing)} missing (rerun `curate slice --shard i/{n}` for them, then merge)")
