"""`curate caption`: ranked slices -> rendered PNGs -> captions (cached) -> release manifest.

Slices are taken in ``selection_order`` (from `curate rank`); PNGs are rendered only for the
slices a run may use, in chunks, until ``budget`` uncached slices are in hand. The release
manifest (``manifests/v1.parquet``) is immutable: one row per captioned slice, self-contained
for training, with a subject-wise deterministic 7:1:2 split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from curation.fsutil import atomic_path
from curation.manifest import manifest_dir, read_manifest, write_manifest
from curation.render import render_slices

from .cache import CaptionCache
from .engine import CaptionRequest, CaptionSummary, lookup, run_captions

SPLITS = (("train", 0.7), ("val", 0.1), ("test", 0.2))
VOLUME_COLUMNS = [
    "dataset", "subset", "case_id", "channel", "channel_name", "modality", "body_region",
    "volume_path", "label_volume_path", "display_path", "grid_size",
]


@dataclass
class CaptionConfig:
    workdir: Path
    provider: str = "offline"
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    budget: int | None = None
    max_usd: float | None = None
    concurrency: int = 8
    rpm: float | None = None
    tpm: float | None = None
    mode: str = "sync"
    detail: str = "low"
    dry_run: bool = False
    retry_refused: bool = False
    all_slices: bool = False  # ignore selection_order: every slice, in slice order
    out: Path | None = None  # default manifests/v1.parquet
    size: int = 512
    timeout: float = 60.0
    batch_wait: bool = True
    chunk: int = 2048


@dataclass
class ReleaseResult:
    summary: CaptionSummary
    out: Path | None
    rows: int = 0
    refused: int = 0
    splits: dict[str, int] = field(default_factory=dict)


def assign_splits(case_ids: pd.Series) -> pd.Series:
    """Subject-wise, deterministic 7:1:2 split: cases sorted by a hash of their id, then cut.

    With at least three cases, val and test each get at least one case.
    """
    cases = sorted(set(case_ids), key=lambda c: hashlib.sha256(str(c).encode()).hexdigest())
    n = len(cases)
    n_val = max(1, round(n * 0.1)) if n >= 3 else 0
    n_test = max(1, round(n * 0.2)) if n >= 3 else 0
    n_train = n - n_val - n_test
    split = {c: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, c in enumerate(cases)}
    return case_ids.map(split)


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
    mdir = manifest_dir(workdir)
    if not (mdir / "slices.parquet").exists():
        raise FileNotFoundError(f"{mdir / 'slices.parquet'}: no slices yet (run `curate slice` first)")
    if not (mdir / "volumes.parquet").exists():
        raise FileNotFoundError(f"{mdir / 'volumes.parquet'}: missing (run `curate slice` again; it resumes)")
    slices = read_manifest(mdir / "slices.parquet")
    volumes = read_manifest(mdir / "volumes.parquet")
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


def next_release_path(workdir: Path) -> Path:
    from curation.query import release_manifests

    found = release_manifests(workdir)
    n = int(found[-1].stem[1:]) + 1 if found else 1
    return manifest_dir(workdir) / f"v{n}.parquet"


def run_release(
    cfg: CaptionConfig,
    progress: Callable[[str, int, int], None] | None = None,
    on_update: Callable[[CaptionSummary], None] | None = None,
) -> ReleaseResult:
    """Select, render, caption (within budget) and write the release manifest.

    ``progress(stage, done, total)`` reports rendering and captioning; ``on_update(summary)``
    gets the engine's live counts (cache hits, failures, tokens, USD) while captioning.
    """
    workdir = Path(cfg.workdir)
    out = Path(cfg.out) if cfg.out else manifest_dir(workdir) / "v1.parquet"
    if not out.is_absolute() and not str(out).startswith(str(workdir)):
        out = workdir / out
    if out.exists() and not cfg.dry_run:
        raise FileExistsError(
            f"{out} exists and release manifests are immutable; pass --out {next_release_path(workdir).relative_to(workdir)}"
        )
    cands, volumes = candidate_slices(workdir, cfg.all_slices)
    cache_dir = workdir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    db = CaptionCache(cache_dir / "captions.sqlite")
    look = dict(provider=cfg.provider, model=cfg.model, detail=cfg.detail)
    try:
        chosen: list[pd.DataFrame] = []
        uncached = 0
        # Render in selection order until the budget of uncached slices is reached.
        start = 0
        while start < len(cands):
            step = cfg.chunk if cfg.budget is None else min(cfg.chunk, max(64, 2 * (cfg.budget - uncached)))
            part = render_slices(workdir, cands.iloc[start : start + step], volumes, size=cfg.size)
            start += step
            reqs = _requests(part, workdir)
            hits = lookup(reqs, cache=db, **look)
            if cfg.budget is not None:
                keep = []
                for i, req in enumerate(reqs):
                    if req.slice_id in hits:
                        keep.append(i)
                    elif uncached < cfg.budget:
                        uncached += 1
                        keep.append(i)
                part = part.iloc[keep]
            else:
                uncached += sum(r.slice_id not in hits for r in reqs)
            chosen.append(part)
            if progress:
                progress("rendering", min(start, len(cands)), len(cands))
            if cfg.budget is not None and uncached >= cfg.budget:
                break
        selected = pd.concat(chosen, ignore_index=True) if chosen else cands.iloc[:0]
        reqs = _requests(selected, workdir)
        summary = run_captions(
            reqs,
            provider=cfg.provider,
            model=cfg.model,
            base_url=cfg.base_url,
            api_key=cfg.api_key,
            cache=db,
            budget=cfg.budget,
            max_usd=cfg.max_usd,
            concurrency=cfg.concurrency,
            rpm=cfg.rpm,
            tpm=cfg.tpm,
            mode=cfg.mode,
            detail=cfg.detail,
            dry_run=cfg.dry_run,
            retry_refused=cfg.retry_refused,
            progress=(lambda d, t: progress("captioning", d, t)) if progress else None,
            on_update=on_update,
            timeout=cfg.timeout,
            batch_wait=cfg.batch_wait,
        )
        _export_cache(db, cache_dir / "captions.parquet")
        if cfg.dry_run:
            return ReleaseResult(summary=summary, out=None)
        answers = lookup(reqs, cache=db, **look)
    finally:
        db.close()
    return _write_release(selected, answers, out, summary)


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
    write_manifest(rows, out, schema=None, extra_meta={"release": out.stem, "provider": summary.provider, "model": summary.model})
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
