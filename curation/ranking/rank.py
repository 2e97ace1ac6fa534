"""`curate rank`: features per slice -> Vote-MI-style voter (+ informativeness) -> ranks in slices.parquet.

The order per (volume, plane): near-empty and edge slices deferred (``defer_mask``); vote-k
representativeness plus ``atypicality_weight`` x the population prior (``informativeness``);
``--stratify labels`` then gives every label class an early pick.

Text-guided (``--query``, in the spirit of Med-2E3's text-guided slice scoring): the caller
supplies each slice's image-text similarity; ``query_weight`` W sets how it enters a pool's
order. W = 1 ranks each pool by similarity alone (deferred slices still last); 0 < W < 1 runs
vote-k's greedy on ``(1 - W) * (representativeness + a * atypicality) + W * q``, with q the
slice's similarity percentile within its pool (``query_prior``), so vote-k's balance and
near-duplicate rules still hold; W = 0 ignores the query. Either way the global order
round-robins volumes and planes as without a query.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from curation.ranking.config import RankConfig
from curation.ranking.evaluate import evaluate, format_table
from curation.ranking.features import builtin_features, reduce_features
from curation.ranking.informativeness import defer_mask, population_atypicality, prior_from_scores
from curation.ranking.order import cumcount
from curation.ranking.stratify import stratify_ranks
from curation.ranking.vote import global_selection_order, rank_pools
from curation.slicing.body_mask import body_mask
from curation.slicing.quality import has_flags
from curation.store.embed_store import latest_fingerprint, read_table
from curation.store.fsutil import atomic_write_text
from curation.store.layout import Workdir
from curation.store.manifest import PLANE_AXIS, SLICES_SCHEMA, read_manifest, write_manifest
from curation.store.volume_store import load_npy

THUMB = 16  # the built-in descriptor's thumbnail side (its first THUMB**2 values)


@dataclass
class RankSummary:
    slices: int = 0
    pools: int = 0
    seconds: float = 0.0
    feature_seconds: float = 0.0
    evaluation: dict[str, Any] | None = None
    evaluation_table: str = ""
    slices_path: Path | None = None
    eval_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def builtin_slice_features(
    workdir: Path,
    volumes: pd.DataFrame,
    slices: pd.DataFrame,
    progress: Callable[[int], None] | None = None,
    mask_body: bool = True,
    level: float = 0.05,
) -> np.ndarray:
    """The cheap descriptor of every slice row, read from the memory-mapped training volumes.

    With ``mask_body`` what lies outside the volume's body mask (CT table, air, background
    noise) is zeroed first, so the descriptor describes the patient.
    """
    feats: np.ndarray | None = None
    vol_path = dict(zip(volumes["volume_id"], volumes["volume_path"]))
    positions = slices.groupby("volume_id", sort=True).indices
    for done, (vid, rows) in enumerate(positions.items()):
        vol = load_npy(Path(workdir) / vol_path[vid])
        if mask_body:
            vol = np.where(body_mask(vol, level, stride=2), vol, np.zeros((), dtype=vol.dtype))
        planes = slices["plane"].to_numpy()[rows]
        idx = slices["index"].to_numpy()[rows]
        batch = np.stack([np.take(vol, int(i), axis=PLANE_AXIS[p]) for p, i in zip(planes, idx)])
        f = builtin_features(batch)
        if feats is None:
            feats = np.zeros((len(slices), f.shape[1]), dtype=np.float32)
        feats[rows] = f
        if progress:
            progress(done + 1)
    return feats if feats is not None else np.zeros((0, 1), dtype=np.float32)


def clip_slice_features(workdir: Path, slices: pd.DataFrame, fingerprint: str | None) -> np.ndarray:
    """CLIP image embeddings from `train embed`'s cache, keyed by the slice PNG's sha256."""
    fingerprint = fingerprint or latest_fingerprint(workdir)
    table = read_table(workdir, fingerprint, "image")
    keys = slices["image_sha256"].tolist() if "image_sha256" in slices else [None] * len(slices)
    missing = sum(k is None or k not in table for k in keys)
    if missing:
        raise ValueError(
            f"{missing} of {len(slices)} slices have no CLIP embedding in embeddings/{fingerprint} "
            "(render and embed every slice first, or use --features builtin)"
        )
    return np.stack([table[k] for k in keys]).astype(np.float32)


SliceFn = Callable[[pd.DataFrame], np.ndarray]


def flagged_volume_ids(volumes: pd.DataFrame) -> list[str]:
    """Volumes whose ``quality_flags`` hold a flag (none in manifests written before the column)."""
    if "quality_flags" not in volumes.columns:
        return []
    return sorted(volumes.loc[[has_flags(v) for v in volumes["quality_flags"]], "volume_id"].astype(str))


def _hold_flagged(slices: pd.DataFrame, volumes: pd.DataFrame, include: bool) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(slices to rank, slices of flagged volumes kept unranked, flagged volume ids)."""
    flagged = flagged_volume_ids(volumes)
    if include or not flagged:
        return slices, slices.iloc[:0], flagged
    out = slices["volume_id"].isin(flagged)
    return slices[~out].reset_index(drop=True), slices[out].reset_index(drop=True), flagged


