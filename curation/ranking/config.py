"""The config of `curate rank`: one place for its defaults (no heavy imports: the command line
reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    body_mask: bool = True  # descriptor sees the body only (no table, no air)
    atypicality_weight: float = 0.0  # w of the population prior; 0 = plain vote-k (measured best so far)
    min_relative_foreground: float = 0.25  # defer slices under this x the pool's largest body fraction
    edge_margin: float = 0.05  # defer slices in this outer fraction of a pool's extent
    stratify: str | None = None  # "labels": every label class in a pool gets an early pick
    query: str | None = None  # text for --query (the scores come from the caller)
    query_weight: float = 1.0  # W in [0, 1]: 1 = similarity alone, 0 = votes alone (module doc)
    level: float = 0.05  # foreground level of the body mask (the preprocessing's)
    include_flagged: bool = False  # rank volumes with quality flags too (default: left out, unranked)
