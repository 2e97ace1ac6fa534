"""`curate rank`: the Vote-MI-style selection order of the slices to caption first."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from curation.ranking.config import RankConfig as R
from med3dinsight.common import WorkdirOpt, fail, option, out
from med3dinsight.common import progress_bar as _progress
from training.loop.errors import TrainingError


def rank_cmd(
    workdir: Path = WorkdirOpt,
    features: str = option(R, "features", "--features", help="builtin (thumbnail + histogram, PCA) | clip (frozen-CLIP image embeddings; renders and embeds what is missing)."),
    k: Optional[int] = option(R, "k", "--k", help="Neighbours each slice votes for (default: automatic per pool)."),
    dim: int = option(R, "dim", "--dim", help="PCA dimensions of the built-in descriptor (--features builtin)."),
    dup_threshold: float = option(R, "dup_threshold", "--dup-threshold", help="Cosine similarity above which a slice counts as a near-duplicate."),
    seed: int = option(R, "seed", "--seed", help="Seed of the PCA subsample and the k-means clusters; the same seed and data give the same order."),
    workers: int = option(R, "workers", "--workers", help="Processes for the per-pool voting (1: in this process)."),
    evaluate_: bool = option(R, "evaluate", "--evaluate", help="Report labelled-slice hit rate, label and feature-space coverage of the voter vs random over the slices it could pick (and over all), and the central slice, with subject-bootstrap 95% intervals of the differences."),
    stratify: Optional[str] = option(R, "stratify", "--stratify", help="labels: every label class present in a (volume, plane) gets one of the first picks."),
    atypicality_weight: float = option(R, "atypicality_weight", "--atypicality-weight", help="Weight of the population prior (unlike the same position in other volumes) added to the votes; 0 = plain vote-k."),
    min_relative_foreground: float = option(R, "min_relative_foreground", "--min-relative-foreground", help="Defer slices whose body fraction is under this fraction of their pool's largest."),
    edge_margin: float = option(R, "edge_margin", "--edge-margin", help="Defer slices in this outer fraction of a pool's extent."),
    body_mask: bool = option(R, "body_mask", "--body-mask/--no-body-mask", help="Descriptor sees the body only (no CT table, no air)."),
    query: Optional[str] = option(R, "query", "--query", help="Text-guided ranking: order each (volume, plane) by the slices' image-text similarity to TEXT (frozen CLIP)."),
    query_weight: Optional[float] = typer.Option(None, "--query-weight", help="With --query, in [0, 1]: 1 = similarity alone (default), 0 < W < 1 mixes (1-W) x votes + W x similarity percentile."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="CLIP checkpoint for --features clip / --query (default: checkpoints/clip/final.pt)."),
    render_size: int = typer.Option(512, "--render-size", help="PNG size in pixels of the slices rendered for CLIP (512 shares `curate caption`'s PNGs)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per CLIP forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="Device for CLIP: cpu | cuda | cuda:N (default: CUDA when available)."),
    include_flagged: bool = option(R, "include_flagged", "--include-flagged", help="Also rank volumes with quality flags (too few voxels, statistical map, constant or empty intensity; see quality_flags in manifests/volumes.parquet). By default their slices stay unranked, so `curate caption` leaves them out."),
) -> None:
    """Vote-MI-style selection of representative, diverse slices to caption first.

    Every slice votes for its nearest neighbours; greedy, cluster-balanced picks per (volume,
    plane); near-empty and edge slices (by the body mask: no CT table, no air) go last;
    a global selection_order that covers every volume and plane first.
    --features clip and --query render and embed (frozen CLIP, --clip) only the slices that
    cache/png and the embedding store lack, and store the new embeddings for the next run.
    Writes vote_score, vote_rank and selection_order into manifests/slices.parquet; `curate caption
    --budget N` spends its budget in that order. --evaluate also writes reports/rank_eval.json.
    Volumes with quality flags (manifests/volumes.parquet) stay unranked unless --include-flagged.
    """
    from curation.ranking.rank import RankConfig, run_rank

    if query_weight is not None and query is None:
        raise fail("--query-weight needs --query TEXT", 2)
    cfg = RankConfig(
        workdir=workdir, features=features, k=k, dim=dim, dup_threshold=dup_threshold, seed=seed, evaluate=evaluate_,
        workers=workers, stratify=stratify, atypicality_weight=atypicality_weight,
        min_relative_foreground=min_relative_foreground, edge_margin=edge_margin, body_mask=body_mask,
        query=query, include_flagged=include_flagged, **({} if query_weight is None else {"query_weight": query_weight}),
    )
    needs_clip = features == "clip" or (query is not None and cfg.query_weight > 0)
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, note="")
            progress.update(tasks[stage], completed=done)

        embedder = None
        try:
            if needs_clip:
                embedder = _clip_features(workdir, clip, render_size, batch_size, device, on_progress)
            if embedder is not None:
                embedder.clip  # load (or refuse) the checkpoint before the slow parts
            summary = run_rank(
                cfg,
                progress=on_progress,
                clip_features=embedder.image_embeddings if embedder and features == "clip" else None,
                query_scores=embedder.query_scores(query) if embedder and query is not None else None,
            )
        except (FileNotFoundError, ValueError, OSError, TrainingError) as exc:  # OSError: a display volume, a PNG
            raise fail(str(exc), 2) from None
    table = Table(title="curate rank", show_header=False)
    table.add_row("slices ranked", str(summary.slices))
    table.add_row("pools (volume x plane)", str(summary.pools))
    table.add_row("features", f"{features} ({summary.feature_seconds:.1f} s)")
    if embedder is not None:
        st = embedder.stats
        table.add_row("CLIP", f"{st.model} ({st.fingerprint})")
        table.add_row("PNGs rendered / reused", f"{st.pngs_rendered} / {st.pngs_reused}")
        table.add_row("image embeddings computed / reused", f"{st.images_computed} / {st.images_reused}")
    if query is not None:
        table.add_row("query", f"text-guided, weight {cfg.query_weight:g}")
    table.add_row("deferred (near-empty, edge)", str(summary.extra.get("deferred", 0)))
    n_flagged = summary.extra.get("flagged_volumes", 0)
    if n_flagged:
        what = "ranked (--include-flagged)" if include_flagged else f"left out, {summary.extra.get('flagged_slices', 0)} slices unranked (--include-flagged keeps them)"
        table.add_row("volumes with quality flags", f"{n_flagged}: {what}")
    table.add_row("time", f"{summary.seconds:.1f} s")
    table.add_row("slices manifest", str(summary.slices_path))
    if summary.eval_path:
        table.add_row("evaluation", str(summary.eval_path))
    out.print(table)
    if summary.evaluation_table:
        out.print(summary.evaluation_table)


def _clip_features(workdir: Path, clip: Path | None, render_size: int, batch_size: int, device: str | None, progress):
    """The frozen-CLIP feature source; one line and exit 2 when the checkpoint is missing."""
    from curation.store.layout import Workdir

    if clip is None:
        ckpt = Workdir(workdir).clip_checkpoints / "final.pt"
    else:
        ckpt = clip if clip.is_absolute() or clip.exists() else workdir / clip
    if not ckpt.is_file():
        raise fail(f"{ckpt}: no such CLIP checkpoint (run `train clip` first, or pass --clip CKPT)", 2)
    if render_size < 16:
        raise fail(f"--render-size must be at least 16 pixels, not {render_size}", 2)
    from training.clip.rank_features import ClipRankFeatures

    return ClipRankFeatures(workdir, ckpt, device=device, batch_size=batch_size, render_size=render_size, progress=progress)
