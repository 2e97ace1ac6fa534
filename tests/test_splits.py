"""Subject-wise splits: a property of the case id, stable as collections are added."""

from __future__ import annotations

import pandas as pd

from curation.store.splits import assign_splits, case_splits, split_of


def test_split_is_subject_wise_and_7_1_2_in_expectation():
    cases = pd.Series([f"case{i // 3}" for i in range(3000)])
    split = assign_splits(cases)
    per_case = pd.DataFrame({"c": cases, "s": split}).drop_duplicates()
    assert per_case["c"].is_unique  # a case never straddles two splits
    share = per_case["s"].value_counts(normalize=True)
    assert abs(share["train"] - 0.7) < 0.05 and abs(share["val"] - 0.1) < 0.03 and abs(share["test"] - 0.2) < 0.04
    assert list(assign_splits(cases)) == list(split)
    assert all(split_of(c) == s for c, s in zip(per_case["c"], per_case["s"]))


def test_adding_a_collection_moves_no_existing_case():
    v1 = pd.DataFrame({"case_id": [f"a{i}" for i in range(40)], "source_sha256": [f"sa{i}" for i in range(40)]})
    v2 = pd.concat([v1, pd.DataFrame({"case_id": [f"b{i}" for i in range(60)],
                                      "source_sha256": [f"sb{i}" for i in range(60)]})], ignore_index=True)
    before, after = case_splits(v1), case_splits(v2)
    assert {c: after[c] for c in before} == before
    # the order rows come in does not matter either
    assert case_splits(v2.iloc[::-1]) == after
    # and a split depends on nothing but the id (a one-case table agrees)
    assert all(case_splits(pd.DataFrame({"case_id": [c]})) == {c: s} for c, s in before.items())


def test_identical_source_volumes_share_a_split():
    ids = [f"c{i}" for i in range(30)]
    alone = {c: split_of(c) for c in ids}
    a = next(c for c in ids if alone[c] == "train")
    b = next(c for c in ids if alone[c] == "test")
    # b holds a copy of a's volume (same source_sha256): they must land together
    vols = pd.DataFrame({"case_id": ids + [b], "source_sha256": [f"s{c}" for c in ids] + [f"s{a}"]})
    got = case_splits(vols)
    assert got[a] == got[b]
    # only the linked cases can move; every other case keeps its own split
    assert {c: got[c] for c in ids if c not in (a, b)} == {c: alone[c] for c in ids if c not in (a, b)}
    # missing hashes (error rows) link nothing
    vols = pd.DataFrame({"case_id": ["c0", "c1"], "source_sha256": [None, None]})
    assert case_splits(vols) == {"c0": split_of("c0"), "c1": split_of("c1")}
