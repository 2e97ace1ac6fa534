"""What a `curate slice` rerun may skip: a volume whose ``record.json`` matches the fingerprint
and whose files are all there and whole. Anything else is redone, with one line saying why."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from curation.sources.volume_spec import VolumeSpec
from curation.store.layout import Workdir
from curation.store.volume_store import StoreError, verify_display, verify_npy

log = logging.getLogger("curation.slice")


class Redo(Exception):
    """A finished-looking volume that must be redone; the message says which file and why."""


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``; None when there is none; Redo when it cannot be trusted."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Redo(f"{path}: unreadable record ({exc.strerror or exc})") from None
    try:
        rec = json.loads(text)
    except ValueError as exc:
        raise Redo(f"{path}: damaged record.json ({type(exc).__name__})") from None
    if not isinstance(rec, dict):
        raise Redo(f"{path}: damaged record.json (not an object)")
    return rec


def verify_outputs(workdir: Path, rec: dict[str, Any]) -> None:
    """Every array and the slice table a finished record points to, checked; Redo if not."""
    wd = Workdir(workdir)
    try:
        verify_npy(wd.root / str(rec.get("volume_path") or wd.volume_dir(rec["volume_id"]) / "volume.npy"))
        if rec.get("label_volume_path"):
            verify_npy(wd.root / rec["label_volume_path"])
        verify_display(wd.root / str(rec.get("display_path") or wd.volume_dir(rec["volume_id"]) / "display.npy.zst"))
    except StoreError as exc:
        raise Redo(str(exc)) from None
    try:
        read_volume_rows(wd, rec["volume_id"])
    except StoreError as exc:
        raise Redo(str(exc)) from None


def read_volume_rows(wd: Workdir, volume_id: str) -> list[dict[str, Any]]:
    """A finished volume's slice rows (``slices.json``, or the ``slices.parquet`` of volumes
    sliced before); StoreError naming the file when missing or damaged."""
    path = wd.volume_rows(volume_id)
    legacy = wd.legacy_volume_rows(volume_id)
    if not path.exists() and legacy.exists():
        try:
            import pyarrow.parquet as pq

            return pq.read_table(legacy).to_pylist()
        except Exception as exc:  # a damaged Parquet file
            raise StoreError(f"{legacy}: damaged slice table ({type(exc).__name__})") from None
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: slice rows are missing") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: damaged slice rows ({type(exc).__name__})") from None
    if not isinstance(rows, list):
        raise StoreError(f"{path}: damaged slice rows (not a list)")
    return rows


def done_records(spec: VolumeSpec, workdir: Path, fp: str) -> list[dict[str, Any]] | None:
    """Records of a finished volume whose fingerprint still matches and whose outputs are whole,
    else None (with one logged line when something it would have trusted is damaged)."""
    wd = Workdir(workdir)
    try:
        if spec.channel is not None:
            channels: list[int] | None = [spec.channel]
        elif len(spec.channel_names) > 1:
            channels = list(range(len(spec.channel_names)))
        else:
            channels = None  # 4D-or-not is only known after loading: channel 0..k folders
        recs = []
        ch = 0
        while True:
            if channels is not None and ch >= len(channels):
                break
            channel = channels[ch] if channels is not None else ch
            rec = read_record(wd.volume_record(spec.volume_id(channel)))
            if rec is None:
                if channels is None and recs:
                    break
                return None
            if rec.get("fingerprint") != fp or rec.get("status") != "ok":
                return None
            recs.append(rec)
            ch += 1
        for rec in recs:
            verify_outputs(workdir, rec)
        return recs
    except Redo as exc:
        log.warning("redoing %s: %s", spec.display_path, spec.safe_text(str(exc)))
        return None
