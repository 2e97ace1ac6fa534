"""The ground pieces every stage shares: workdir layout, manifest resolution, usable rows."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from curation.store.layout import Workdir
from curation.store.manifest import (
    RELEASE_SCHEMA,
    SLICES_SCHEMA,
    next_release_path,
    read_manifest,
    release_manifests,
    resolve_manifest,
    usable_caption_rows,
    write_manifest,
)


def test_layout_paths_are_under_the_workdir(tmp_path):
    wd = Workdir(tmp_path)
    paths = [
        wd.volumes_manifest, wd.slices_manifest, wd.shard_manifest("slices", 1, 4), wd.release(3),
        wd.volume_record("x-1"), wd.caption_db, wd.caption_table, wd.batches, wd.embedding_store("ab"),
        wd.embeddings_latest, wd.clip_checkpoints, wd.pretrain_checkpoints, wd.exports, wd.rank_eval,
    ]
    assert all(p.is_relative_to(tmp_path) for p in paths)
    assert wd.shard_manifest("slices", 1, 4).name == "slices.1-of-4.parquet"
    assert wd.release(3) == tmp_path / "manifests" / "v3.parquet"
    rel = Workdir.png_relpath("brain-1", "axial", 7, 512)
    assert rel == "cache/png/512/brain-1/axial_007.png"
    assert wd.rel(tmp_path / rel) == rel


def test_resolve_manifest_forms(tmp_path, monkeypatch):
    wd = Workdir(tmp_path / "w")
    path = write_manifest(pd.DataFrame({"a": [1]}), wd.release(2))
    monkeypatch.chdir(tmp_path)
    assert resolve_manifest(wd.root, path) == path  # absolute
    assert resolve_manifest(wd.root, "w/manifests/v2.parquet").resolve() == path  # relative to the cwd
    assert resolve_manifest(wd.root, "manifests/v2.parquet") == path  # relative to the workdir
    assert resolve_manifest(wd.root, "v2.parquet") == path  # a name under manifests/
    assert resolve_manifest(wd.root, "v2") == path
    with pytest.raises(FileNotFoundError, match="v9.parquet: no such manifest"):
        resolve_manifest(wd.root, "manifests/v9.parquet")


def test_release_versions(tmp_path):
    assert next_release_path(tmp_path) == tmp_path / "manifests" / "v1.parquet"
    for n in (1, 2, 10):
        write_manifest(pd.DataFrame({"a": [n]}), Workdir(tmp_path).release(n))
    (tmp_path / "manifests" / "vnext.parquet").write_bytes(b"")  # not a version
    assert [p.stem for p in release_manifests(tmp_path)] == ["v1", "v2", "v10"]
    assert next_release_path(tmp_path).name == "v11.parquet"


def test_usable_caption_rows_is_one_rule():
    df = pd.DataFrame(
        {
            "caption": ["a brain", None, "   ", "refused text", "ok", "no image"],
            "refused": [False, False, False, True, None, False],
            "image_path": ["p0", "p1", "p2", "p3", "p4", None],
            "image_sha256": ["s0", "s1", "s2", "s3", "s4", "s5"],
        }
    )
    assert usable_caption_rows(df).tolist() == [True, False, False, False, True, False]


def test_release_schema_keeps_column_order_and_extra_columns(tmp_path):
    row = {name: None for name in RELEASE_SCHEMA.names}
    row.update(slice_id="v:axial:1", volume_id="v", plane="axial", plane_index=0, index=1, caption="x",
               refused=False, split="train", labels_present=["liver"], grid_size=128)
    df = pd.DataFrame([row])[list(reversed(RELEASE_SCHEMA.names))]
    df["later_stage_column"] = [1.5]
    path = write_manifest(df, tmp_path / "v1.parquet", RELEASE_SCHEMA)
    schema = pq.read_schema(path)
    assert schema.names == [*RELEASE_SCHEMA.names, "later_stage_column"]
    assert schema.field("plane_index").type == SLICES_SCHEMA.field("plane_index").type
    back = read_manifest(path)
    assert back.loc[0, "labels_present"] == ["liver"]
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file
