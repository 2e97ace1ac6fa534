"""`curate slice`: volumes -> preprocessed arrays + per-slice rows, resumable and shardable.

Each volume gets a folder ``volumes/<volume_id>/`` holding ``volume.npy`` (grid^3 float16),
``label.npy``, ``display.npy.zst`` (uint8, zstd-compressed .npy), ``slices.parquet`` and, last,
``record.json``: its presence with a matching fingerprint is the "done" marker a rerun trusts.
The manifests are assembled from those records at the end of the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from .fsutil import atomic_path, atomic_write_bytes
from .datasets import VolumeSpec, discover, known_subset, normalise_modality, scrub
from .manifest import PLANE_AXIS, PLANES, SLICES_SCHEMA, VOLUMES_SCHEMA, manifest_dir, read_manifest, write_manifest
from .preprocess import PreprocessConfig, guess_modality, preprocess
from .volume_io import VolumeError, load_nifti

# 4D files without channel names and more volumes than this are time series: keep volume 0.
MAX_UNNAMED_CHANNELS = 8
RANK_COLUMNS = ["vote_score", "vote_rank", "selection_order", "image_path", "image_sha256"]


@dataclass
class SliceConfig:
    """Everything `curate slice` needs besides the dataset."""

    workdir: Path
    pre: PreprocessConfig = field(default_factory=PreprocessConfig)
    min_foreground: float = 0.01
    workers: int = 1
    shard: tuple[int, int] | None = None
    render_all: bool = False
    render_size: int = 512
    strict: bool = False
    modality: str | None = None  # override for every volume of the run (CT, MR, ...)
    body_region: str | None = None  # override (brain, chest, abdomen, pelvis, heart, ...)


@dataclass
class SliceSummary:
    processed: int = 0
    skipped: int = 0
    errors: int = 0
    slices: int = 0
    seconds: float = 0.0
    error_lines: list[str] = field(default_factory=list)
    volumes_path: Path | None = None
    slices_path: Path | None = None


# --------------------------------------------------------------------------- helpers


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def save_display(path: Path, arr: np.ndarray) -> None:
    """uint8 display volume as a zstd-compressed .npy (``zstd -d`` gives a plain .npy)."""
    with atomic_path(path) as tmp, pa.output_stream(str(tmp), compression="zstd") as out:
        np.save(out, arr)


def load_display(path: str | Path) -> np.ndarray:
    with pa.input_stream(str(path), compression="zstd") as src:
        return np.lib.format.read_array(src, allow_pickle=False)


def _file_stat(path: Path | None) -> list:
    if path is None:
        return [None]
    try:
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None, None]


def fingerprint(spec: VolumeSpec, cfg: SliceConfig) -> str:
    files = spec.series.files if spec.kind == "dicom" else [spec.source]
    stats = [_file_stat(Path(f)) for f in files] + [_file_stat(spec.label)]
    payload = json.dumps(
        {"stats": stats, "pre": cfg.pre.fingerprint(), "fg": cfg.min_foreground, "channel": spec.channel,
         "modality": cfg.modality, "body_region": cfg.body_region},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def sha256_files(paths: Iterable[Path]) -> str:
    outer = hashlib.sha256()
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        outer.update(h.digest())
    return outer.hexdigest()


def _rel(path: Path, workdir: Path) -> str:
    return os.path.relpath(path, workdir)


# --------------------------------------------------------------------------- one volume


def slice_rows(
    volume_id: str,
    vol: np.ndarray,
    label: np.ndarray | None,
    label_names: dict[str, str],
    level: float,
    min_foreground: float,
) -> pd.DataFrame:
    """One row per slice along each plane whose foreground fraction reaches ``min_foreground``."""
    G = vol.shape[0]
    v32 = vol.astype(np.float32)
    fg = v32 > level
    present: dict[int, dict[int, np.ndarray]] = {}
    values: list[int] = []
    if label is not None:
        values = [int(v) for v in np.unique(label) if v != 0]
        for v in values:
            m = label == v
            present[v] = {ax: m.any(axis=tuple(a for a in range(3) if a != ax)) for ax in range(3)}
    rows = []
    for plane_index, plane in enumerate(PLANES):
        ax = PLANE_AXIS[plane]
        others = tuple(a for a in range(3) if a != ax)
        frac = fg.mean(axis=others)
        mean = v32.mean(axis=others)
        std = v32.std(axis=others)
        for idx in range(G):
            if frac[idx] < min_foreground or frac[idx] == 0:
                continue
            labels = [label_names.get(str(v), f"label_{v}") for v in values if present[v][ax][idx]]
            rows.append(
                {
                    "slice_id": f"{volume_id}:{plane}:{idx}",
                    "volume_id": volume_id,
                    "plane": plane,
                    "plane_index": plane_index,
                    "index": idx,
                    "position": (idx + 0.5) / G,
                    "foreground_fraction": float(frac[idx]),
                    "mean_intensity": float(mean[idx]),
                    "std_intensity": float(std[idx]),
                    "labels_present": sorted(set(labels)),
                }
            )
    return pd.DataFrame(rows, columns=[f.name for f in SLICES_SCHEMA if f.name not in RANK_COLUMNS])


def _load(spec: VolumeSpec):
    if spec.kind == "dicom":
        from .dicom import load_series

        return load_series(spec.series)
    return load_nifti(spec.source)


def _squeeze_extra(data: np.ndarray) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI (x, y, z, t=1, c)
        data = data[:, :, :, 0, :]
    return data


def _base_record(spec: VolumeSpec, channel: int | None, cfg: SliceConfig) -> dict[str, Any]:
    channel_name = spec.channel_names.get(str(channel)) if channel is not None else None
    return {
        "volume_id": spec.volume_id(channel),
        "dataset": spec.dataset,
        "subset": spec.subset,
        "case_id": spec.case_id,
        "channel": channel,
        "channel_name": channel_name,
        "modality": spec.modality,
        "body_region": spec.body_region,
        "source_path": spec.display_path,
        "label_path": None,
        "label_names": json.dumps(spec.label_names, sort_keys=True),
        "grid_size": cfg.pre.grid_size,
        "status": "error",
        "error": None,
    }


def _error_record(spec: VolumeSpec, cfg: SliceConfig, message: str) -> dict[str, Any]:
    """The status=error row of a source that produced no volume (patient tokens scrubbed)."""
    rec = _base_record(spec, spec.channel if spec.channel is not None else 0, cfg)
    rec["error"] = scrub(message, spec.scrub_tokens)
    return rec


def process_volume(spec: VolumeSpec, cfg: SliceConfig, fp: str) -> list[dict[str, Any]]:
    """Preprocess one source (all its channels) and write its folder(s). Never raises on bad input.

    Error lines name the file, with any patient identifier seen in DICOM headers scrubbed.
    """
    records = _process_volume(spec, cfg, fp)
    for rec in records:
        if rec.get("error"):
            rec["error"] = scrub(rec["error"], spec.scrub_tokens)
    return records


def _process_volume(spec: VolumeSpec, cfg: SliceConfig, fp: str) -> list[dict[str, Any]]:
    workdir = Path(cfg.workdir)
    if spec.error:
        return [_error_record(spec, cfg, spec.error)]
    try:
        loaded = _load(spec)
        data = _squeeze_extra(np.asarray(loaded.data))
        label = None
        if spec.label is not None:
            label = _squeeze_extra(np.asarray(load_nifti(spec.label).data))
            if label.ndim != 3:
                raise VolumeError(f"{spec.label}: label must be 3D, got shape {tuple(label.shape)}")
            if tuple(label.shape) != tuple(data.shape[:3]):
                raise VolumeError(
                    f"{spec.label}: label shape {tuple(label.shape)} does not match image shape {tuple(data.shape[:3])}"
                )
        if data.ndim == 4:
            channels = list(range(data.shape[3])) if spec.channel is None else [spec.channel]
            if spec.channel is None and not spec.channel_names and len(channels) > MAX_UNNAMED_CHANNELS:
                channels = [0]  # a time series (fMRI, DWI), not channels: its first volume only
            if spec.channel is not None and spec.channel >= data.shape[3]:
                raise VolumeError(f"{spec.source}: channel {spec.channel} out of range for shape {data.shape}")
        elif data.ndim == 3:
            channels = [spec.channel if spec.channel is not None else 0]
        elif data.ndim < 3 or min(data.shape) < 2:
            raise VolumeError(f"{spec.source}: 2D image (shape {tuple(data.shape)}), not a volume")
        else:
            raise VolumeError(f"{spec.source}: unsupported array shape {tuple(data.shape)}")
        source_sha = sha256_files(spec.series.files if spec.kind == "dicom" else [spec.source])
    except VolumeError as exc:
        return [_error_record(spec, cfg, str(exc))]
    except Exception as exc:  # a reader bug must not stop the run
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return [_error_record(spec, cfg, f"{spec.source}: {type(exc).__name__}: {first}")]

    records = []
    for ch in channels:
        rec = _base_record(spec, ch, cfg)
        arr = data[..., ch] if data.ndim == 4 else data
        ch_name = spec.channel_names.get(str(ch))
        modality = normalise_modality(spec.modality) or normalise_modality(loaded.modality)
        if ch_name and normalise_modality(ch_name) in ("CT", "MR"):
            modality = normalise_modality(ch_name)
        modality = normalise_modality(cfg.modality) or modality or guess_modality(arr)
        body_region = cfg.body_region or spec.body_region or known_subset(spec.subset)[1]
        rec.update(
            modality=modality,
            body_region=body_region,
            source_shape=[int(v) for v in data.shape],
            source_spacing=[round(v, 6) for v in loaded.spacing],
            source_axcodes=loaded.axcodes,
            source_sha256=source_sha,
        )
        try:
            pre = preprocess(arr, loaded.affine, modality, cfg.pre, label=label, body_region=body_region, name=str(spec.source))
        except VolumeError as exc:
            rec["error"] = str(exc)
            records.append(rec)
            continue
        vdir = workdir / "volumes" / rec["volume_id"]
        vdir.mkdir(parents=True, exist_ok=True)
        save_npy(vdir / "volume.npy", pre.volume)
        if pre.label is not None:
            save_npy(vdir / "label.npy", pre.label)
            rec["label_volume_path"] = _rel(vdir / "label.npy", workdir)
            rec["label_path"] = spec.label.name if spec.label else None
        save_display(vdir / "display.npy.zst", pre.display)
        rows = slice_rows(rec["volume_id"], pre.volume, pre.label, spec.label_names, cfg.pre.foreground_level, cfg.min_foreground)
        write_manifest(rows, vdir / "slices.parquet", schema=None)
        rec.update(
            volume_path=_rel(vdir / "volume.npy", workdir),
            display_path=_rel(vdir / "display.npy.zst", workdir),
            cube_mm=pre.cube_mm,
            display_spacing=pre.display_spacing,
            display_offset=pre.display_offset,
            display_window=pre.display_window,
            intensity_window=pre.intensity_window,
            n_slices=len(rows),
            status="ok",
            fingerprint=fp,
        )
        if cfg.render_all:
            from .render import render_volume_slices

            render_volume_slices(workdir, rec, rows, size=cfg.render_size)
        atomic_write_bytes(vdir / "record.json", json.dumps(rec, sort_keys=True).encode(), fsync=True)
        records.append(rec)
    return records


# --------------------------------------------------------------------------- the run


def _done_records(spec: VolumeSpec, workdir: Path, fp: str) -> list[dict[str, Any]] | None:
    """Records of a finished volume whose fingerprint still matches, else None."""
    channels = [spec.channel] if spec.channel is not None else None
    if channels is None:
        n = len(spec.channel_names) if len(spec.channel_names) > 1 else None
        if n is None:
            # 4D-or-not is only known after loading: look for channel 0..k folders.
            recs = []
            ch = 0
            while True:
                path = workdir / "volumes" / spec.volume_id(ch) / "record.json"
                if not path.exists():
                    break
                recs.append(json.loads(path.read_text()))
                ch += 1
            if recs and all(r.get("fingerprint") == fp and r.get("status") == "ok" for r in recs):
                return recs
            return None
        channels = list(range(n))
    recs = []
    for ch in channels:
        path = workdir / "volumes" / spec.volume_id(ch) / "record.json"
        if not path.exists():
            return None
        rec = json.loads(path.read_text())
        if rec.get("fingerprint") != fp or rec.get("status") != "ok":
            return None
        recs.append(rec)
    return recs


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _process_job(spec: VolumeSpec, cfg: SliceConfig, fp: str) -> list[dict[str, Any]]:
    return process_volume(spec, cfg, fp)


def run_slice(
    dataset: str,
    root: Path,
    cfg: SliceConfig,
    label_root: Path | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    log: Callable[[str], None] = print,
) -> SliceSummary:
    """Discover, process (or resume), and write volumes.parquet + slices.parquet."""
    t0 = time.perf_counter()
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    specs, problems = discover(dataset, Path(root), label_root=label_root)
    summary = SliceSummary()
    for path, reason in problems:
        line = f"{path}: {reason}" if str(path) not in reason else reason
        summary.error_lines.append(line)
        log(f"skipped file: {line}")
    if cfg.shard is not None:
        i, n = cfg.shard
        specs = specs[i::n]
    todo: list[tuple[VolumeSpec, str]] = []
    records: list[dict[str, Any]] = []
    resumed_ids: set[str] = set()
    for spec in specs:
        fp = fingerprint(spec, cfg)
        done = None if spec.error else _done_records(spec, workdir, fp)
        if done is not None:
            records.extend(done)
            resumed_ids |= {r["volume_id"] for r in done}
            summary.skipped += 1
        else:
            todo.append((spec, fp))
    if summary.skipped:
        log(f"resuming: {summary.skipped} volume(s) already done, {len(todo)} to process")
    total = len(todo)

    def collect(recs: list[dict[str, Any]]) -> None:
        for rec in recs:
            records.append(rec)
            if rec["status"] == "ok":
                summary.processed += 1
            else:
                summary.errors += 1
                summary.error_lines.append(rec["error"])
                log(f"error: {rec['error']}")

    if cfg.workers <= 1:
        for k, (spec, fp) in enumerate(todo):
            collect(process_volume(spec, cfg, fp))
            if on_progress:
                on_progress(k + 1, total, spec.display_path)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
            futures = {pool.submit(_process_job, spec, cfg, fp): spec for spec, fp in todo}
            for k, fut in enumerate(as_completed(futures)):
                spec = futures[fut]
                try:
                    collect(fut.result())
                except Exception as exc:  # a crashed worker: record and go on
                    collect([_error_record(spec, cfg, f"{spec.source}: worker failed ({type(exc).__name__}: {exc})")])
                if on_progress:
                    on_progress(k + 1, total, spec.display_path)

    records.sort(key=lambda r: r["volume_id"])
    vol_df, slice_df = assemble(records, workdir)
    if cfg.shard is not None:
        i, n = cfg.shard
        out_dir = manifest_dir(workdir) / "shards"
        summary.volumes_path = write_manifest(vol_df, out_dir / f"volumes.{i}-of-{n}.parquet", VOLUMES_SCHEMA)
        summary.slices_path = write_manifest(slice_df, out_dir / f"slices.{i}-of-{n}.parquet", SLICES_SCHEMA)
    else:
        slice_df = _keep_rank_columns(slice_df, manifest_dir(workdir) / "slices.parquet", resumed_ids)
        vol_df, slice_df = _with_other_datasets(vol_df, slice_df, workdir, dataset)
        summary.volumes_path = write_manifest(vol_df, manifest_dir(workdir) / "volumes.parquet", VOLUMES_SCHEMA)
        summary.slices_path = write_manifest(slice_df, manifest_dir(workdir) / "slices.parquet", SLICES_SCHEMA)
    summary.slices = len(slice_df)
    summary.seconds = time.perf_counter() - t0
    return summary


def assemble(records: list[dict[str, Any]], workdir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Volume rows from records; slice rows from each ok volume's slices.parquet."""
    cols = [f.name for f in VOLUMES_SCHEMA]
    vol_df = pd.DataFrame([{k: r.get(k) for k in cols} for r in records], columns=cols)
    parts = []
    for r in records:
        if r.get("status") == "ok":
            parts.append(read_manifest(workdir / "volumes" / r["volume_id"] / "slices.parquet"))
    slice_df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[f.name for f in SLICES_SCHEMA])
    return vol_df, slice_df


