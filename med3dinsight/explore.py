"""`curate query`, `curate stats`, `curate report`: look at what a workdir holds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from med3dinsight.common import WorkdirOpt, console, fail, out


def query_cmd(
    sql: str = typer.Argument(..., help='SQL over the views volumes, slices, captions, e.g. "SELECT plane, count(*) FROM slices GROUP BY 1"'),
    workdir: Path = WorkdirOpt,
    fmt: str = typer.Option("table", "--format", help="How the result is written: table (aligned text) | csv | json (one record per line) | parquet (needs --output)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the result to this file instead of printing it (needed for parquet)."),
) -> None:
    """Run SQL (DuckDB) over the Parquet manifests."""
    import duckdb

    from curation.store.query import format_frame, run_query

    try:
        df = run_query(workdir, sql)
        text = format_frame(df, fmt, output)
    except (duckdb.Error, ValueError) as exc:
        raise fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 2) from None
    if output is not None and fmt != "parquet":
        output.write_text(text)
        console.print(f"wrote {len(df)} rows to {output}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def report_cmd(
    workdir: Path = WorkdirOpt,
    size: int = typer.Option(256, "--size", help="Side in pixels of the slice thumbnails in the report."),
    max_volumes: Optional[int] = typer.Option(None, "--max-volumes", help="Only the first N volumes (by volume_id) get pages (default: all)."),
) -> None:
    """Write a static HTML gallery (reports/index.html): planes, chosen slices, captions, evaluation.

    Opens from the file system with no server and no network.
    """
    from curation.report.html import build_report

    try:
        index = build_report(workdir, size=size, max_volumes=max_volumes)
    except FileNotFoundError as exc:
        raise fail(str(exc), 2) from None
    except OSError as exc:  # an unreadable array (StoreError names it), a read-only workdir
        raise fail(str(exc) if not exc.filename else f"{exc.filename}: {exc.strerror}", 1) from None
    out.print(f"report: {index}")


def stats_cmd(workdir: Path = WorkdirOpt) -> None:
    """Counts per dataset/modality/plane, errors, and disk used."""
    import duckdb

    from curation.store.query import format_frame, stats

    try:
        result = stats(workdir)
    except (duckdb.Error, OSError) as exc:
        raise fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 2) from None
    for name, value in result.items():
        out.rule(name)
        if isinstance(value, dict):
            for k, v in value.items():
                out.print(f"{k:12s} {v / 1e6:10.1f} MB")
        else:
            out.print(format_frame(value, "table"))
