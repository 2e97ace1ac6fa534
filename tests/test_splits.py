"""Subject-wise splits of the release."""

from __future__ import annotations

from curation.splits import assign_splits


def test_split_is_subject_wise_7_1_2():
    import pandas as pd

    cases = pd.Series([f"case{i // 3}" for i in range(300)])
    split = assign_splits(cases)
    per_case = pd.DataFrame({"c": cases, "s": split}).drop_duplicates()
    assert per_case["c"].is_unique
    counts = per_case["s"].value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (70, 10, 20)
    assert list(assign_splits(cases)) == list(split)
