"""Quality flags: junk volumes are flagged in volumes.parquet, with one line each, and left out of
`curate rank`'s selection unless --include-flagged."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import phantom_ras, ras_affine, save_nifti

from curation.ranking.rank import RankConfig, run_rank
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.quality import source_flags
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.manifest import VOLUMES_SCHEMA, read_manifest

G = 24


def _slice(root: Path, w: Path, caplog=None):
    lines: list[str] = []
    run_slice("nifti", root, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=G)), log=lines.append)
    vols = read_manifest(w / "manifests/volumes.parquet")
    vols.index = [Path(p).name.split(".")[0] for p in vols["source_path"]]
    return vols, lines


def _junk_folder(root: Path) -> None:
    data, _ = phantom_ras()
    save_nifti(root / "good.nii.gz", data, ras_affine())
    rng = np.random.default_rng(0)
    save_nifti(root / "tiny.nii.gz", rng.normal(100, 10, (3, 4, 5)).astype(np.float32), ras_affine())
    save_nifti(root / "flat.nii.gz", np.full((20, 20, 20), 7.0, np.float32), ras_affine())
    # a z-statistic map: float, a null peak at 0 with heavy tails both ways, no intent, neutral name
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 20)] * 3, indexing="ij")
    zmap = rng.normal(0, 0.7, x.shape) + 6 * np.exp(-((x - 0.5) ** 2 + y ** 2 + z ** 2) / 0.2)
    zmap = (zmap - 5 * np.exp(-((x + 0.5) ** 2 + y ** 2 + z ** 2) / 0.2)).astype(np.float32)
    save_nifti(root / "activation.nii.gz", zmap, ras_affine())
    # the same with the header's intent code and a positive-only copy named zstat
    img = nib.Nifti1Image(np.abs(zmap) + 1, ras_affine())
    img.header.set_intent("z score")
    nib.save(img, str(root / "intent.nii.gz"))
    save_nifti(root / "zstat1.nii.gz", np.abs(zmap) + 1, ras_affine())
    # an absurd slice thickness: the phantom squeezed into a sliver of the cube
    save_nifti(root / "thick.nii.gz", data, ras_affine(spacing=(0.01, 0.01, 500.0)))


def test_flags_in_volumes_manifest_with_one_line_each(tmp_path: Path, caplog):
    root = tmp_path / "data"
    _junk_folder(root)
    with caplog.at_level(logging.WARNING, logger="curation.slice"):
        vols, _ = _slice(root, tmp_path / "w")
    flags = {case: list(v) for case, v in vols["quality_flags"].items()}
    assert flags["good"] == []
    assert "too_few_voxels" in flags["tiny"]
    # a constant volume is refused outright (an error row), or flagged
    assert "constant_intensity" in flags["flat"] or vols.loc["flat", "status"] == "error"
    assert "statistical_map" in flags["activation"]
    assert "statistical_map" in flags["intent"]
    assert "statistical_map" in flags["zstat1"]
    assert "empty_after_preprocessing" in flags["thick"]
    for case, f in flags.items():
        if f and vols.loc[case, "status"] == "ok":
            assert "quality flag" in vols.loc[case, "notes"]
            assert any("quality flag" in r.getMessage() and case in r.getMessage() for r in caplog.records)
    # the sliver was "ok with 0 slices and no note" before the flags
    if vols.loc["thick", "status"] == "ok" and vols.loc["thick", "n_slices"] == 0:
        assert "empty_after_preprocessing" in vols.loc["thick", "notes"]


def test_rank_leaves_flagged_volumes_out_unless_asked(tmp_path: Path):
    root = tmp_path / "data"
    data, _ = phantom_ras()
    save_nifti(root / "good.nii.gz", data, ras_affine())
    save_nifti(root / "good2.nii.gz", np.roll(data, 3, axis=0), ras_affine())
    save_nifti(root / "zstat1.nii.gz", data, ras_affine())  # an image, but named like a stat map
    w = tmp_path / "w"
    vols, _ = _slice(root, w)
    bad = vols.loc["zstat1", "volume_id"]
    assert list(vols.loc["zstat1", "quality_flags"]) == ["statistical_map"]
    s = run_rank(RankConfig(workdir=w))
    df = read_manifest(w / "manifests/slices.parquet")
    held = df[df["volume_id"] == bad]
    assert len(held) > 0 and held["selection_order"].isna().all()  # kept, unranked
    kept = df[df["volume_id"] != bad]
    assert sorted(kept["selection_order"].astype(int)) == list(range(len(kept)))
    assert s.extra["flagged_volumes"] == 1 and s.slices == len(kept)
    run_rank(RankConfig(workdir=w, include_flagged=True))
    df = read_manifest(w / "manifests/slices.parquet")
    assert df["selection_order"].notna().all()
    assert sorted(df["selection_order"].astype(int)) == list(range(len(df)))


def test_rank_refuses_when_everything_is_flagged(tmp_path: Path):
    root = tmp_path / "data"
    data, _ = phantom_ras()
    save_nifti(root / "tstat1.nii.gz", data, ras_affine())
    w = tmp_path / "w"
    _slice(root, w)
    with pytest.raises(ValueError, match="--include-flagged"):
        run_rank(RankConfig(workdir=w))


def test_old_volumes_manifest_without_the_column_still_reads_and_ranks(tmp_path: Path):
    root = tmp_path / "data"
    data, _ = phantom_ras()
    save_nifti(root / "good.nii.gz", data, ras_affine())
    w = tmp_path / "w"
    _slice(root, w)
    path = w / "manifests/volumes.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop(["quality_flags"]), path)
    old = read_manifest(path)
    assert "quality_flags" not in old.columns
    run_rank(RankConfig(workdir=w))
    assert read_manifest(w / "manifests/slices.parquet")["selection_order"].notna().all()
    assert pa.types.is_list(VOLUMES_SCHEMA.field("quality_flags").type)


def test_anatomical_volumes_are_not_flagged():
    rng = np.random.default_rng(1)
    data, _ = phantom_ras()
    assert source_flags(data, data.shape, "MR", "t1.nii.gz") == []
    ct = np.where(data > 0, data, -1000.0).astype(np.float32)  # CT: air at -1000, both signs
    assert source_flags(ct, ct.shape, "CT", "ct.nii.gz") == []
    mr = (data + rng.normal(0, 2, data.shape)).astype(np.float32)  # small noise around 0 in air
    assert source_flags(mr, mr.shape, "MR", "brain.nii.gz") == []
    body = data > 0  # an intensity-normalised (z-scored) MR: both signs, but spread over its tissues
    zscored = np.where(body, (mr - mr[body].mean()) / mr[body].std(), 0).astype(np.float32)
    assert source_flags(zscored, zscored.shape, "MR", "t1_norm.nii.gz") == []
    slab = rng.normal(100, 10, (64, 64, 10)).astype(np.float32)  # a 10-slice thick-slab MR is an image
    assert source_flags(slab, slab.shape, "MR", "slab.nii.gz") == []
    tiny = rng.normal(100, 10, (16, 16, 5)).astype(np.float32)  # a 16x16 pixel series is not
    assert [f for f, _ in source_flags(tiny, tiny.shape, "CT", "ct.nii.gz")] == ["too_few_voxels"]


def test_nilearn_motor_activation_map_is_flagged():
    """The z-map nilearn ships (a NeuroVault motor activation) was accepted as MR before."""
    nilearn = pytest.importorskip("nilearn")
    path = Path(nilearn.__file__).parent / "datasets/data/image_10426.nii.gz"
    if not path.exists():
        pytest.skip("nilearn without its sample activation map")
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    flags = source_flags(data, data.shape, "MR", "image_10426.nii.gz")
    assert [f for f, _ in flags] == ["statistical_map"]
