"""Manifest schemas (volumes, slices, release) and Parquet IO: the contract between stages.

Every manifest is a Parquet file under ``<workdir>/manifests``. Paths inside are relative to
the workdir. Writes are atomic (temp file + ``os.replace``) and carry key-value metadata:
``schema_version``, tool version, creation time and the command line.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.store.fsutil import atomic_path
from curation.store.layout import Workdir

if TYPE_CHECKING:  # pandas is imported by those who pass DataFrames: slicing workers need none
    import pandas as pd

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
        ("display_origin_mm", pa.list_(pa.float64())),  # where the display box starts in the cube
        ("display_offset", pa.list_(pa.int64())),  # volumes sliced before the lazy display volume
        ("intensity_window", pa.list_(pa.float64())),
        ("n_slices", pa.int32()),
        ("source_sha256", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("duplicate_of", pa.string()),  # volume_id of an earlier volume with identical source voxels
        ("notes", pa.string()),  # remarks on an ok volume (label listed but missing, library warnings, quality flags)
        ("part", pa.string()),  # the part of a split DICOM series (echo2, phase, b1000-dir07, t012)
        # too_few_voxels | statistical_map | constant_intensity | few_intensity_levels |
        # empty_after_preprocessing (curation.slicing.quality); empty when the volume looks fine.
        # Older manifests lack the column: readers treat it as no flags.
        ("quality_flags", pa.list_(pa.string())),
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
        # JSON list per class present (volumes with a label map only): name, area_mm2,
        # fraction (of the slice's body), side (right|left|midline|bilateral), peak (area / its largest)
        ("label_regions", pa.string()),
        ("vote_score", pa.float64()),
        ("vote_rank", pa.int32()),
        ("selection_order", pa.int64()),
        ("image_path", pa.string()),
        ("image_sha256", pa.string()),
    ]
)


# Slice columns that later stages fill (`curate rank`, rendering); slicing leaves them out.
RANK_COLUMNS = ["vote_score", "vote_rank", "selection_order", "image_path", "image_sha256"]

# Volume columns a release row carries, so that training needs no other manifest.
RELEASE_VOLUME_COLUMNS: tuple[str, ...] = (
    "dataset", "subset", "case_id", "channel", "channel_name", "modality", "body_region",
    "volume_path", "label_volume_path", "display_path", "grid_size",
)

# The release manifest (manifests/vN.parquet): what training reads. Slice columns, the volume
# columns above, then the caption and the subject-wise split.
RELEASE_SCHEMA = pa.schema(
    [*SLICES_SCHEMA]
    + [VOLUMES_SCHEMA.field(name) for name in RELEASE_VOLUME_COLUMNS]
    + [
        ("refused", pa.bool_()),
        ("caption", pa.string()),
        ("caption_model", pa.string()),
        ("prompt_version", pa.string()),
        ("caption_mode", pa.string()),
        ("cost_usd", pa.float64()),
        ("split", pa.string()),
    ]
)


def manifest_dir(workdir: str | Path) -> Path:
    return Workdir(workdir).manifests


def release_manifests(workdir: str | Path) -> list[Path]:
    """Release manifests v1.parquet, v2.parquet, ... sorted by version number."""
    found = []
    for p in Workdir(workdir).manifests.glob("v*.parquet"):
        stem = p.stem[1:]
        if stem.isdigit():
            found.append((int(stem), p))
    return [p for _, p in sorted(found)]


def next_release_path(workdir: str | Path) -> Path:
    """The first unused ``manifests/vN.parquet``."""
    found = release_manifests(workdir)
    return Workdir(workdir).release(int(found[-1].stem[1:]) + 1 if found else 1)


def resolve_manifest(workdir: str | os.PathLike, manifest: str | os.PathLike) -> Path:
    """Find a manifest given as a path (absolute or relative to the cwd), a path under the
    workdir, or a name under ``manifests/`` with or without ``.parquet``.

    Raises:
        FileNotFoundError: naming where it looked.
    """
    wd = Workdir(workdir)
    path = Path(manifest)
    for candidate in (path, wd.root / path, wd.manifests / path, wd.manifests / f"{path}.parquet"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(missing_release_line(workdir, manifest))


def missing_release_line(workdir: str | os.PathLike, manifest: str | os.PathLike) -> str:
    """One line for a ``--manifest`` that is not there: the path it stands for (a bare name such
    as ``v9`` is ``<workdir>/manifests/v9.parquet``; a relative path is under the workdir), then
    the releases that do exist, or how to make the first."""
    wd = Workdir(workdir)
    given = Path(manifest)
    if given.is_absolute():
        looked = given
    elif len(given.parts) == 1:
        looked = wd.manifests / (given.name if given.suffix == ".parquet" else f"{given.name}.parquet")
    else:
        looked = wd.root / given
    found = release_manifests(workdir)
    if not found:
        return f"{looked}: no such manifest; {wd.manifests} holds no release yet (run `curate caption` first)"
    names = ", ".join(p.stem for p in found)
    return (f"{looked}: no such manifest; releases in {wd.manifests}: {names} "
            f"(e.g. --manifest {found[-1].stem}, the latest)")


def usable_caption_rows(df: pd.DataFrame) -> pd.Series:
    """The one rule for which release rows training may use: a non-blank caption that was not
    refused, on a rendered slice. Returns a boolean mask aligned with ``df``."""
    keep = df["caption"].notna() & (df["caption"].fillna("").astype(str).str.strip().str.len() > 0)
    if "refused" in df.columns:
        keep &= ~df["refused"].fillna(False).astype(bool)
    for column in ("image_path", "image_sha256"):  # a reader that needs one checks it is there
        if column in df.columns:
            keep &= df[column].notna()
    return keep


# Flags whose value is a file or folder: provenance keeps the flag, never the path (a folder
# name may be a patient's name, a home folder a user's).
PATH_FLAGS = ("--root", "--label-root", "--labels", "--list", "--list-file", "--prompt-file", "--prices",
              "--out", "--output", "--workdir", "--manifest", "--checkpoint", "--clip", "--init",
              "--embeddings", "--split-file", "--cache-dir", "--label", "--image")
HIDDEN = "<path>"


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith(("~", ".")) or os.path.exists(value)


def _public_args(args: list[str]) -> list[str]:
    """The command line for provenance, with every path left out: the value of each path flag
    (``--root DIR`` and ``--root=DIR`` alike, wherever it stands) and any other argument that
    looks like a path."""
    out, hide = [], False
    for arg in map(str, args):
        if hide:
            out.append(HIDDEN)
            hide = False
            continue
        flag, eq, value = arg.partition("=")
        if arg.startswith("--") and flag in PATH_FLAGS:
            if eq:
                out.append(f"{flag}={HIDDEN}")
            else:
                out.append(arg)
                hide = True
        elif arg.startswith("--") and eq:
            out.append(f"{flag}={HIDDEN}" if _looks_like_path(value) else arg)
        elif arg.startswith("-"):
            out.append(arg)
        else:
            out.append(HIDDEN if _looks_like_path(arg) else arg)
    return out


def _metadata(extra: dict[str, Any] | None = None) -> dict[bytes, bytes]:
    from curation import __version__

    meta = {
        "schema_version": SCHEMA_VERSION,
        "tool": "med3dinsight",
        "tool_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *_public_args(sys.argv[1:])]),
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


def flag_duplicates(volumes: pd.DataFrame) -> pd.DataFrame:
    """Fill ``duplicate_of``: the first volume_id (sorted) with the same source_sha256 and
    channel, for every later one (a scan copied into two collections or cases)."""
    volumes = volumes.copy()
    volumes["duplicate_of"] = None
    if volumes.empty or "source_sha256" not in volumes.columns:
        return volumes
    ok = volumes[volumes["source_sha256"].notna() & (volumes.get("status") == "ok")]
    channel = ok["channel"].fillna(-1) if "channel" in ok.columns else 0
    for _, group in ok.assign(_ch=channel).groupby(["source_sha256", "_ch"]):
        if len(group) > 1:
            ids = group.sort_values("volume_id")["volume_id"].tolist()
            volumes.loc[volumes["volume_id"].isin(ids[1:]), "duplicate_of"] = ids[0]
    return volumes


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
    with atomic_path(path, fsync=True) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


class ManifestError(OSError):
    """A manifest that cannot be read: one line naming the file and what to do; ``reason`` is
    the reader's error type."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest as a DataFrame (list columns come back as Python lists); a damaged file
    is a `ManifestError` naming it (a missing one stays FileNotFoundError)."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        name = Path(path).name
        hint = ("rerun `curate slice`: it rebuilds the manifests from the volume folders"
                if name in ("volumes.parquet", "slices.parquet") else "restore it or rerun the stage that wrote it")
        why = type(exc).__name__
        raise ManifestError(f"{path}: unreadable manifest ({why}); {hint}", why) from None
    df = table.to_pandas()
    for name in df.columns:
        if pa.types.is_list(table.schema.field(name).type):
            df[name] = [None if v is None else list(v) for v in df[name]]
    return df


def read_metadata(path: str | Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"pandas")}
