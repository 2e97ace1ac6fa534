"""The `curate` command line: parses, prints, and calls plain functions."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(
    help="Curate 3D CT/MRI volumes into slice data: sample-data, slice, merge, rank, caption, query, stats, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

WorkdirOpt = typer.Option(Path("."), "--workdir", help="Where manifests/, volumes/, cache/ ... live.")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    )


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
    from .sample_data import make_sample_data

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
    from .preprocess import PreprocessConfig
    from .slicing import SliceConfig, run_slice

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
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
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
    from .slicing import merge_shards

    try:
        vp, sp, nv, ns = merge_shards(workdir)
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
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
    from .rank import RankConfig, run_rank

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
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
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


@app.command("caption")
def caption_cmd(
    workdir: Path = WorkdirOpt,
    provider: Optional[str] = typer.Option(None, "--provider", help="openai | offline (default: openai when OPENAI_API_KEY or --base-url is set, else offline)."),
    model: Optional[str] = typer.Option(None, "--model", help="Vision model (default gpt-4o; GPT-4V names accepted)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Any OpenAI-compatible server (vLLM, Ollama, Azure...)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="At most N new (uncached) requests."),
    max_usd: Optional[float] = typer.Option(None, "--max-usd", help="Stop before the estimated spend exceeds this."),
    concurrency: int = typer.Option(8, "--concurrency"),
    rpm: Optional[float] = typer.Option(None, "--rpm", help="Client-side requests per minute."),
    tpm: Optional[float] = typer.Option(None, "--tpm", help="Client-side tokens per minute."),
    mode: str = typer.Option("sync", "--mode", help="sync | batch (Batch API, 50% cheaper, up to 24 h)."),
    detail: str = typer.Option("low", "--detail", help="low | high image detail."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Counts, tokens and USD; no request is sent."),
    status: bool = typer.Option(False, "--status", help="Show pending batches and exit."),
    retry_refused: bool = typer.Option(False, "--retry-refused", help="Re-ask refused slices with the fallback prompt."),
    all_slices: bool = typer.Option(False, "--all", help="Every slice in slice order instead of the ranked order."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Release manifest to write (default manifests/v1.parquet; never overwritten)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Batch mode: submit/advance and return instead of polling."),
    timeout: float = typer.Option(60.0, "--timeout", help="Per-request timeout in seconds."),
) -> None:
    """Caption ranked slices with a vision-language model: cached, budgeted, resumable.

    The key comes from OPENAI_API_KEY only. Every answer is committed to cache/captions.sqlite
    as it arrives, so a rerun (or a run after kill -9) never pays twice for a slice. Writes the
    release manifest with a subject-wise 7:1:2 split.
    """
    import os

    from captions.batch import status as batch_status
    from captions.client import FatalAPIError
    from captions.release import CaptionConfig, run_release

    api_key = os.environ.get("OPENAI_API_KEY") or None
    if status:
        rows = batch_status(workdir / "cache" / "batches", api_key=api_key, base_url=base_url)
        if not rows:
            out.print("no pending batches")
        for r in rows:
            out.print(r)
        return
    provider = provider or ("openai" if (api_key or base_url) else "offline")
    cfg = CaptionConfig(
        workdir=workdir, provider=provider, model=model, base_url=base_url, api_key=api_key, budget=budget,
        max_usd=max_usd, concurrency=concurrency, rpm=rpm, tpm=tpm, mode=mode, detail=detail, dry_run=dry_run,
        retry_refused=retry_refused, all_slices=all_slices, out=out_path, timeout=timeout, batch_wait=not no_wait,
    )
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, note="")
            progress.update(tasks[stage], completed=done, total=total)

        def on_update(s) -> None:
            usd = "n/a" if s.usd_actual is None else f"${s.usd_actual:.4f}"
            note = (f"cached {s.cached} · ok {s.succeeded} · refused {s.refused} · failed {s.failed} · "
                    f"tokens {s.prompt_tokens}/{s.completion_tokens} · {usd}")
            if "captioning" in tasks:
                progress.update(tasks["captioning"], note=note)

        try:
            result = run_release(cfg, progress=on_progress, on_update=on_update)
        except (FileNotFoundError, FileExistsError, ValueError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
        except FatalAPIError as exc:
            console.print(f"[red]stopped:[/red] {exc}")
            raise typer.Exit(1)
    s = result.summary
    table = Table(title="curate caption" + (" (dry run)" if dry_run else ""), show_header=False)
    table.add_row("provider / model / mode", f"{s.provider} / {s.model} / {s.mode}")
    table.add_row("slices considered", str(s.total))
    table.add_row("cached (free)", str(s.cached))
    table.add_row("to send / over budget", f"{s.to_send} / {s.over_budget}")
    if not dry_run:
        table.add_row("sent / ok / refused / failed", f"{s.sent} / {s.succeeded} / {s.refused} / {s.failed}")
        table.add_row("tokens in / out (reported)", f"{s.prompt_tokens} / {s.completion_tokens}")
        table.add_row("USD (reported usage)", "n/a" if s.usd_actual is None else f"{s.usd_actual:.4f}")
    table.add_row("tokens in / out (estimated)", f"{s.est_prompt_tokens} / {s.est_completion_tokens}")
    table.add_row("USD (estimated)", "n/a (unpriced model)" if s.usd_estimated is None else f"{s.usd_estimated:.4f}")
    if s.pending:
        table.add_row("pending in batches", str(s.pending))
    if result.out:
        table.add_row("release manifest", f"{result.out} ({result.rows} rows, {result.refused} refused)")
        table.add_row("splits", ", ".join(f"{k} {v}" for k, v in sorted(result.splits.items())))
    out.print(table)
    if result.refused and not retry_refused:
        console.print(f"{result.refused} refused or empty answers are flagged, not used; "
                      "rerun with --retry-refused to re-ask them with the fallback prompt")
    for err in s.errors[:10]:
        console.print(f"error: {err}")
    if s.stopped:
        console.print(f"[yellow]stopped early:[/yellow] {s.stopped}")


@app.command("query")
def query_cmd(
    sql: str = typer.Argument(..., help='SQL over the views volumes, slices, captions, e.g. "SELECT plane, count(*) FROM slices GROUP BY 1"'),
    workdir: Path = WorkdirOpt,
    fmt: str = typer.Option("table", "--format", help="table | csv | json | parquet"),
    output: Optional[Path] = typer.Option(None, "--output", help="File to write (needed for parquet)."),
) -> None:
    """Run SQL (DuckDB) over the Parquet manifests."""
    import duckdb

    from .query import format_frame, run_query

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
    from .report import build_report

    try:
        index = build_report(workdir, size=size, max_volumes=max_volumes)
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    out.print(f"report: {index}")


@app.command("stats")
def stats_cmd(workdir: Path = WorkdirOpt) -> None:
    """Counts per dataset/modality/plane, errors, and disk used."""
    from .query import format_frame, stats

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