def _keep_rank_columns(slice_df: pd.DataFrame, old_path: Path, resumed_ids: set[str]) -> pd.DataFrame:
    """A rerun keeps what later stages wrote for volumes that did not change."""
    if not old_path.exists() or slice_df.empty:
        return slice_df
    old = read_manifest(old_path)
    keep = [c for c in RANK_COLUMNS if c in old.columns]
    if not keep:
        return slice_df
    old = old[old["volume_id"].isin(resumed_ids)][["slice_id", *keep]]
    merged = slice_df.drop(columns=[c for c in keep if c in slice_df.columns]).merge(old, on="slice_id", how="left")
    return merged


def _with_other_datasets(
    vol_df: pd.DataFrame, slice_df: pd.DataFrame, workdir: Path, dataset: str | set[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One workdir can hold several datasets: a run replaces only its own dataset's rows."""
    datasets = {dataset} if isinstance(dataset, str) else set(dataset)
    vpath, spath = manifest_dir(workdir) / "volumes.parquet", manifest_dir(workdir) / "slices.parquet"
    if not vpath.exists():
        return vol_df, slice_df
    old_v = read_manifest(vpath)
    old_v = old_v[~old_v["dataset"].isin(datasets) & ~old_v["volume_id"].isin(vol_df["volume_id"])]
    if old_v.empty:
        return vol_df, slice_df
    vol_df = pd.concat([old_v, vol_df], ignore_index=True).sort_values("volume_id", ignore_index=True)
    if spath.exists():
        old_s = read_manifest(spath)
        old_s = old_s[old_s["volume_id"].isin(old_v["volume_id"])]
        slice_df = pd.concat([old_s, slice_df], ignore_index=True)
        slice_df = slice_df.sort_values(["volume_id", "plane_index", "index"], ignore_index=True)
    return vol_df, slice_df


def merge_shards(workdir: Path) -> tuple[Path, Path, int, int]:
    """`curate merge`: combine shard manifests into volumes.parquet and slices.parquet."""
    shard_dir = manifest_dir(workdir) / "shards"
    vols = sorted(shard_dir.glob("volumes.*-of-*.parquet"))
    if not vols:
        raise FileNotFoundError(f"{shard_dir}: no shard manifests to merge (run `curate slice --shard i/n` first)")
    vol_df = pd.concat([read_manifest(p) for p in vols], ignore_index=True)
    sl_paths = sorted(shard_dir.glob("slices.*-of-*.parquet"))
    slice_df = pd.concat([read_manifest(p) for p in sl_paths], ignore_index=True)
    vol_df = vol_df.drop_duplicates("volume_id", keep="last").sort_values("volume_id", ignore_index=True)
    slice_df = slice_df.drop_duplicates("slice_id", keep="last")
    slice_df = slice_df.sort_values(["volume_id", "plane_index", "index"], ignore_index=True)
    vol_df, slice_df = _with_other_datasets(vol_df, slice_df, workdir, set(vol_df["dataset"].dropna()))
    vp = write_manifest(vol_df, manifest_dir(workdir) / "volumes.parquet", VOLUMES_SCHEMA, {"merged_shards": len(vols)})
    sp = write_manifest(slice_df, manifest_dir(workdir) / "slices.parquet", SLICES_SCHEMA, {"merged_shards": len(vols)})
    return vp, sp, len(vol_df), len(slice_df)


def config_dict(cfg: SliceConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["workdir"] = str(cfg.workdir)
    return d
