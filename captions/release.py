"""`curate caption`: ranked slices -> rendered PNGs -> captions (cached) -> release manifest.

Slices are taken in ``selection_order`` (from `curate rank`); PNGs are rendered only for the
slices a run may use, in chunks, until the run's ``Budget`` is full (``captions.budget`` says
what counts). The release manifest (``manifests/v1.parquet``) is immutable: one row per
captioned slice, self-contained for training, with a subject-wise deterministic 7:1:2 split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from curation.fsutil import atomic_path
from curation.layout import Workdir
from curation.splits import assign_splits
from curation.manifest import RELEASE_SCHEMA, RELEASE_VOLUME_COLUMNS, next_release_path, read_manifest, write_manifest
from curation.render import render_slices

from .budget import Budget
from .cache import CaptionCache
from .engine import lookup, run_captions
from .jobs import CaptionRequest
from .options import CaptionOptions
from .plan import CaptionSummary

VOLUME_COLUMNS = list(RELEASE_VOLUME_COLUMNS)


@dataclass
class ReleaseResult:
    summary: CaptionSummary
    out: Path | None
    rows: int = 0
    refused: int = 0
    splits: dict[str, int] = field(default_factory=dict)


def _context(row: dict[str, Any]) -> dict[str, Any]:
    """Coarse, PHI-free context only: never paths, ids or case names."""
    def text(key: str) -> str | None:
        value = row.get(key)
        return value if isinstance(value, str) and value else None  # NaN/None -> None

    labels = row.get("labels_present")
    return {
        "modality": text("modality") or "unknown",
        "plane": row["plane"],
        "position": float(row["position"]),
        "body_region": text("body_region"),
        "labels_present": list(labels) if isinstance(labels, (list, tuple, np.ndarray)) else [],
        "dataset": text("subset") or text("dataset"),
    }


def candidate_slices(workdir: Path, all_slices: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Slices of ok volumes joined with their volume columns, in the order captions are bought,
    and the ok volumes themselves (for rendering)."""
    wd = Workdir(workdir)
    if not wd.slices_manifest.exists():
        raise FileNotFoundError(f"{wd.slices_manifest}: no slices yet (run `curate slice` first)")
    if not wd.volumes_manifest.exists():
        raise FileNotFoundError(f"{wd.volumes_manifest}: missing (run `curate slice` again; it resumes)")
    slices = read_manifest(wd.slices_manifest)
    volumes = read_manifest(wd.volumes_manifest)
    volumes = volumes[volumes["status"] == "ok"]
    df = slices.drop(columns=[c for c in VOLUME_COLUMNS if c in slices.columns]).merge(
        volumes[["volume_id", *VOLUME_COLUMNS]], on="volume_id", how="inner"
    )
    if all_slices:
        return df.sort_values(["volume_id", "plane_index", "index"], ignore_index=True), volumes
    if df["selection_order"].isna().all():
        raise ValueError("slices are not ranked yet: run `curate rank` first (or pass --all)")
    return df.sort_values("selection_order", ignore_index=True), volumes


def _requests(df: pd.DataFrame, workdir: Path) -> list[CaptionRequest]:
    return [
        CaptionRequest(
            slice_id=r["slice_id"],
            image_path=Path(workdir) / r["image_path"],
            image_sha256=r["image_sha256"],
            context=_context(r),
        )
        for r in df.to_dict("records")
    ]


