"""`curate slice` and `curate merge`: volumes -> preprocessed arrays + slice manifests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import WorkdirOpt, console, fail, out
from .common import progress_bar as _progress


def _parse_shard(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise typer.BadParameter("--shard takes i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def slice_cmd(
    dataset: str = typer.Option(..., "--dataset", help="3dseg8 | nifti | dicom | msd"),
    root: Path = typer.Option(..., "--root", help="Dataset root folder.", exists=True, file_okay=False),
    workdir: Path = WorkdirOpt,
    grid_size: int = typer.Option(128, "--grid-size", help="Cube grid of the training volume (paper: 128)."),
    spacing: float = typer.Option(1.0, "--spacing", help="Display-volume voxel size in mm."),
    min_foreground: float = typer.Option(0.01, "--min-foreground", help="Skip slices with less foreground than this fraction."),
    ct_window: str = typer.Option("-1000,1000", "--ct-window", help="HU window mapped to [0,1] for CT training volumes."),
    label_root: Optional[Path] = typer.Option(None, "--label-root", help="nifti: folder holding label files."),
    workers: int = typer.Option(1, "--workers", help="Worker processes."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: process only every n-th volume from i (then `curate merge`)."),
    render_all: bool = typer.Option(False, "--render-all", help="Render every slice PNG now (tens of GB on a full 3DSeg-8)."),
    render_size: int = typer.Option(512, "--render-size", help="PNG size in pixels."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any volume failed."),
    modality: Optional[str] = typer.Option(None, "--modality", help="Force the modality of every volume (CT, MR); default: dataset.json, DICOM header, known sub-datasets, then a guess."),
    body_region: Optional[str] = typer.Option(None, "--body-region", help="Force the body region (brain, head, chest, abdomen, pelvis, heart)."),
) -> None:
    """Load volumes, preprocess them (RAS, isotropic, [0,1], cube, grid^3) and index every slice.

    Writes volumes/<id>/ (volume.npy, label.npy, display.npy.zst) and manifests/volumes.parquet
    + manifests/slices.parquet. A rerun skips finished volumes. Bad files get one line each and
    a status=error row; the exit status is non-zero only when nothing succeeded (or --strict).
    """
    from curation.preprocess import PreprocessConfig
    from curation.slicing import SliceConfig, run_slice

    try:
        lo, hi = (float(v) for v in ct_window.split(","))
    except ValueError:
        raise typer.BadParameter("--ct-window takes LOW,HIGH in HU, e.g. -1000,1000") from None
    cfg = SliceConfig(
        workdir=workdir,
        pre=PreprocessConfig(grid_size=grid_size, spacing=spacing, ct_window=(lo, hi)),
        min_foreground=min_foreground,
        workers=workers,
        shard=_parse_shard(shard),
        render_all=render_all,
        render_size=render_size,
        strict=strict,
        modality=modality,
        body_region=body_region,
    )
    with _progress() as progress:
        task = progress.add_task("slicing", total=None, note="")

        def on_progress(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, note=name[-40:])

        try:
            summary = run_slice(dataset, root, cfg, label_root=label_root, on_progress=on_progress, log=progress.console.print)
        except (FileNotFoundError, ValueError) as exc:
            raise fail(str(exc), 2) from None
    table = Table(title="curate slice", show_header=False)
    table.add_row("processed", str(summary.processed))
    table.add_row("resumed (already done)", str(summary.skipped))
    table.add_row("errors", str(summary.errors))
    table.add_row("slices indexed", str(summary.slices))
    rate = summary.processed / summary.seconds if summary.seconds > 0 else 0.0
    table.add_row("time", f"{summary.seconds:.1f} s ({rate:.2f} volumes/s)")
    table.add_row("volumes manifest", str(summary.volumes_path))
    table.add_row("slices manifest", str(summary.slices_path))
    out.print(table)
    ok = summary.processed + summary.skipped
    if ok + summary.errors == 0:
        console.print(f"[red]error:[/red] {root}: no {dataset} volumes found (check --dataset and --root)")
    if ok == 0 or (strict and summary.errors):
        raise typer.Exit(1)


def merge_cmd(workdir: Path = WorkdirOpt) -> None:
    """Combine the shard manifests written by `curate slice --shard i/n` into the main manifests."""
    from curation.slicing import merge_shards

    try:
        vp, sp, nv, ns = merge_shards(workdir)
    except FileNotFoundError as exc:
        raise fail(str(exc), 2) from None
    out.print(f"merged {nv} volumes -> {vp}\nmerged {ns} slices -> {sp}")
