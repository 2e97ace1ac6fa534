"""The per-volume work of `curate slice`: one `VolumeSpec` in, its records out.

For each volume (one per channel of a 4D file) the step writes ``volumes/<volume_id>/``:
``volume.npy`` (grid^3 float16), ``label.npy``, ``display.npy.zst`` (uint8, zstd .npy),
``slices.json`` (its slice rows) and, last, ``record.json``: its presence with a matching fingerprint is the
"done" marker a rerun trusts. `SliceStep` bundles that work with the config; it is picklable and
knows nothing of order, shards or pools, so any executor (``curation.executors.local``) can run it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np

from curation.imageio.labels import load_label
from curation.imageio.volume_io import VolumeError, load_nifti
from curation.privacy.private_map import PrivateMap
from curation.slicing.config import PreprocessConfig, SliceConfig  # noqa: F401  (re-exported)
from curation.slicing.preprocess import guess_modality, preprocess
from curation.slicing.prestart import WORKER_MODULE
from curation.slicing.quality import flag_lines, flag_names, nifti_intent, result_flags, source_flags
from curation.slicing.resume import done_records
from curation.slicing.rows import ROWS_VERSION, slice_rows
from curation.sources.modality import known_subset, normalise_modality
from curation.sources.volume_spec import VolumeSpec
from curation.store.fsutil import WorkdirError, atomic_write_bytes
from curation.store.layout import Workdir
from curation.store.volume_store import save_display, save_npy

log = logging.getLogger("curation.slice")

# 4D files without channel names and more volumes than this are time series: keep volume 0.
MAX_UNNAMED_CHANNELS = 8


@dataclass(frozen=True)
class SliceStep:
    """`curate slice`'s work on one volume, picklable so that any executor can ship it.

    ``step(spec)`` writes the volume's folder(s) and returns its records (status ok or error);
    it never raises on bad input. ``step.done(spec)`` is the resume check.
    """

    cfg: SliceConfig
    worker_module: ClassVar[str] = WORKER_MODULE  # what a worker process preloads

    def __call__(self, spec: VolumeSpec) -> list[dict[str, Any]]:
        self.prepare(spec)
        records = process_volume(spec, self.cfg, fingerprint(spec, self.cfg))
        self._remember(spec, records)
        return records

    def done(self, spec: VolumeSpec) -> list[dict[str, Any]] | None:
        """Records of a finished volume whose fingerprint still matches and whose files are
        whole, else None (a damaged record or array is one logged line, then redone)."""
        self.prepare(spec)
        if spec.error:
            return None
        records = done_records(spec, self.cfg.workdir, fingerprint(spec, self.cfg))
        if records:
            self._remember(spec, records)
        return records

    def failed(self, spec: VolumeSpec, exc: BaseException) -> list[dict[str, Any]]:
        """The error row of a volume whose worker crashed; a workdir fault ends the run."""
        if isinstance(exc, WorkdirError):
            raise exc
        self.prepare(spec)
        records = [error_record(spec, self.cfg, f"{spec.source}: worker failed ({type(exc).__name__}: {exc})")]
        self._remember(spec, records)
        return records

    def prepare(self, spec: VolumeSpec) -> None:
        """Make ``spec`` pseudonymous where the run or its dataset asks for it: the workdir key
        for its ids, and a collection name for its subset only when it is a known one."""
        if self.cfg.pseudonymize:
            spec.pseudonymous = True
        if not spec.pseudonymous or spec.id_key is not None:
            return
        if spec.kind != "dicom" and known_subset(spec.subset) == (None, None) and not re.fullmatch(r"Task\d+_[A-Za-z0-9]+", spec.subset):
            spec.subset = spec.dataset  # a folder name may be a patient's name
        spec.id_key = PrivateMap(self.cfg.workdir).key()

    def _remember(self, spec: VolumeSpec, records: list[dict[str, Any]]) -> None:
        """Pseudonymous ids -> real paths, in the workdir's one private file."""
        if not spec.pseudonymous:
            return
        series_key = getattr(spec.series, "series_key", None)
        PrivateMap(self.cfg.workdir).register([
            {"id": r["volume_id"], "case_id": r["case_id"], "dataset": spec.dataset, "source": str(spec.source),
             "label": str(spec.label) if spec.label else None, "series_key": series_key,
             "source_path": r["source_path"]}
            for r in records
        ])


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
         "modality": cfg.modality, "body_region": cfg.body_region, "rows": ROWS_VERSION},
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