def _with_held(ranked: pd.DataFrame, held: pd.DataFrame) -> pd.DataFrame:
    """The ranked rows plus the flagged volumes' rows with empty rank columns (no selection
    order: `curate caption` never reaches them), in manifest order."""
    if held.empty:
        return ranked
    held = held.copy()
    for col in ("vote_score", "vote_rank", "selection_order"):
        held[col] = np.nan
    both = pd.concat([ranked, held[[c for c in ranked.columns if c in held.columns]]], ignore_index=True)
    return both.sort_values(["volume_id", "plane_index", "index"], ignore_index=True)


def _cohorts(volumes: pd.DataFrame, slices: pd.DataFrame) -> np.ndarray:
    """Per slice row: dataset|modality|channel of its volume (the population it is compared with)."""
    v = volumes.set_index("volume_id")
    key = pd.Series("", index=v.index, dtype=object)
    for col in ("dataset", "modality", "channel"):
        if col in v.columns:
            key = key + "|" + v[col].astype(str)
    return key.reindex(slices["volume_id"]).fillna("").to_numpy()


def informativeness_prior(
    thumbs: np.ndarray, slices: pd.DataFrame, cohort: np.ndarray
) -> np.ndarray:
    """The population prior in [0, 1] per slice (0 where a cohort has too few volumes)."""
    scores = population_atypicality(thumbs, slices, cohort)
    return prior_from_scores(scores, np.char.add(cohort.astype(str), slices["plane"].to_numpy().astype(str)))


def query_prior(scores: np.ndarray, slices: pd.DataFrame) -> np.ndarray:
    """Per slice, its similarity's percentile within its (volume, plane) pool: 0 worst, 1 best.

    Rank-based, so the raw cosine's scale (narrow for CLIP) does not matter and W means the
    same in every pool; ties share their mean rank; NaN counts as the worst.
    """
    s = pd.Series(np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf))
    groups = s.groupby([slices["volume_id"].to_numpy(), slices["plane"].to_numpy()])
    rank = groups.rank(method="average").to_numpy()
    size = groups.transform("size").to_numpy()
    return np.where(size > 1, (rank - 1.0) / np.maximum(size - 1, 1), 1.0)


def mixed_prior(
    atypicality: np.ndarray | None, atypicality_weight: float, query: np.ndarray | None, query_weight: float
) -> tuple[np.ndarray | None, float]:
    """(prior in [0, 1], weight) for ``vote_k``, whose greedy then maximises
    ``(1 - W) * (repr + A) + W * q``, i.e. ``repr + A + W / (1 - W) * q``, where
    ``A = min(1, a * atypicality)`` (the atypicality bonus as without a query).

    ``vote_k`` clips its prior to [0, 1], so the sum is divided by its largest possible value
    and that value becomes the weight. W must be < 1 here (W = 1 is ``similarity_ranks``).
    """
    terms = []
    if atypicality is not None and atypicality_weight > 0:
        terms.append((1.0, np.clip(atypicality_weight * np.nan_to_num(np.asarray(atypicality, dtype=np.float64)), 0, 1)))
    if query is not None and query_weight > 0:
        terms.append((query_weight / (1.0 - query_weight), np.clip(np.asarray(query, dtype=np.float64), 0, 1)))
    if not terms:
        return None, 0.0
    weight = sum(w for w, _ in terms)
    prior = sum(w * p for w, p in terms) / weight
    return prior, float(weight)