def run_release(
    workdir: str | Path,
    options: CaptionOptions,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    on_update: Callable[[CaptionSummary], None] | None = None,
) -> ReleaseResult:
    """Select, render, caption (within the budget) and write the release manifest.

    Args:
        workdir: the workdir (``Workdir`` builds every path under it).
        options: the caption options, passed to the engine unchanged.
        progress: ``progress(stage, done, total)`` for rendering and captioning.
        on_update: ``on_update(summary)`` with the engine's live counts (cache hits, failures,
            tokens, USD) while captioning.
    """
    workdir = Path(workdir)
    wd = Workdir(workdir)
    out = Path(options.out) if options.out else wd.release(1)
    if not out.is_absolute() and not str(out).startswith(str(workdir)):
        out = workdir / out
    if out.exists() and not options.dry_run:
        raise FileExistsError(
            f"{out} exists and release manifests are immutable; pass --out {next_release_path(workdir).relative_to(workdir)}"
        )
    cands, volumes = candidate_slices(workdir, options.all_slices)
    wd.cache.mkdir(parents=True, exist_ok=True)
    db = CaptionCache(wd.caption_db)
    try:
        selected = _select(wd, cands, volumes, options, db, progress)
        reqs = _requests(selected, workdir)
        summary = run_captions(
            reqs, options, cache=db, batch_dir=wd.batches, on_update=on_update,
            progress=(lambda d, t: progress("captioning", d, t)) if progress else None,
        )
        _export_cache(db, wd.caption_table)
        if options.dry_run:
            return ReleaseResult(summary=summary, out=None)
        answers = lookup(reqs, options, cache=db)
    finally:
        db.close()
    return _write_release(selected, answers, out, summary)


def _select(wd: Workdir, cands: pd.DataFrame, volumes: pd.DataFrame, options: CaptionOptions,
            db: CaptionCache, progress: Callable[[str, int, int], None] | None) -> pd.DataFrame:
    """The slices the release may hold, in order: render a chunk, offer each of its slices to
    the budget (a cached one is free), and stop once the budget is full."""
    budget = Budget.of(options)
    chosen: list[pd.DataFrame] = []
    start = 0
    while start < len(cands):
        left = budget.left
        step = options.chunk if left is None else min(options.chunk, max(64, 2 * left))
        part = render_slices(wd.root, cands.iloc[start : start + step], volumes, size=options.size)
        start += step
        reqs = _requests(part, wd.root)
        hits = lookup(reqs, options, cache=db)
        chosen.append(part.iloc[[i for i, req in enumerate(reqs) if budget.take(free=req.slice_id in hits)]])
        if progress:
            progress("rendering", min(start, len(cands)), len(cands))
        if budget.full:
            break
    return pd.concat(chosen, ignore_index=True) if chosen else cands.iloc[:0]


def _write_release(selected: pd.DataFrame, answers: dict[str, dict[str, Any]], out: Path, summary: CaptionSummary) -> ReleaseResult:
    rows = selected[selected["slice_id"].isin(answers)].copy()
    if rows.empty:
        return ReleaseResult(summary=summary, out=None)
    refused = [bool(answers[s].get("refused")) for s in rows["slice_id"]]
    rows["refused"] = refused
    rows["caption"] = [None if r else answers[s].get("text") for s, r in zip(rows["slice_id"], refused)]
    rows["caption_model"] = [answers[s].get("model") for s in rows["slice_id"]]
    rows["prompt_version"] = [answers[s].get("prompt_version") for s in rows["slice_id"]]
    rows["caption_mode"] = [answers[s].get("mode") for s in rows["slice_id"]]
    rows["cost_usd"] = [answers[s].get("cost_usd") for s in rows["slice_id"]]
    rows["split"] = assign_splits(rows["case_id"])
    rows = rows.sort_values("selection_order" if rows["selection_order"].notna().all() else "slice_id", ignore_index=True)
    write_manifest(rows, out, schema=RELEASE_SCHEMA, extra_meta={"release": out.stem, "provider": summary.provider, "model": summary.model})
    return ReleaseResult(
        summary=summary,
        out=out,
        rows=len(rows),
        refused=int(np.sum(refused)),
        splits=rows["split"].value_counts().to_dict(),
    )


def _export_cache(db: CaptionCache, path: Path) -> None:
    """A Parquet copy of the cache for `curate query` (view caption_cache)."""
    df = db.to_dataframe()
    if "params" in df.columns:
        df["params"] = df["params"].map(lambda v: v if isinstance(v, str) else str(v))
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