# --------------------------------------------------------------------------- one volume


def _load(spec: VolumeSpec, max_voxels: int | None):
    if spec.kind == "dicom":
        from curation.dicom.load import load_series

        series = spec.series
        n = int(series.rows) * int(series.cols) * max(int(series.n_frames), len(series.files))
        if max_voxels is not None and n > max_voxels:
            raise VolumeError(f"{series.folder}: headers declare {series.rows}x{series.cols}x{series.n_frames} "
                              f"= {n:,} voxels, over --max-voxels {max_voxels:,}")
        return load_series(series)
    return load_nifti(spec.source, max_voxels=max_voxels)


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
        "part": getattr(spec.series, "part", "") or None,
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
    """The status=error row of a source that produced no volume (one line, no identifiers)."""
    rec = _base_record(spec, spec.channel if spec.channel is not None else 0, cfg)
    rec["error"] = spec.safe_text(message)
    return rec


def process_volume(spec: VolumeSpec, cfg: SliceConfig, fp: str) -> list[dict[str, Any]]:
    """Preprocess one source (all its channels) and write its folder(s). Never raises on bad
    input; raises `WorkdirError` (one line) when the workdir cannot be written.

    Error lines name the file (its pseudonym for pseudonymous specs), on one line.
    """
    records = _process_volume(spec, cfg, fp)
    for rec in records:
        for key in ("error", "notes"):
            if rec.get(key):
                rec[key] = spec.safe_text(rec[key])
    return records


def _read_inputs(spec: VolumeSpec, cfg: SliceConfig) -> tuple[Any, np.ndarray, np.ndarray | None, list[int], list[str]]:
    """Image, then label (an image fault is never blamed on its label): the loaded volume, its
    array, the exact label, the channels to write and notes for the row."""
    notes: list[str] = []
    loaded = _load(spec, cfg.max_voxels)
    notes += [f"{spec.source}: {w}" for w in loaded.meta.get("warnings", [])]
    data = _squeeze_extra(np.asarray(loaded.data))
    if data.ndim == 4:
        channels = list(range(data.shape[3])) if spec.channel is None else [spec.channel]
        if spec.channel is None and not spec.channel_names and len(channels) > MAX_UNNAMED_CHANNELS:
            channels = [0]  # a time series (fMRI, DWI), not channels: its first volume only
        if spec.channel is not None and spec.channel >= data.shape[3]:
            raise VolumeError(f"{spec.source}: channel {spec.channel} out of range for shape {data.shape}")
    elif data.ndim == 3 and min(data.shape) >= 2:
        channels = [spec.channel if spec.channel is not None else 0]
    elif data.ndim < 3 or min(data.shape) < 2:
        raise VolumeError(f"{spec.source}: 2D image (shape {tuple(data.shape)}), not a volume")
    else:
        raise VolumeError(f"{spec.source}: unsupported array shape {tuple(data.shape)}")
    label = None
    if spec.label is not None and not spec.label.exists():
        notes.append(f"{spec.label}: listed label file is missing; image sliced without labels")
    elif spec.label is not None:
        label, label_warnings = load_label(spec.label, loaded, tuple(data.shape), cfg.max_voxels)
        notes += [f"{spec.label}: {w}" for w in label_warnings]
    return loaded, data, label, channels, notes


