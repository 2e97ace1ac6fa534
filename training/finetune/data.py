"""Data of `train finetune`: which curated volumes take part (``--where`` over volumes.parquet),
their subject split, the ``--train-fraction`` subset, targets (label volumes, or ``--labels CSV``),
and loading a batch at the network's input size.

The split is by default the release's (``curation.store.splits.case_splits`` over every volume of
the workdir), so the test subjects here are the release's test subjects; ``choose_split`` applies
a split file or k-fold instead. Seg classes come from the source's names or, without names, from
the values the label volumes hold (`_seg` files, label folders, list files). Train subsets are
stratified by class (``case_strata``) and nested across fractions.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
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
from curation.store.splits import case_splits, kfold_splits, read_split_file
from training.loop.errors import TrainingError

log = logging.getLogger(__name__)


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


MAX_CLASSES = 256  # label values beyond this are not class indices (an atlas, a mistaken file)


def label_values(workdir: str | Path, rows: pd.DataFrame) -> list[tuple[int, ...]]:
    """Per row, the label values its label volume holds (0 included when present), sorted."""
    out = []
    for rel in rows["label_volume_path"]:
        path = Path(workdir) / str(rel)
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise TrainingError(f"{path}: unreadable label volume ({e})") from e
        a = np.asarray(arr).ravel()
        if a.dtype.kind == "u" and a.dtype.itemsize <= 2:
            values = np.flatnonzero(np.bincount(a))
        else:
            values = np.unique(a)
        out.append(tuple(int(v) for v in values))
    return out


def seg_classes(rows: pd.DataFrame, values: list[tuple[int, ...]] | None = None) -> list[str]:
    """Class names by label value (index 0 = background) of the labelled volumes: the names the
    source gave (``label_names``: MSD's dataset.json), else ``label_<v>`` up to the largest value
    the label volumes hold (``values``, from ``label_values``: `_seg` files, label folders, list
    files). TrainingError when the selection mixes label sets (pick one collection with --where),
    when fewer than two classes remain, or when the values are not class indices."""
    sets = {str(v) for v in rows["label_names"].fillna("{}")}
    if len(sets) != 1:
        raise TrainingError(f"the selected volumes have {len(sets)} different label sets; "
                            "choose one collection with --where (e.g. \"subset = 'Task09_Spleen'\")")
    try:
        names = {int(k): str(v) for k, v in json.loads(sets.pop() or "{}").items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise TrainingError(f"label_names of the selected volumes is not a {{value: name}} map ({e})") from None
    top = max([0, *names])
    if values is not None:
        top = max([top, *(max(v, default=0) for v in values)])
    if top >= MAX_CLASSES:
        raise TrainingError(f"the label volumes hold values up to {top}: not class indices (at most "
                            f"{MAX_CLASSES - 1}); choose label volumes of classes with --where")
    classes = [names.get(i, "background" if i == 0 else f"label_{i}") for i in range(top + 1)]
    if len(classes) < 2:
        raise TrainingError(f"the {len(rows)} selected label volumes hold only background (0): nothing to "
                            "segment (wrong label files, or use --task cls)")
    return classes


def case_strata(rows: pd.DataFrame, per_row: list[object]) -> dict[str, str]:
    """case_id -> its stratum: the union over the case's rows of ``per_row`` (the label values a
    seg volume holds, background 0 left out; or a cls label), as one string."""
    out: dict[str, set[str]] = {}
    for case, item in zip(rows["case_id"].astype(str), per_row):
        items = item if isinstance(item, (tuple, list, set, frozenset)) else (item,)
        out.setdefault(case, set()).update(str(v) for v in items if not (isinstance(v, (int, np.integer)) and v == 0))
    return {c: "|".join(sorted(v)) for c, v in out.items()}


def choose_split(rows: pd.DataFrame, split_file: str | None = None, fold: int | None = None,
                 folds: int | None = None, strata: dict[str, str] | None = None) -> tuple[pd.DataFrame, dict]:
    """The rows with the ``split`` the user chose, and what was used (for metrics.json):

    - ``split_file``: CSV ``case_id,split`` or nnU-Net's ``splits_final.json`` (+ ``fold``); an id
      matches a case by case_id, volume_id, source path or the source file's stem (nnU-Net's
      ``_0000`` channel suffix dropped); selected cases the file does not list are left out;
    - ``folds`` N and ``fold`` k: subject-level k-fold over the selected cases (fold k is scored,
      the others train), stratified by ``strata``;
    - neither: the release's hash split (``select_volumes``).
    """
    if split_file and folds:
        raise TrainingError("--split-file and --folds: choose one")
    if fold is not None and not (split_file or folds):
        raise TrainingError(f"--fold {fold} needs --folds N or --split-file F")
    rows = rows.copy()
    try:
        if folds:
            if fold is None:
                raise TrainingError(f"--folds {folds} needs --fold k (0..{folds - 1})")
            groups = rows["source_sha256"] if "source_sha256" in rows.columns else None
            split = kfold_splits(rows["case_id"].astype(str), folds, fold, strata, groups)
            rows["split"] = rows["case_id"].astype(str).map(split)
            return rows, {"source": "folds", "folds": folds, "fold": fold, "stratified": bool(strata)}
        if split_file:
            wanted = read_split_file(split_file, fold)
            rows["split"] = _match_ids(rows, wanted, split_file)
            unlisted = int(rows["split"].isna().sum())
            if unlisted:
                log.info("%d selected volumes are not in %s; left out", unlisted, split_file)
            rows = rows[rows["split"].notna()].reset_index(drop=True)
            return rows, {"source": "file", "file": str(split_file), "fold": fold}
    except ValueError as e:
        raise TrainingError(str(e)) from None
    return rows, {"source": "hash", "note": "the release's subject hash split (curation.store.splits)"}


def _source_stem(path: object) -> str:
    name = Path(str(path).split("#")[0]).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return re.sub(r"_\d{4}$", "", name)


def _match_ids(rows: pd.DataFrame, wanted: dict[str, str], path: str) -> pd.Series:
    """Per row, the split ``wanted`` gives it (None when unlisted); TrainingError when no id of the
    file matches a selected case or when one case gets two splits."""
    keys = [rows["case_id"].astype(str), rows["volume_id"].astype(str)]
    if "source_path" in rows.columns:
        keys += [rows["source_path"].astype(str), rows["source_path"].map(_source_stem)]
    per_row: list[str | None] = []
    for i in range(len(rows)):
        hits = {wanted[k.iloc[i]] for k in keys if k.iloc[i] in wanted}
        if len(hits) > 1:
            raise TrainingError(f"{path}: volume {rows['volume_id'].iloc[i]} matches entries of two splits {sorted(hits)}")
        per_row.append(hits.pop() if hits else None)
    split = pd.Series(per_row, index=rows.index, dtype=object)
    by_case = pd.DataFrame({"c": rows["case_id"].astype(str), "s": split}).dropna().drop_duplicates()
    if by_case["c"].duplicated().any():
        case = by_case.loc[by_case["c"].duplicated(), "c"].iloc[0]
        raise TrainingError(f"{path}: the volumes of case {case} fall in two splits")
    if split.isna().all():
        raise TrainingError(f"{path}: none of its {len(wanted)} ids matches a selected case (ids: case_id, "
                            "volume_id, or the source file's name; see `curate query \"SELECT case_id, source_path "
                            "FROM volumes\"`)")
    return split


def train_subset(rows: pd.DataFrame, fraction: float, seed: int, strata: dict[str, str] | None = None) -> pd.DataFrame:
    """The train rows of ``ceil(fraction * cases)`` train cases (at least one), stratified and
    nested: a prefix of ``stratified_order``, so every fraction keeps the class mix of ``strata``
    (case_id -> e.g. the label classes it holds; to rounding) and the 25% subset lies inside the
    50% one for the same seed; another seed takes other cases."""
    if not 0 < fraction <= 1:
        raise TrainingError(f"--train-fraction {fraction}: must be in (0, 1]")
    train = rows[rows["split"] == "train"]
    order = stratified_order(sorted(set(train["case_id"].astype(str))), seed, strata or {})
    keep = set(order[:max(1, math.ceil(fraction * len(order)))]) if order else set()
    return train[train["case_id"].astype(str).isin(keep)].reset_index(drop=True)


def stratified_order(cases: list[str], seed: int, strata: dict[str, str]) -> list[str]:
    """``cases`` in the order ``train_subset`` takes them: each stratum's cases ordered by a hash
    of (seed, case) and placed at evenly spaced positions ``(rank + phase) / n_stratum`` (the
    phase a hash of (seed, stratum)); the strata merged by position."""
    def h(text: str) -> str:
        return hashlib.sha256(f"{seed}|{text}".encode()).hexdigest()

    by: dict[str, list[str]] = {}
    for c in cases:
        by.setdefault(strata.get(c, ""), []).append(c)
    keyed = []
    for stratum, members in by.items():
        members.sort(key=h)
        phase = int(h(f"stratum|{stratum}")[:8], 16) / 16**8
        keyed += [((r + phase) / len(members), h(c), c) for r, c in enumerate(members)]
    return [c for *_, c in sorted(keyed)]


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
