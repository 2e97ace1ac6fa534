"""`curate export`: a release manifest as WebDataset shards or CSV files for open_clip_train."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from med3dinsight.common import WorkdirOpt, console, out


def export_cmd(
    workdir: Path = WorkdirOpt,
    manifest: Optional[str] = typer.Option(None, "--manifest", help="Release manifest to export: a name such as v2 (manifests/v2.parquet), or a path (relative: to the cwd, else the workdir); default: the latest release."),
    fmt: str = typer.Option("webdataset", "--format", help="webdataset (tar shards per split: KEY.png, KEY.txt, KEY.json, plus sizes.json) | csv (one file per split: filepath,title,slice_id)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <workdir>/exports/<release>-<format>/, e.g. exports/v1-webdataset/)."),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Samples per WebDataset tar shard (the last shard of a split holds the rest)."),
) -> None:
    """Write a release in the formats trainers read: open_clip_train's --train-data shards or CSV.

    One file set per split (train/val/test), usable rows only (captioned, not refused). Prints the
    open_clip_train flags that read it: --train-data and --val-data (with --dataset-type
    webdataset and the sample counts for shards).
    """
    try:
        from curation.report.release_export import export_release

        result = export_release(workdir, manifest, fmt, out_dir, shard_size=max(1, shard_size))
    except (FileNotFoundError, ValueError) as exc:
        console.print("[red]error:[/red] " + escape(str(exc)), soft_wrap=True)
        raise typer.Exit(2) from None
    for line in result.errors[:20]:
        console.print("skipped: " + escape(line), soft_wrap=True)
    counts = ", ".join(f"{k} {v}" for k, v in result.rows.items())
    out.print(f"{result.manifest.name} -> {result.out} ({fmt}: {counts}; {len(result.files)} files)", soft_wrap=True,
              markup=False, highlight=False)
    label = "open_clip_train flags" if result.rows.get("train") else "open_clip_train"
    out.print(f"{label}: {result.usage(fmt)}", soft_wrap=True, markup=False, highlight=False)