def _process_volume(spec: VolumeSpec, cfg: SliceConfig, fp: str) -> list[dict[str, Any]]:
    wd = Workdir(cfg.workdir)
    if spec.error:
        return [error_record(spec, cfg, spec.error)]
    try:
        loaded, data, label, channels, notes = _read_inputs(spec, cfg)
        source_sha = sha256_files(spec.series.files if spec.kind == "dicom" else [spec.source])
        if spec.kind == "dicom" and getattr(spec.series, "part", ""):
            # Parts cut from the same files are different volumes, not duplicates of each other.
            source_sha = hashlib.sha256(f"{source_sha}#{spec.series.part}".encode()).hexdigest()
    except VolumeError as exc:
        return [error_record(spec, cfg, str(exc))]
    except MemoryError:
        return [error_record(spec, cfg, f"{spec.source}: out of memory reading the source (try --max-voxels)")]
    except Exception as exc:  # a reader bug must not stop the run
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return [error_record(spec, cfg, f"{spec.source}: {type(exc).__name__}: {first}")]
    for note in notes:  # library warnings and missing labels: one line each, naming the file
        log.warning("%s", spec.safe_text(note))

    records = []
    intent = nifti_intent(spec.source) if spec.kind != "dicom" else None
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
            notes="; ".join(notes) or None,
            quality_flags=[],
        )
        flags = source_flags(arr, tuple(data.shape), modality, name="" if spec.kind == "dicom" else str(spec.source), intent=intent)
        try:
            pre = preprocess(arr, loaded.affine, modality, cfg.pre, label=label, body_region=body_region, name=str(spec.source))
        except VolumeError as exc:
            rec["error"] = str(exc)
            rec["quality_flags"] = flag_names(flags)
            records.append(rec)
            continue
        vdir = wd.volume_dir(rec["volume_id"])
        try:
            _write_volume(wd, vdir, rec, pre, spec, cfg, fp, flags)
        except OSError as exc:  # disk full, read-only workdir...: the run cannot go on
            where = exc.filename or vdir
            raise WorkdirError(f"{where}: cannot write ({exc.strerror or type(exc).__name__})") from None
        records.append(rec)
    return records


def _record_flags(rec: dict[str, Any], flags: list[tuple[str, str]], spec: VolumeSpec) -> None:
    """``quality_flags`` of the record, and one line per flag in its notes and the log."""
    rec["quality_flags"] = flag_names(flags)
    lines = [f"{spec.source}: {line}" for line in flag_lines(flags)]
    for line in lines:
        log.warning("%s", spec.safe_text(line))
    if lines:
        rec["notes"] = "; ".join([rec["notes"], *lines] if rec.get("notes") else lines)


def _write_volume(wd: Workdir, vdir: Path, rec: dict[str, Any], pre: Any, spec: VolumeSpec, cfg: SliceConfig, fp: str,
                  flags: list[tuple[str, str]] | None = None) -> None:
    vdir.mkdir(parents=True, exist_ok=True)
    save_npy(vdir / "volume.npy", pre.volume)
    if pre.label is not None:
        save_npy(vdir / "label.npy", pre.label)
        rec["label_volume_path"] = wd.rel(vdir / "label.npy")
        rec["label_path"] = spec.label_display()
    save_display(vdir / "display.npy.zst", pre.display)
    rows = slice_rows(rec["volume_id"], pre.volume, pre.label, spec.label_names, cfg.pre.foreground_level, cfg.min_foreground,
                      voxel_mm=pre.cube_mm / max(1, pre.volume.shape[0]))
    _record_flags(rec, [*(flags or []), *result_flags(rows, cfg.pre.grid_size)], spec)
    atomic_write_bytes(wd.volume_rows(rec["volume_id"]), json.dumps(rows).encode())
    rec.update(
        volume_path=wd.rel(vdir / "volume.npy"),
        display_path=wd.rel(vdir / "display.npy.zst"),
        cube_mm=pre.cube_mm,
        display_spacing=pre.display_spacing,
        display_origin_mm=pre.display_origin_mm,
        display_window=pre.display_window,
        intensity_window=pre.intensity_window,
        n_slices=len(rows),
        status="ok",
        fingerprint=fp,
    )
    if rec.get("notes"):
        rec["notes"] = spec.safe_text(rec["notes"])
    if cfg.render_all:  # imported here: PIL and the manifest schema, on the path of --render-all only
        import pandas as pd

        from curation.slicing.render import render_volume_slices

        render_volume_slices(wd.root, rec, pd.DataFrame(rows), size=cfg.render_size)
    # the done marker, written last
    atomic_write_bytes(wd.volume_record(rec["volume_id"]), json.dumps(rec, sort_keys=True).encode(), fsync=True)
