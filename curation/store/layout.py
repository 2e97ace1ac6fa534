"""The workdir layout: every path a stage reads or writes under ``--workdir`` is built here.

```
manifests/    volumes.parquet, slices.parquet, v1.parquet, ... (shards/ for --shard runs)
volumes/      <volume_id>/ volume.npy, label.npy, display.npy.zst, slices.json, record.json
cache/        png/<size>/<volume_id>/<plane>_<index>.png, captions.sqlite (+ .parquet), batches/
embeddings/   <fingerprint>/ image.parquet, text.parquet, meta.json; latest.json
checkpoints/  clip/, pretrain/
exports/      <encoder>_encoder.pt + .json
reports/      index.html, volumes/<volume_id>.html, rank_eval.json
private/      source_map.jsonl: pseudonymous ids -> real paths (the one file never to share)
```
Paths stored in manifests are relative to the workdir (``Workdir.rel``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workdir:
    """Paths under one workdir; ``Workdir(".")`` is the default of every command."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    def rel(self, path: str | os.PathLike) -> str:
        """``path`` relative to the workdir, as manifests store it."""
        return os.path.relpath(path, self.root)

    # manifests -------------------------------------------------------------------------
    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def volumes_manifest(self) -> Path:
        return self.manifests / "volumes.parquet"

    @property
    def slices_manifest(self) -> Path:
        return self.manifests / "slices.parquet"

    @property
    def shards(self) -> Path:
        return self.manifests / "shards"

    def shard_manifest(self, kind: str, i: int, n: int) -> Path:
        """``kind`` is "volumes" or "slices"."""
        return self.shards / f"{kind}.{i}-of-{n}.parquet"

    def release(self, version: int) -> Path:
        return self.manifests / f"v{version}.parquet"

    # volumes ---------------------------------------------------------------------------
    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    def volume_dir(self, volume_id: str) -> Path:
        return self.volumes / volume_id

    def volume_record(self, volume_id: str) -> Path:
        """The per-volume "done" marker, written last."""
        return self.volume_dir(volume_id) / "record.json"

    def volume_rows(self, volume_id: str) -> Path:
        """The volume's slice rows (JSON) that assembling the slices manifest reads; volumes
        sliced before it was JSON have ``slices.parquet`` instead (`legacy_volume_rows`)."""
        return self.volume_dir(volume_id) / "slices.json"

    def legacy_volume_rows(self, volume_id: str) -> Path:
        return self.volume_dir(volume_id) / "slices.parquet"

    # cache -----------------------------------------------------------------------------
    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @staticmethod
    def png_relpath(volume_id: str, plane: str, index: int, size: int) -> str:
        return f"cache/png/{size}/{volume_id}/{plane}_{index:03d}.png"

    @property
    def caption_db(self) -> Path:
        return self.cache / "captions.sqlite"

    @property
    def caption_table(self) -> Path:
        """Parquet copy of the caption cache (the `caption_cache` query view)."""
        return self.cache / "captions.parquet"

    @property
    def dicom_header_cache(self) -> Path:
        """The DICOM header index (keyed hashes only): reruns read no header again."""
        return self.cache / "dicom_headers"

    @property
    def batches(self) -> Path:
        return self.cache / "batches"

    # embeddings ------------------------------------------------------------------------
    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    def embedding_store(self, fingerprint: str) -> Path:
        return self.embeddings / fingerprint

    @property
    def embeddings_latest(self) -> Path:
        return self.embeddings / "latest.json"

    # training --------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def clip_checkpoints(self) -> Path:
        return self.checkpoints / "clip"

    @property
    def pretrain_checkpoints(self) -> Path:
        return self.checkpoints / "pretrain"

    def run_dir(self, stage: str, name: str | None = None) -> Path:
        """``checkpoints/<stage>/<name>/`` of a named run (`--name`); without a name the stage's
        own folder (``checkpoints/clip/``, ``checkpoints/pretrain/``), as before names existed.
        A name is one plain folder name (no separators, not ``.``/``..``)."""
        base = self.checkpoints / stage
        if not name:
            return base
        if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"--name {name!r}: give a plain folder name")
        return base / name

    @property
    def finetune_checkpoints(self) -> Path:
        """``checkpoints/finetune/``: one folder per `train finetune --name`."""
        return self.checkpoints / "finetune"

    @property
    def caption_lock(self) -> Path:
        """The OS file lock of the one paying `curate caption` run."""
        return self.cache / "captions.lock"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    # reports ---------------------------------------------------------------------------
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def rank_eval(self) -> Path:
        return self.reports / "rank_eval.json"

    # private ---------------------------------------------------------------------------
    @property
    def private(self) -> Path:
        """Owner-only folder of what must never be shared."""
        return self.root / "private"

    @property
    def private_map(self) -> Path:
        """The one private file: the id key and pseudonymous id -> real path entries."""
        return self.private / "source_map.jsonl"

    def disk_folders(self) -> dict[str, Path]:
        """The top-level folders `curate stats` sizes."""
        return {p.name: p for p in (self.manifests, self.volumes, self.cache, self.embeddings, self.checkpoints)}
