"""Data of `train finetune`: which curated volumes take part (``--where`` over volumes.parquet),
their subject split, the ``--train-fraction`` subset, targets (label volumes, or ``--labels CSV``),
and loading a batch at the network's input size.

The split is the release's (``curation.store.splits.case_splits`` over every volume of the workdir),
so the test subjects here are the release's test subjects.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from curation.store.layout import Workdir
from curation.store.manifest import read_manifest
from curation.store.query import run_query
from curation.store.splits import case_splits
from training.loop.errors import TrainingError


def _balanced(text: str) -> bool:
    """Parentheses balance and no ``;`` outside quoted strings and identifiers."""
    depth, quote = 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            return False
        elif ch in "()":
            depth += 1 if ch == "(" else -1
            if depth < 0:
                return False
    return depth == 0 and not quote


def where_clause(where: str) -> str:
    """``--where`` as one boolean SQL expression, re-written by DuckDB's own parser (so nothing
    but that expression reaches the query); TrainingError (one line) for anything else, e.g.
    ``TRUE) OR (TRUE`` or ``1=1); COPY ...``."""
    text = where.strip()
    if not _balanced(text):
        raise TrainingError(f"--where {where!r}: not one expression (unbalanced parentheses, quotes or a ';')")
    parse = getattr(duckdb, "SQLExpression", None)
    if parse is None:  # an older DuckDB: the checks above, then one locked-down SELECT (run_query)
        return text
    try:
        return str(parse(text))
    except duckdb.Error as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainingError(f"--where {where!r}: not one SQL expression ({first})") from None


def select_volumes(workdir: str | Path, where: str | None) -> pd.DataFrame:
    """The usable (status ok) volumes matching ``where`` (one DuckDB boolean expression over the
    columns of ``volumes``, run read-only), sorted by volume_id, each with its ``split``."""
    wd = Workdir(workdir)
    if not wd.volumes_manifest.exists():
        raise TrainingError(f"{wd.volumes_manifest}: no volumes manifest (run `curate slice` first)")
    everything = read_manifest(wd.volumes_manifest)
    sql = "SELECT * FROM volumes WHERE status = 'ok'" + (f" AND ({where_clause(where)})" if where and where.strip() else "")
    try:
        rows = run_query(Path(workdir), sql)
    except (duckdb.Error, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainingError(f"--where {where!r}: {first}") from None
    splits = case_splits(everything)
    rows = rows.sort_values("volume_id", kind="stable").reset_index(drop=True)
    rows["split"] = rows["case_id"].astype(str).map(splits)
    return rows


def read_labels(path: str | Path) -> dict[str, str]:
    """``case_id,label`` CSV (a header row with those names) -> {case_id: label}."""
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"case_id", "label"} <= set(reader.fieldnames):
                raise TrainingError(f"{path}: needs a header with columns case_id,label")
            out: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                case, label = (row["case_id"] or "").strip(), (row["label"] or "").strip()
                if not case or not label:
                    raise TrainingError(f"{path}:{line}: empty case_id or label")
                if out.get(case, label) != label:
                    raise TrainingError(f"{path}:{line}: case {case} has two labels ({out[case]!r}, {label!r})")
                out[case] = label
    except OSError as e:
        raise TrainingError(f"--labels {path}: {e.strerror or e}") from e
    if not out:
        raise TrainingError(f"{path}: no labels")
    return out


def seg_classes(rows: pd.DataFrame) -> list[str]:
    """Class names by label value (index 0 = background) of the labelled volumes; TrainingError
    when the selection mixes label sets (pick one collection with --where)."""
    sets = {str(v) for v in rows["label_names"].fillna("{}")}
    if len(sets) != 1:
        raise TrainingError(f"the selected volumes have {len(sets)} different label sets; "
                            "choose one collection with --where (e.g. \"subset = 'Task09_Spleen'\")")
    names = {int(k): v for k, v in json.loads(sets.pop()).items()}
    n = max([0, *names]) + 1
    return [names.get(i, "background" if i == 0 else f"label_{i}") for i in range(n)]


def train_subset(rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The train rows of ``ceil(fraction * cases)`` train cases (at least one), chosen by a hash
    of (seed, case): nested as the fraction grows, different per seed."""
    if not 0 < fraction <= 1:
        raise TrainingError(f"--train-fraction {fraction}: must be in (0, 1]")
    train = rows[rows["split"] == "train"]
    cases = sorted(set(train["case_id"].astype(str)),
                   key=lambda c: hashlib.sha256(f"{seed}|{c}".encode()).hexdigest())
    keep = set(cases[:max(1, math.ceil(fraction * len(cases)))]) if cases else set()
    return train[train["case_id"].astype(str).isin(keep)].reset_index(drop=True)


@dataclass
class VolumeSet:
    """Volumes of one split with their targets; ``load(i)`` -> (image (1,S,S,S), target)."""

    workdir: Path
    rows: pd.DataFrame
    img_size: int
    targets: list[int] | None = None  # cls: class index per row; seg: None (label volumes)
    cache_bytes: int = 2 << 30
    _cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _used: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i in self._cache:
            return self._cache[i]
        r = self.rows.iloc[i]
        image = _load(self.workdir / r["volume_path"], self.img_size, "trilinear")
        if self.targets is None:
            target = _load(self.workdir / r["label_volume_path"], self.img_size, "nearest").long()
        else:
            target = torch.tensor(self.targets[i], dtype=torch.long)
        size = image.numel() * 4 + target.numel() * 8
        if self._used + size <= self.cache_bytes:  # small collections stay in memory
            self._cache[i] = (image, target)
            self._used += size
        return image, target

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.load(i) for i in indices]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def _load(path: Path, size: int, mode: str) -> torch.Tensor:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: unreadable volume ({e})") from e
    if arr.ndim != 3:
        raise TrainingError(f"{path}: expected a 3D array, got shape {tuple(arr.shape)}")
    vol = torch.from_numpy(np.asarray(arr, dtype=np.float32))[None]
    if vol.shape[-3:] != (size,) * 3:
        kw = {"align_corners": False} if mode == "trilinear" else {}
        vol = F.interpolate(vol[None], size=(size,) * 3, mode=mode, **kw)[0]
    return vol


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Row indices of 0-based ``step``: a seeded permutation per epoch, cut into batches (the
    last partial one dropped); a pure function of the step, so a resume sees the same batches."""
    per_epoch = max(1, n // batch_size)
    epoch, within = divmod(step, per_epoch)
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    return [int(i) for i in perm[within * batch_size:(within + 1) * batch_size]]
