"""The `curate` app: parses, prints, and calls plain functions of `curation` (and `captions`)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .caption import caption_cmd
from .common import WorkdirOpt, console, fail, new_app, out
from .common import progress_bar as _progress

app = new_app("Curate 3D CT/MRI volumes into slice data: sample-data, slice, merge, rank, caption, query, stats, report.")


def _parse_shard(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise typer.BadParameter("--shard takes i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


@app.command("sample-data")
def sample_data(
    out_dir: Path = typer.Option(Path("data/sample"), "--out", help="Folder to write the sample dataset into."),
    resolution: int = typer.Option(2, "--resolution", help="MNI152 template resolution in mm (1 or 2)."),
) -> None:
    """Build a small real dataset from volumes that installed packages ship (no download).

    nilearn's MNI152 T1 template with grey/white-matter masks as labels (an MSD task folder),
    nibabel's test MR volumes (MedicalNet-style images/ folder and list file) and DICOM from
    pydicom / pydicom-data. Use the 3dseg8/ folder with `--dataset 3dseg8` and dicom/ with
    `--dataset dicom`.
    """
    from curation.sample_data import make_sample_data

    roots = make_sample_data(out_dir, resolution=resolution)
    for name, root in roots.items():
        out.print(f"{name:8s} {root}")
    out.print(f"next: curate slice --dataset 3dseg8 --root {roots['3dseg8']}")


@app.command("slice")
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


@app.command("merge")
def merge_cmd(workdir: Path = WorkdirOpt) -> None:
    """Combine the shard manifests written by `curate slice --shard i/n` into the main manifests."""
    from curation.slicing import merge_shards

    try:
        vp, sp, nv, ns = merge_shards(workdir)
    except FileNotFoundError as exc:
        raise fail(str(exc), 2) from None
    out.print(f"merged {nv} volumes -> {vp}\nmerged {ns} slices -> {sp}")


@app.command("rank")
def rank_cmd(
    workdir: Path = WorkdirOpt,
    features: str = typer.Option("builtin", "--features", help="builtin (thumbnail + histogram, PCA) | clip (from `train embed`)."),
    k: Optional[int] = typer.Option(None, "--k", help="Neighbours each slice votes for (default: automatic per pool)."),
    dim: int = typer.Option(32, "--dim", help="PCA dimensions of the built-in descriptor."),
    dup_threshold: float = typer.Option(0.98, "--dup-threshold", help="Cosine similarity above which a slice counts as a near-duplicate."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers", help="Processes for the per-pool voting."),
    evaluate_: bool = typer.Option(False, "--evaluate", help="Report label and feature-space coverage vs random and central choice."),
) -> None:
    """Vote-MI-style selection of representative, diverse slices to caption first.

    Every slice votes for its nearest neighbours; greedy, cluster-balanced picks per (volume,
    plane); a global selection_order that covers every volume and plane first.
    Writes vote_score, vote_rank and selection_order into manifests/slices.parquet; `curate caption
    --budget N` spends its budget in that order. --evaluate also writes reports/rank_eval.json.
    """
    from curation.rank import RankConfig, run_rank

    cfg = RankConfig(workdir=workdir, features=features, k=k, dim=dim, dup_threshold=dup_threshold, seed=seed, evaluate=evaluate_, workers=workers)
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, note="")
            progress.update(tasks[stage], completed=done)

        try:
            summary = run_rank(cfg, progress=on_progress)
        except (FileNotFoundError, ValueError) as exc:
            raise fail(str(exc), 2) from None
    table = Table(title="curate rank", show_header=False)
    table.add_row("slices ranked", str(summary.slices))
    table.add_row("pools (volume x plane)", str(summary.pools))
    table.add_row("features", f"{features} ({summary.feature_seconds:.1f} s)")
    table.add_row("time", f"{summary.seconds:.1f} s")
    table.add_row("slices manifest", str(summary.slices_path))
    if summary.eval_path:
        table.add_row("evaluation", str(summary.eval_path))
    out.print(table)
    if summary.evaluation_table:
        out.print(summary.evaluation_table)


app.command("caption")(caption_cmd)


@app.command("query")
def query_cmd(
    sql: str = typer.Argument(..., help='SQL over the views volumes, slices, captions, e.g. "SELECT plane, count(*) FROM slices GROUP BY 1"'),
    workdir: Path = WorkdirOpt,
    fmt: str = typer.Option("table", "--format", help="table | csv | json | parquet"),
    output: Optional[Path] = typer.Option(None, "--output", help="File to write (needed for parquet)."),
) -> None:
    """Run SQL (DuckDB) over the Parquet manifests."""
    import duckdb

    from curation.query import format_frame, run_query

    try:
        df = run_query(workdir, sql)
        text = format_frame(df, fmt, output)
    except (duckdb.Error, ValueError) as exc:
        console.print(f"[red]error:[/red] {str(exc).splitlines()[0]}")
        raise typer.Exit(2)
    if output is not None and fmt != "parquet":
        output.write_text(text)
        console.print(f"wrote {len(df)} rows to {output}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


@app.command("report")
def report_cmd(
    workdir: Path = WorkdirOpt,
    size: int = typer.Option(256, "--size", help="Thumbnail PNG size in pixels."),
    max_volumes: Optional[int] = typer.Option(None, "--max-volumes", help="Only the first N volumes get pages."),
) -> None:
    """Write a static HTML gallery (reports/index.html): planes, chosen slices, captions, evaluation.

    Opens from the file system with no server and no network.
    """
    from curation.report import build_report

    try:
        index = build_report(workdir, size=size, max_volumes=max_volumes)
    except FileNotFoundError as exc:
        raise fail(str(exc), 2) from None
    out.print(f"report: {index}")


@app.command("stats")
def stats_cmd(workdir: Path = WorkdirOpt) -> None:
    """Counts per dataset/modality/plane, errors, and disk used."""
    from curation.query import format_frame, stats

    result = stats(workdir)
    for name, value in result.items():
        out.rule(name)
        if isinstance(value, dict):
            for k, v in value.items():
                out.print(f"{k:12s} {v / 1e6:10.1f} MB")
        else:
            out.print(format_frame(value, "table"))


if __name__ == "__main__":  # pragma: no cover
    app()