def similarity_ranks(slices: pd.DataFrame, scores: np.ndarray, defer: np.ndarray) -> pd.DataFrame:
    """W = 1: per (volume, plane) pool, vote_rank by descending similarity (deferred slices
    after the others; ties by index); vote_score is the similarity. Returns a copy."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    pool = slices.groupby(["volume_id", "plane"], sort=True).ngroup().to_numpy()
    o = np.lexsort((slices["index"].to_numpy(), -s, np.asarray(defer, dtype=bool), pool))
    rank = np.empty(len(s), dtype=np.int64)
    rank[o] = cumcount(pool[o])
    out = slices.copy()
    out["vote_score"] = s
    out["vote_rank"] = rank.astype(np.int32)
    return out


def run_rank(
    cfg: RankConfig,
    progress: Callable[[str, int, int], None] | None = None,
    clip_features: SliceFn | None = None,
    query_scores: SliceFn | None = None,
) -> RankSummary:
    """Rank every slice of every ok volume; rewrite slices.parquet with the vote columns.

    ``clip_features(slices)`` (for ``--features clip``) and ``query_scores(slices)`` (for
    ``--query``: image-text cosine similarity; only its order within a pool matters) are
    supplied by a higher layer that can run CLIP (``training.clip.rank_features``); each returns an
    array aligned with the rows of the frame it is given. Without ``clip_features``,
    ``--features clip`` reads the embedding store and needs every slice embedded. How
    ``cfg.query_weight`` uses the scores: the module docstring.
    """
    t0 = time.perf_counter()
    wd = Workdir(cfg.workdir)
    workdir = wd.root
    if not wd.slices_manifest.exists():
        raise FileNotFoundError(f"{wd.slices_manifest}: no slices yet (run `curate slice` first)")
    if cfg.features not in ("builtin", "clip"):
        raise ValueError(f"unknown --features {cfg.features!r}; choose builtin or clip")
    if cfg.stratify not in (None, "labels"):
        raise ValueError(f"unknown --stratify {cfg.stratify!r}; choose labels")
    if not 0.0 <= cfg.query_weight <= 1.0:
        raise ValueError(f"--query-weight {cfg.query_weight} is outside [0, 1] (1: similarity alone, 0: votes alone)")
    if cfg.query is not None and not cfg.query.strip():
        raise ValueError("--query is empty; give the text to rank the slices by")
    use_query = query_scores is not None and cfg.query_weight > 0
    slices = read_manifest(wd.slices_manifest)
    volumes = read_manifest(wd.volumes_manifest)
    volumes = volumes[volumes["status"] == "ok"]
    slices = slices[slices["volume_id"].isin(volumes["volume_id"])].reset_index(drop=True)
    slices, held, flagged = _hold_flagged(slices, volumes, cfg.include_flagged)
    summary = RankSummary(slices=len(slices))
    summary.extra.update(flagged_volumes=len(flagged), flagged_slices=len(held))
    if slices.empty and len(held):
        raise ValueError(f"no slices to rank: all {len(flagged)} volume(s) with slices have quality flags "
                         "(see quality_flags in manifests/volumes.parquet); pass --include-flagged to rank them anyway")
    if slices.empty:
        raise ValueError("no slices to rank (every volume failed or was empty)")
    n_vol = slices["volume_id"].nunique()
    raw = builtin_slice_features(
        workdir, volumes, slices, progress=(lambda d: progress("features", d, n_vol)) if progress else None,
        mask_body=cfg.body_mask, level=cfg.level,
    )
    thumbs = raw[:, : THUMB * THUMB] * THUMB  # block means in intensity units
    if cfg.features == "clip":
        feats = clip_features(slices) if clip_features else clip_slice_features(workdir, slices, cfg.embeddings)
    else:
        feats = reduce_features(raw, dim=cfg.dim, seed=cfg.seed)
    summary.feature_seconds = time.perf_counter() - t0
    defer = defer_mask(slices, cfg.min_relative_foreground, cfg.edge_margin)
    atyp = None
    if cfg.atypicality_weight > 0:
        atyp = informativeness_prior(thumbs, slices, _cohorts(volumes, slices))
    summary.extra["deferred"] = int(defer.sum())
    n_pools = slices.groupby(["volume_id", "plane"]).ngroups
    summary.pools = n_pools
    sims = np.asarray(query_scores(slices), dtype=np.float64) if use_query else None
    if sims is not None and len(sims) != len(slices):
        raise ValueError(f"query scores have {len(sims)} rows, slices {len(slices)}")
    if sims is not None and cfg.query_weight >= 1.0:
        ranked = similarity_ranks(slices, sims, defer)
        ranked["selection_order"] = global_selection_order(
            ranked, "vote_score", "vote_rank", feats, dup_threshold=cfg.dup_threshold, deferred=defer
        )
        if progress:
            progress("voting", n_pools, n_pools)
    else:
        prior, weight = mixed_prior(
            atyp, cfg.atypicality_weight, None if sims is None else query_prior(sims, slices), cfg.query_weight
        )
        ranked = rank_pools(
            slices,
            feats,
            cfg.k,
            dup_threshold=cfg.dup_threshold,
            seed=cfg.seed,
            workers=cfg.workers,
            progress=(lambda d: progress("voting", d, n_pools)) if progress else None,
            prior=prior,
            prior_weight=weight,
            defer=defer,
        )
    if cfg.stratify == "labels":
        ranked["vote_rank"] = stratify_ranks(ranked, defer).astype(np.int32)
        ranked["selection_order"] = global_selection_order(
            ranked, "vote_score", "vote_rank", feats, dup_threshold=cfg.dup_threshold, deferred=defer
        )
    ranked["_row"] = np.arange(len(ranked))
    ranked = ranked.sort_values(["volume_id", "plane_index", "index"], ignore_index=True)
    rows = ranked.pop("_row").to_numpy()
    summary.slices_path = write_manifest(
        _with_held(ranked, held),
        wd.slices_manifest,
        SLICES_SCHEMA,
        {
            "rank_features": cfg.features,
            "rank_k": cfg.k if cfg.k is not None else "auto",
            "rank_seed": cfg.seed,
            "rank_atypicality_weight": cfg.atypicality_weight,
            "rank_stratify": cfg.stratify or "none",
            "rank_query": "yes" if use_query else "no",  # the text itself may be sensitive
            "rank_query_weight": cfg.query_weight,
            "rank_body_mask": cfg.body_mask,
            "rank_include_flagged": cfg.include_flagged,
            "rank_flagged_volumes": len(flagged),
        },
    )
    if cfg.evaluate:
        # coverage in a space the voter did not optimise: raw thumbnails (builtin used their
        # PCA with the histogram; clip used embeddings)
        # random baselines drawn from what the voter could pick (not deferred), bootstrap by subject
        case_of = dict(zip(volumes["volume_id"].astype(str), volumes["case_id"].astype(str)))
        subjects = ranked["volume_id"].astype(str).map(lambda v: case_of.get(v, v)).to_numpy()
        result = evaluate(ranked, feats[rows], coverage_feats=thumbs[rows], eligible=~np.asarray(defer, bool)[rows],
                          subjects=subjects)
        result["voter_settings"] = {
            "features": cfg.features, "atypicality_weight": cfg.atypicality_weight,
            "stratify": cfg.stratify, "query": use_query, "query_weight": cfg.query_weight if use_query else None,
            "body_mask": cfg.body_mask,
        }
        summary.evaluation = result
        summary.evaluation_table = format_table(result)
        out = wd.rank_eval
        payload = {"table": summary.evaluation_table, "result": result, "features": cfg.features}
        atomic_write_text(out, json.dumps(payload, indent=2))
        summary.eval_path = out
    summary.seconds = time.perf_counter() - t0
    return summary
