"""`curate export`: a release manifest as WebDataset shards or CSV files for open_clip_train."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from med3dinsight.common import WorkdirOpt, console, out


def export_cmd(
    workdir: Path = WorkdirOpt,
    manifest: Optional[str] = typer.Option(None, "--manifest", help="Release manifest (path or name such as v2; default: the latest release)."),
    fmt: str = typer.Option("webdataset", "--format", help="webdataset (tar shards: KEY.png, KEY.txt, KEY.json) | csv (filepath,title)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default exports/<release>-<format>/)."),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Samples per WebDataset shard."),
) -> None:
    """Write a release in the formats trainers read: open_clip_train's --train-data shards or CSV.

    One file set per split (train/val/test), usable rows only (captioned, not refused). Prints the
    open_clip_train flags that read it.
    """
    try:
        from curation.store.release_export import export_release

        result = export_release(workdir, manifest, fmt, out_dir, shard_size=max(1, shard_size))
    except (FileNotFoundError, ValueError) as exc:
        console.print("[red]error:[/red] " + escape(str(exc)), soft_wrap=True)
        raise typer.Exit(2) from None
    for line in result.errors[:20]:
        console.print("skipped: " + escape(line), soft_wrap=True)
    counts = ", ".join(f"{k} {v}" for k, v in result.rows.items())
    out.print(f"{result.manifest.name} -> {result.out} ({fmt}: {counts}; {len(result.files)} files)", soft_wrap=True)
    out.print(f"open_clip_train: {result.usage(fmt)}", soft_wrap=True, markup=False)
