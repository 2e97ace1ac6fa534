"""`curate rank`: features per slice -> Vote-MI-style voter -> ranks written into slices.parquet."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .fsutil import atomic_write_text
from .embed_store import latest_fingerprint, read_table
from .layout import Workdir
from .manifest import PLANE_AXIS, SLICES_SCHEMA, read_manifest, write_manifest
from .rank_eval import evaluate, format_table
from .features import builtin_features, reduce_features
from .vote import rank_pools


@dataclass
class RankConfig:
    workdir: Path
    features: str = "builtin"  # builtin | clip
    k: int | None = None  # neighbours per vote; None = automatic per pool size
    dim: int = 32  # PCA dimensions of the built-in descriptor
    dup_threshold: float = 0.98
    seed: int = 0
    evaluate: bool = False
    embeddings: str | None = None  # embedding fingerprint for --features clip (None = latest)
    workers: int = 1  # processes for the per-pool voting


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
    workdir: Path, volumes: pd.DataFrame, slices: pd.DataFrame, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """The cheap descriptor of every slice row, read from the memory-mapped training volumes."""
    feats: np.ndarray | None = None
    vol_path = dict(zip(volumes["volume_id"], volumes["volume_path"]))
    positions = slices.groupby("volume_id", sort=True).indices
    for done, (vid, rows) in enumerate(positions.items()):
        vol = np.load(Path(workdir) / vol_path[vid], mmap_mode="r")
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


def run_rank(cfg: RankConfig, progress: Callable[[str, int, int], None] | None = None) -> RankSummary:
    """Rank every slice of every ok volume; rewrite slices.parquet with the vote columns."""
    t0 = time.perf_counter()
    wd = Workdir(cfg.workdir)
    workdir = wd.root
    if not wd.slices_manifest.exists():
        raise FileNotFoundError(f"{wd.slices_manifest}: no slices yet (run `curate slice` first)")
    slices = read_manifest(wd.slices_manifest)
    volumes = read_manifest(wd.volumes_manifest)
    volumes = volumes[volumes["status"] == "ok"]
    slices = slices[slices["volume_id"].isin(volumes["volume_id"])].reset_index(drop=True)
    summary = RankSummary(slices=len(slices))
    if slices.empty:
        raise ValueError("no slices to rank (every volume failed or was empty)")
    n_vol = slices["volume_id"].nunique()
    if cfg.features == "clip":
        feats = clip_slice_features(workdir, slices, cfg.embeddings)
    elif cfg.features == "builtin":
        raw = builtin_slice_features(
            workdir, volumes, slices, progress=(lambda d: progress("features", d, n_vol)) if progress else None
        )
        feats = reduce_features(raw, dim=cfg.dim, seed=cfg.seed)
    else:
        raise ValueError(f"unknown --features {cfg.features!r}; choose builtin or clip")
    summary.feature_seconds = time.perf_counter() - t0
    n_pools = slices.groupby(["volume_id", "plane"]).ngroups
    summary.pools = n_pools
    ranked = rank_pools(
        slices,
        feats,
        cfg.k,
        dup_threshold=cfg.dup_threshold,
        seed=cfg.seed,
        workers=cfg.workers,
        progress=(lambda d: progress("voting", d, n_pools)) if progress else None,
    )
    ranked = ranked.sort_values(["volume_id", "plane_index", "index"], ignore_index=True)
    summary.slices_path = write_manifest(
        ranked,
        wd.slices_manifest,
        SLICES_SCHEMA,
        {"rank_features": cfg.features, "rank_k": cfg.k if cfg.k is not None else "auto", "rank_seed": cfg.seed},
    )
    if cfg.evaluate:
        order = ranked.set_index("slice_id").index
        pos = pd.Index(slices["slice_id"]).get_indexer(order)
        result = evaluate(ranked, feats[pos], seed=cfg.seed)
        summary.evaluation = result
        summary.evaluation_table = format_table(result)
        out = wd.rank_eval
        payload = {"table": summary.evaluation_table, "result": result, "features": cfg.features}
        atomic_write_text(out, json.dumps(payload, indent=2))
        summary.eval_path = out
    summary.seconds = time.perf_counter() - t0
    return summary
