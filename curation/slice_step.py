"""The per-volume work of `curate slice`: one `VolumeSpec` in, its records out.

For each volume (one per channel of a 4D file) the step writes ``volumes/<volume_id>/``:
``volume.npy`` (grid^3 float16), ``label.npy``, ``display.npy.zst`` (uint8, zstd .npy),
``slices.parquet`` and, last, ``record.json``: its presence with a matching fingerprint is the
"done" marker a rerun trusts. `SliceStep` bundles that work with the config; it is picklable and
knows nothing of order, shards or pools, so any executor (``curation.executor``) can run it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .dicom_dataset import scrub
from .fsutil import atomic_write_bytes
from .layout import Workdir
from .manifest import write_manifest
from .modality import known_subset, normalise_modality
from .preprocess import PreprocessConfig, guess_modality, preprocess
from .render import render_volume_slices
from .slice_rows import slice_rows
from .volume_io import VolumeError, load_nifti
from .volume_spec import VolumeSpec
from .volume_store import save_display, save_npy

# 4D files without channel names and more volumes than this are time series: keep volume 0.
MAX_UNNAMED_CHANNELS = 8


@dataclass
class SliceConfig:
    """Everything `curate slice` needs besides the dataset.

    The step reads the per-volume settings; ``workers``, ``shard`` and ``strict`` are the run's
    (read by `curation.slicing.run_slice`).
    """

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


@dataclass(frozen=True)
class SliceStep:
    """`curate slice`'s work on one volume, picklable so that any executor can ship it.

    ``step(spec)`` writes the volume's folder(s) and returns its records (status ok or error);
    it never raises on bad input. ``step.done(spec)`` is the resume check.
    """

    cfg: SliceConfig

    def __call__(self, spec: VolumeSpec) -> list[dict[str, Any]]:
        return process_volume(spec, self.cfg, fingerprint(spec, self.cfg))

    def done(self, spec: VolumeSpec) -> list[dict[str, Any]] | None:
        """Records of a finished volume whose fingerprint still matches, else None."""
        if spec.error:
            return None
        return done_records(spec, self.cfg.workdir, fingerprint(spec, self.cfg))

    def failed(self, spec: VolumeSpec, exc: BaseException) -> list[dict[str, Any]]:
        """The error row of a volume whose worker crashed."""
        return [error_record(spec, self.cfg, f"{spec.source}: worker failed ({type(exc).__name__}: {exc})")]


# --------------------------------------------------------------------------- fingerprints


def _file_stat(path: Path | None) -> list:
    if path is None:
        return [None]
    try:
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None, None]


def fingerprint(spec: VolumeSpec, cfg: SliceConfig) -> str:
    """Hash of the source files' stats and the settings that shape the outputs."""
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
    """One digest over the contents of ``paths``, in order."""
    outer = hashlib.sha256()
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        outer.update(h.digest())
    return outer.hexdigest()


def done_records(spec: VolumeSpec, workdir: Path, fp: str) -> list[dict[str, Any]] | None:
    """Records of a finished volume whose fingerprint still matches, else None."""
    wd = Workdir(workdir)
    channels = [spec.channel] if spec.channel is not None else None
    if channels is None:
        n = len(spec.channel_names) if len(spec.channel_names) > 1 else None
        if n is None:
            # 4D-or-not is only known after loading: look for channel 0..k folders.
            recs = []
            ch = 0
            while True:
                path = wd.volume_record(spec.volume_id(ch))
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
        path = wd.volume_record(spec.volume_id(ch))
        if not path.exists():
            return None
        rec = json.loads(path.read_text())
        if rec.get("fingerprint") != fp or rec.get("status") != "ok":
            return None
        recs.append(rec)
    return recs


# --------------------------------------------------------------------------- slice rows


# --------------------------------------------------------------------------- one volume


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


def error_record(spec: VolumeSpec, cfg: SliceConfig, message: str) -> dict[str, Any]:
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
    wd = Workdir(cfg.workdir)
    if spec.error:
        return [error_record(spec, cfg, spec.error)]
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
        return [error_record(spec, cfg, str(exc))]
    except Exception as exc:  # a reader bug must not stop the run
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return [error_record(spec, cfg, f"{spec.source}: {type(exc).__name__}: {first}")]

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
        vdir = wd.volume_dir(rec["volume_id"])
        vdir.mkdir(parents=True, exist_ok=True)
        save_npy(vdir / "volume.npy", pre.volume)
        if pre.label is not None:
            save_npy(vdir / "label.npy", pre.label)
            rec["label_volume_path"] = wd.rel(vdir / "label.npy")
            rec["label_path"] = spec.label.name if spec.label else None
        save_display(vdir / "display.npy.zst", pre.display)
        rows = slice_rows(rec["volume_id"], pre.volume, pre.label, spec.label_names, cfg.pre.foreground_level, cfg.min_foreground)
        write_manifest(rows, vdir / "slices.parquet", schema=None)
        rec.update(
            volume_path=wd.rel(vdir / "volume.npy"),
            display_path=wd.rel(vdir / "display.npy.zst"),
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
            render_volume_slices(wd.root, rec, rows, size=cfg.render_size)
        # the done marker, written last
        atomic_write_bytes(wd.volume_record(rec["volume_id"]), json.dumps(rec, sort_keys=True).encode(), fsync=True)
        records.append(rec)
    return records
