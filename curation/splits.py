"""Subject-wise train/val/test splits: which cases a model may learn from and which it is judged on."""

from __future__ import annotations

import hashlib

import pandas as pd

SPLITS = (("train", 0.7), ("val", 0.1), ("test", 0.2))


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
