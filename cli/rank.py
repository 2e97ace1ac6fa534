"""`curate rank`: the Vote-MI-style selection order of the slices to caption first."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import WorkdirOpt, fail, out
from .common import progress_bar as _progress


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
