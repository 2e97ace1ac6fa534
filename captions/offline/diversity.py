"""How varied a set of captions is: a few distinct texts over thousands of slices teach a
contrastive model nothing, and make retrieval recall look better than it is."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

FEW_DISTINCT = 20  # recall over fewer distinct texts than this is not worth reporting plainly


def caption_diversity(texts: Iterable[Any]) -> dict[str, Any]:
    """``{"distinct", "total", "top_share", "top"}`` of non-blank captions (whitespace and case
    folded): distinct texts, how many in all, the share of the most common one and that text.

    >>> caption_diversity(["A b", "a  b", "c"])["distinct"]
    2
    """
    norm = [" ".join(str(t).split()).lower() for t in texts if t is not None and str(t).strip()]
    counts = Counter(norm)
    total = len(norm)
    top, n_top = counts.most_common(1)[0] if counts else ("", 0)
    return {
        "distinct": len(counts),
        "total": total,
        "top_share": (n_top / total) if total else 0.0,
        "top": top,
    }


def diversity_line(stats: dict[str, Any]) -> str:
    """One summary line, e.g. "1,234 distinct captions of 2,583 (most common: 2%)"."""
    line = f"{stats['distinct']:,} distinct captions of {stats['total']:,} (most common: {stats['top_share']:.0%})"
    if stats["total"] and stats["distinct"] < FEW_DISTINCT:
        line += f"; fewer than {FEW_DISTINCT} distinct texts: retrieval recall over them means little"
    return line
