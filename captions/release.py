"""`curate caption`: ranked slices -> rendered PNGs -> captions (cached) -> release manifest.

Slices are taken in ``selection_order`` (from `curate rank`); ``--budget N`` keeps the first N
(``captions.budget`` says what counts) and PNGs are rendered only for those. The release
manifest (``manifests/v1.parquet``) is immutable: one row per captioned slice, self-contained for
training, with a subject-wise deterministic 7:1:2 split. When it exists already, a run that would
write exactly the same rows without a new request says so and succeeds; anything else needs a
new ``--out``, and is refused before anything is paid. A paying run holds the workdir's
``RunLock`` from planning to the release write, so two runs never pay for one slice twice.

The release is written only when the run is complete: while requests wait in batches
(``--no-wait``, ``--batch-token-limit``) or failed for this run (a timeout, a wait the server
asked for that is too long, a broken answer, a lost batch), nothing is written and the result
says why in one line, so the same command rerun ingests, asks again and then writes it.
Batches submitted earlier are always collected into the cache, even when ``out`` exists.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from captions.offline import context_extras
from curation.slicing.render import render_slices
from curation.store.fsutil import atomic_path
from curation.store.layout import Workdir
from curation.store.manifest import (
    RELEASE_SCHEMA,
    RELEASE_VOLUME_COLUMNS,
    next_release_path,
    read_manifest,
    write_manifest,
)
from curation.store.splits import case_splits

from .cache import CaptionCache
from .engine import collect_batches, lookup, run_captions
from .jobs import CaptionRequest
from .lock import RunLock
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
    unchanged: bool = False  # ``out`` already held exactly this release; nothing was written
    held: str | None = None  # why no release was written yet (rerun the same command), one line


def _context(row: dict[str, Any]) -> dict[str, Any]:
    """Coarse, PHI-free context only: never paths, ids or case names."""
    def text(key: str) -> str | None:
        value = row.get(key)
        return value if isinstance(value, str) and value else None  # NaN/None -> None

    labels = row.get("labels_present")
    ctx = {
        "modality": text("modality") or "unknown",
        "plane": row["plane"],
        "position": float(row["position"]),
        "body_region": text("body_region"),
        "labels_present": list(labels) if isinstance(labels, (list, tuple, np.ndarray)) else [],
        "dataset": text("subset") or text("dataset"),
    }
    # The label geometry, MR channel and body fraction the offline captioner grounds its text in.
    ctx.update({k: v for k, v in context_extras(row).items() if v is not None})
    return ctx


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
    # Slices rank left without an order (volumes with quality flags, unless --include-flagged)
    # are not bought.
    df = df[df["selection_order"].notna()]
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
    on_wait: Callable[[str], None] | None = None,
) -> ReleaseResult:
    """Select, render, caption (within the budget) and write the release manifest.

    Args:
        workdir: the workdir (``Workdir`` builds every path under it).
        options: the caption options, passed to the engine unchanged.
        progress: ``progress(stage, done, total)`` for rendering and captioning.
        on_update: ``on_update(summary)`` with the engine's live counts (cache hits, failures,
            tokens, USD) while captioning.
        on_wait: told (one line) that another run holds the workdir, before ``--wait`` waits.

    Raises:
        RunLocked: another run holds the workdir and ``options.wait`` is False.
        FileExistsError: ``out`` holds a different release (nothing was sent).
        CacheError: the caption cache is unusable (nothing was changed).
    """
    workdir = Path(workdir)
    wd = Workdir(workdir)
    out = Path(options.out) if options.out else wd.release(1)
    if not out.is_absolute() and not str(out).startswith(str(workdir)):
        out = workdir / out
    cands, volumes = candidate_slices(workdir, options.all_slices)
    # A case's split is a property of the subject, decided over every volume of the workdir
    # (identical scans under two cases share one), so `train finetune` sees the same split.
    splits = case_splits(read_manifest(wd.volumes_manifest))
    if options.budget is not None:
        cands = cands.iloc[: max(0, options.budget)]
    wd.cache.mkdir(parents=True, exist_ok=True)
    # One paying run per workdir; a dry run sends and writes nothing, so it needs no lock.
    lock = nullcontext() if options.dry_run else RunLock(
        wd.caption_lock, wait=options.wait, on_wait=on_wait)
    with lock:
        db = CaptionCache(wd.caption_db)
        try:
            selected = _render(wd, cands, volumes, options, progress)
            reqs = _requests(selected, workdir)
            if out.exists() and not options.dry_run:
                return _existing(out, selected, reqs, options, db, wd, splits)
            summary = run_captions(
                reqs, options, cache=db, batch_dir=wd.batches, on_update=on_update,
                progress=(lambda d, t: progress("captioning", d, t)) if progress else None,
            )
            if options.dry_run:  # holds no lock: reads only, never writes what a paying run owns
                return ReleaseResult(summary=summary, out=None)
            _export_cache(db, wd.caption_table)
            if (why := summary.incomplete) is not None:
                return ReleaseResult(summary=summary, out=None, held=(
                    f"{out.name} not written yet: {why}; rerun the same command to collect and ask "
                    "again, and it is written once complete"))
            answers = lookup(reqs, options, cache=db)
        finally:
            db.close()
        return _write_release(selected, answers, splits, out, summary)


def _existing(out: Path, selected: pd.DataFrame, reqs: list[CaptionRequest], options: CaptionOptions,
              db: CaptionCache, wd: Workdir, splits: dict[str, str]) -> ReleaseResult:
    """``out`` exists: succeed when it holds exactly what this run would write without a new
    request (the same command rerun), else refuse before anything is paid. Submitted batches
    are collected first: their answers were paid, whatever the release."""
    if options.mode == "batch" and not options.offline:
        collect_batches(options, cache=db, batch_dir=wd.batches)
    plan = run_captions(reqs, replace(options, dry_run=True), cache=db, batch_dir=wd.batches)
    rows = _release_rows(selected, lookup(reqs, options, cache=db), splits)
    old = read_manifest(out)
    same = (plan.to_send == 0 and plan.pending == 0 and rows is not None
            and all(_same(old, rows, c) for c in _IDENTITY))
    if not same:
        now = f"{len(old)} rows" + ("" if rows is None else f"; this run would hold {len(selected)} slices")
        ask = f", {plan.to_send} new requests" if plan.to_send else ""
        raise FileExistsError(
            f"{out} exists and holds a different release ({now}{ask}); release manifests are "
            f"immutable: pass --out {next_release_path(wd.root).relative_to(wd.root)}")
    return ReleaseResult(summary=plan, out=out, rows=len(old), refused=int(old["refused"].sum()),
                         splits=old["split"].value_counts().to_dict(), unchanged=True)


# What makes two releases the same release.
_IDENTITY = ("slice_id", "image_sha256", "caption", "refused", "caption_model", "prompt_version", "split")


def _same(a: pd.DataFrame, b: pd.DataFrame, column: str) -> bool:
    if column not in a.columns or column not in b.columns or len(a) != len(b):
        return False
    def norm(v: Any) -> Any:
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else v
    return [norm(v) for v in a[column].tolist()] == [norm(v) for v in b[column].tolist()]


def _render(wd: Workdir, cands: pd.DataFrame, volumes: pd.DataFrame, options: CaptionOptions,
            progress: Callable[[str, int, int], None] | None) -> pd.DataFrame:
    """Render the chosen slices in chunks (with progress); rows keep their order."""
    parts: list[pd.DataFrame] = []
    for start in range(0, len(cands), options.chunk):
        parts.append(render_slices(wd.root, cands.iloc[start : start + options.chunk], volumes, size=options.size))
        if progress:
            progress("rendering", min(start + options.chunk, len(cands)), len(cands))
    return pd.concat(parts, ignore_index=True) if parts else cands.iloc[:0]


def _release_rows(selected: pd.DataFrame, answers: dict[str, dict[str, Any]], splits: dict[str, str]) -> pd.DataFrame | None:
    """The release rows: the selected slices that have an answer, with caption columns and split."""
    rows = selected[selected["slice_id"].isin(answers)].copy()
    if rows.empty:
        return None
    refused = [bool(answers[s].get("refused")) for s in rows["slice_id"]]
    rows["refused"] = refused
    rows["caption"] = [None if r else answers[s].get("text") for s, r in zip(rows["slice_id"], refused)]
    rows["caption_model"] = [answers[s].get("model") for s in rows["slice_id"]]
    rows["prompt_version"] = [answers[s].get("prompt_version") for s in rows["slice_id"]]
    rows["caption_mode"] = [answers[s].get("mode") for s in rows["slice_id"]]
    rows["cost_usd"] = [answers[s].get("cost_usd") for s in rows["slice_id"]]
    rows["split"] = rows["case_id"].astype(str).map(splits)
    order = "selection_order" if rows["selection_order"].notna().all() else "slice_id"
    return rows.sort_values(order, ignore_index=True)


def _write_release(selected: pd.DataFrame, answers: dict[str, dict[str, Any]], splits: dict[str, str], out: Path,
                   summary: CaptionSummary) -> ReleaseResult:
    rows = _release_rows(selected, answers, splits)
    if rows is None:
        return ReleaseResult(summary=summary, out=None)
    write_manifest(rows, out, schema=RELEASE_SCHEMA, extra_meta={"release": out.stem, "provider": summary.provider, "model": summary.model})
    return ReleaseResult(
        summary=summary,
        out=out,
        rows=len(rows),
        refused=int(rows["refused"].sum()),
        splits=rows["split"].value_counts().to_dict(),
    )


def _export_cache(db: CaptionCache, path: Path) -> None:
    """A Parquet copy of the cache for `curate query` (view caption_cache)."""
    df = db.to_dataframe()
    if "params" in df.columns:
        df["params"] = df["params"].map(lambda v: v if isinstance(v, str) else str(v))
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
