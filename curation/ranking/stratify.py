"""`--stratify labels`: every label class present in a (volume, plane) gets an early pick."""

from __future__ import annotations

import numpy as np
import pandas as pd

from curation.ranking.evaluate import label_tuple


def stratify_ranks(df: pd.DataFrame, defer: np.ndarray | None = None) -> np.ndarray:
    """New vote_rank per row of ``df`` (volume_id, plane, vote_rank, labels_present).

    Per pool, walking the vote order: the first slice showing a class no earlier pick shows
    is moved up, until every class of the pool is shown (so C classes take at most the first
    C ranks); then the rest in vote order. Deferred slices (``defer``) serve a class only
    when no other slice shows it.
    """
    n = len(df)
    rank = df["vote_rank"].to_numpy(dtype=np.int64).copy()
    if n == 0 or "labels_present" not in df.columns:
        return rank
    labels = [label_tuple(v) for v in df["labels_present"]]
    late = np.zeros(n, dtype=bool) if defer is None else np.asarray(defer, dtype=bool)
    for rows in df.groupby(["volume_id", "plane"], sort=False).indices.values():
        rows = rows[np.argsort(rank[rows], kind="stable")]
        wanted = set().union(*(labels[r] for r in rows))
        first: list[int] = []
        for pool_rows in (rows[~late[rows]], rows[late[rows]]):
            for r in pool_rows:
                if not wanted:
                    break
                if wanted.intersection(labels[r]):
                    first.append(int(r))
                    wanted.difference_update(labels[r])
        chosen = set(first)
        new = first + [int(r) for r in rows if int(r) not in chosen]
        rank[new] = np.arange(len(new))
    return rank
