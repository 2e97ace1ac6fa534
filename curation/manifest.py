"""Manifest schema and Parquet IO: the only contract between stages.

Every manifest is a Parquet file under ``<workdir>/manifests``. Paths inside are relative to
the workdir. Writes are atomic (temp file + ``os.replace``) and carry key-value metadata:
``schema_version``, tool version, creation time and the command line.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
# Axis of the RAS array that each plane cuts across (axial fixes S, coronal A, sagittal R).
PLANE_AXIS: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}

VOLUMES_SCHEMA = pa.schema(
    [
        ("volume_id", pa.string()),
        ("dataset", pa.string()),
        ("subset", pa.string()),
        ("case_id", pa.string()),
        ("channel", pa.int32()),
        ("channel_name", pa.string()),
        ("modality", pa.string()),
        ("body_region", pa.string()),
        ("source_path", pa.string()),
        ("label_path", pa.string()),
        ("source_shape", pa.list_(pa.int64())),
        ("source_spacing", pa.list_(pa.float64())),
        ("source_axcodes", pa.string()),
        ("volume_path", pa.string()),
        ("label_volume_path", pa.string()),
        ("display_path", pa.string()),
        ("label_names", pa.string()),  # JSON object {"1": "liver", ...}
        ("grid_size", pa.int32()),
        ("cube_mm", pa.float64()),
        ("display_spacing", pa.list_(pa.float64())),
        ("display_window", pa.list_(pa.float64())),
        ("display_offset", pa.list_(pa.int64())),
        ("intensity_window", pa.list_(pa.float64())),
        ("n_slices", pa.int32()),
        ("source_sha256", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)

SLICES_SCHEMA = pa.schema(
    [
        ("slice_id", pa.string()),
        ("volume_id", pa.string()),
        ("plane", pa.string()),
        ("plane_index", pa.int8()),
        ("index", pa.int32()),
        ("position", pa.float64()),
        ("foreground_fraction", pa.float32()),
        ("mean_intensity", pa.float32()),
        ("std_intensity", pa.float32()),
        ("labels_present", pa.list_(pa.string())),
        ("vote_score", pa.float64()),
        ("vote_rank", pa.int32()),
        ("selection_order", pa.int64()),
        ("image_path", pa.string()),
        ("image_sha256", pa.string()),
    ]
)


def manifest_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "manifests"


def _metadata(extra: dict[str, Any] | None = None) -> dict[bytes, bytes]:
    from . import __version__

    meta = {
        "schema_version": SCHEMA_VERSION,
        "tool": "med3dinsight",
        "tool_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "paths_relative_to": "workdir",
    }
    if extra:
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return {k.encode(): str(v).encode() for k, v in meta.items()}


def to_table(df: pd.DataFrame, schema: pa.Schema | None) -> pa.Table:
    """Convert a DataFrame to Arrow, filling missing schema columns with nulls."""
    if schema is None:
        return pa.Table.from_pandas(df, preserve_index=False)
    df = df.copy()
    for field in schema:
        if field.name not in df.columns:
            df[field.name] = None
    extra = [c for c in df.columns if c not in schema.names]
    table = pa.Table.from_pandas(df[list(schema.names)], schema=schema, preserve_index=False)
    for name in extra:  # keep columns added by later stages, typed by inference
        table = table.append_column(name, pa.array(df[name].tolist()))
    return table


def write_manifest(
    df: pd.DataFrame,
    path: str | Path,
    schema: pa.Schema | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``df`` as Parquet at ``path`` with provenance metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = to_table(df, schema)
    table = table.replace_schema_metadata(_metadata(extra_meta))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest as a DataFrame (list columns come back as Python lists)."""
    table = pq.read_table(path)
    df = table.to_pandas()
    for name in df.columns:
        if pa.types.is_list(table.schema.field(name).type):
            df[name] = [None if v is None else list(v) for v in df[name]]
    return df


def read_metadata(path: str | Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"pandas")}
