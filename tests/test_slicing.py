"""`curate slice` end to end on tiny phantoms: orientation invariance, bad input, resume, shards."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import phantom_ras, ras_affine, reorient, save_nifti, write_msd_task

from curation.executors.local import Executor, LocalExecutor
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.render import render_png, render_slices
from curation.slicing.stage import SliceConfig, SliceStep, merge_shards, run_slice
from curation.sources.datasets import discover
from curation.store.manifest import read_manifest, read_metadata
from curation.store.volume_store import load_display

G = 32


def cfg_for(workdir: Path, **kw) -> SliceConfig:
    return SliceConfig(workdir=workdir, pre=PreprocessConfig(grid_size=G, spacing=1.0), **kw)


def quiet(*_a, **_k) -> None:
    pass


def test_same_slices_in_every_orientation(tmp_path: Path, phantom):
    data, label = phantom
    aff = ras_affine()
    root = tmp_path / "data"
    for codes in ("RAS", "LAS", "LPS", "ASR", "PIL"):
        d, a = reorient(data, aff, codes)
        lab, _ = reorient(label, aff, codes)
        assert nib.aff2axcodes(a) == tuple(codes)
        save_nifti(root / "images" / f"ph_{codes}.nii.gz", d, a)
        save_nifti(root / "labels" / f"ph_{codes}.nii.gz", lab.astype(np.uint8), a)
    summary = run_slice("nifti", root, cfg_for(tmp_path / "w"), log=quiet)
    assert summary.processed == 5 and summary.errors == 0
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet")
    slices = read_manifest(tmp_path / "w/manifests/slices.parquet")
    assert set(vols["source_axcodes"]) == {"RAS", "LAS", "LPS", "ASR", "PIL"}
    arrays = [np.load(tmp_path / "w" / p) for p in vols["volume_path"]]
    labels = [np.load(tmp_path / "w" / p) for p in vols["label_volume_path"]]
    displays = [load_display(tmp_path / "w" / p) for p in vols["display_path"]]
    for a, lb, dsp in zip(arrays[1:], labels[1:], displays[1:]):
        np.testing.assert_array_equal(a, arrays[0])
        np.testing.assert_array_equal(lb, labels[0])
        np.testing.assert_array_equal(dsp, displays[0])
    cols = ["plane", "index", "position", "foreground_fraction", "mean_intensity", "labels_present"]
    per_vol = [g[cols].reset_index(drop=True) for _, g in slices.groupby("volume_id")]
    for other in per_vol[1:]:
        pd.testing.assert_frame_equal(other, per_vol[0])
    # and the rendered PNGs are byte-identical
    pngs = {render_png(dsp, vols.iloc[i].to_dict(), "axial", G // 2, size=64) for i, dsp in enumerate(displays)}
    assert len(pngs) == 1


def test_geometry_cube_and_labels(tmp_path: Path, phantom):
    data, label = phantom
    aff = ras_affine(spacing=(1.5, 1.2, 2.0))
    root = tmp_path / "data"
    write_msd_task(root, "Task01_Phantom", {"ph_1": (data, aff, label)})
    run_slice("msd", root / "Task01_Phantom", cfg_for(tmp_path / "w"), log=quiet)
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet")
    row = vols.iloc[0]
    assert row["status"] == "ok" and row["modality"] == "CT"
    extent = np.array(data.shape) * np.array([1.5, 1.2, 2.0])
    assert row["cube_mm"] == pytest.approx(extent.max())
    vol = np.load(tmp_path / "w" / row["volume_path"])
    assert vol.shape == (G, G, G) and vol.dtype == np.float16
    assert 0.0 <= float(vol.min()) and float(vol.max()) <= 1.0
    # physical proportions survive: the data box (36 x 24 x 32 mm; 0 HU maps to 0.5) sits
    # centred in a 36 mm cube, the padding is 0
    fg = vol > 0.05
    ext = [int(fg.any(axis=tuple(a for a in range(3) if a != ax)).sum()) for ax in range(3)]
    assert ext == [G, round(24 / 36 * G), round(32 / 36 * G)]
    assert fg[:, :, : (G - ext[2]) // 2].sum() == 0
    # the right-anterior-superior blob stays right/anterior/superior after preprocessing
    lab = np.load(tmp_path / "w" / row["label_volume_path"])
    com = np.argwhere(lab == 1).mean(axis=0)
    assert (com > G / 2).all()
    com2 = np.argwhere(lab == 2).mean(axis=0)
    assert com2[0] < G / 2 and com2[1] < G / 2
    slices = read_manifest(tmp_path / "w/manifests/slices.parquet")
    assert set(slices["plane"]) == {"axial", "coronal", "sagittal"}
    top = slices[(slices["plane"] == "axial") & (slices["index"] == int(round(com[2])))]
    assert "blob" in top["labels_present"].iloc[0]
    assert slices["slice_id"].str.match(r"^task01_phantom-[0-9a-f]{12}:(axial|coronal|sagittal):\d+$").all()
    meta = read_metadata(tmp_path / "w/manifests/slices.parquet")
    assert meta["schema_version"] == "1" and "command" in meta


def test_radiological_display_convention(tmp_path: Path, phantom):
    data, label = phantom
    root = tmp_path / "data"
    save_nifti(root / "ph.nii.gz", data, ras_affine(spacing=(1.0, 1.0, 1.0)))
    run_slice("nifti", root, cfg_for(tmp_path / "w"), log=quiet)
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet")
    v = vols.iloc[0].to_dict()
    dsp = load_display(tmp_path / "w" / v["display_path"])
    from curation.slicing.render import slice_pixels

    # Axial slice through the RAS blob (x, y, z > 0): patient right -> image left, anterior -> top.
    img = slice_pixels(dsp, v, "axial", int(G * 0.7), size=96)
    bright = np.argwhere(img == img.max()).mean(axis=0)
    assert bright[0] < img.shape[0] / 2, "anterior should be at the top"
    assert bright[1] < img.shape[1] / 2, "patient right should be on the image left"
    img = slice_pixels(dsp, v, "coronal", int(G * 0.68), size=96)
    bright = np.argwhere(img == img.max()).mean(axis=0)
    assert bright[0] < img.shape[0] / 2 and bright[1] < img.shape[1] / 2  # superior top, right on left
    img = slice_pixels(dsp, v, "sagittal", int(G * 0.72), size=96)
    bright = np.argwhere(img == img.max()).mean(axis=0)
    assert bright[0] < img.shape[0] / 2 and bright[1] < img.shape[1] / 2  # superior top, anterior left
    # a volume sliced before the lazy display volume (integer display_offset) still renders
    old_style = dict(v, display_origin_mm=None, display_offset=[round(o) for o in v["display_origin_mm"]])
    for plane in ("axial", "coronal", "sagittal"):
        a, b = (slice_pixels(dsp, rec, plane, G // 2, size=96).astype(int) for rec in (v, old_style))
        assert np.abs(a - b).mean() < 4


def test_lazy_display_volume_renders_the_training_slice(tmp_path: Path):
    """Thick slices stay thick in the display volume (no eager 1 mm resample; fine in-plane axes
    shrink to --spacing) and every PNG still shows what the training slice shows, where it is."""
    data, _ = phantom_ras((48, 40, 8))
    d, a = reorient(data, ras_affine(spacing=(0.5, 0.6, 4.0)), "LPS")
    save_nifti(tmp_path / "data" / "ph.nii.gz", d, a)
    run_slice("nifti", tmp_path / "data", cfg_for(tmp_path / "w"), log=quiet)
    v = read_manifest(tmp_path / "w/manifests/volumes.parquet").iloc[0].to_dict()
    dsp = load_display(tmp_path / "w" / v["display_path"])
    assert dsp.shape == (24, 24, 8)  # 24 x 24 x 32 mm: 1 mm in-plane, the 4 mm slices kept
    assert list(v["display_spacing"]) == pytest.approx([1.0, 1.0, 4.0])
    vol = np.load(tmp_path / "w" / v["volume_path"]).astype(np.float32)
    from curation.slicing.render import slice_pixels

    errors, flipped = [], []
    for plane, ax in (("sagittal", 0), ("coronal", 1), ("axial", 2)):
        for k in (9, 14, 19, 23):
            png = slice_pixels(dsp, v, plane, k, size=G) / 255.0  # MR: same window as training
            same = np.ascontiguousarray(np.take(vol, k, axis=ax)[::-1, ::-1].T)
            errors.append(np.abs(png - same).mean())
            flipped.append(np.abs(png - same[::-1, ::-1]).mean())
            assert errors[-1] < 0.02, (plane, k)
    assert sum(flipped) > 3 * sum(errors)  # the comparison can tell a misplaced image


def _write_bad_inputs(root: Path, data: np.ndarray) -> dict[str, Path]:
    aff = ras_affine()
    good = save_nifti(root / "good.nii.gz", data, aff)
    raw = gzip.compress(nib.Nifti1Image(data, aff).to_bytes())
    trunc = root / "truncated.nii.gz"
    trunc.write_bytes(raw[: len(raw) // 2])
    junk = root / "notanimage.nii.gz"
    junk.write_bytes(b"this is not a nifti file at all\n" * 20)
    flat = save_nifti(root / "flat2d.nii.gz", data[:, :, :1], aff)
    empty = save_nifti(root / "empty.nii.gz", np.zeros_like(data), aff)
    nan = save_nifti(root / "allnan.nii.gz", np.full_like(data, np.nan), aff)
    return {"good": good, "trunc": trunc, "junk": junk, "flat": flat, "empty": empty, "nan": nan}


def test_bad_inputs_are_recorded_and_the_rest_goes_on(tmp_path: Path, phantom):
    data, _ = phantom
    root = tmp_path / "data"
    files = _write_bad_inputs(root, data)
    lines: list[str] = []
    summary = run_slice("nifti", root, cfg_for(tmp_path / "w"), log=lines.append)
    assert summary.processed == 1 and summary.errors == 5
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet").set_index("source_path")
    assert vols.loc["good.nii.gz", "status"] == "ok"
    for key in ("trunc", "junk", "flat", "empty", "nan"):
        row = vols.loc[files[key].name]
        assert row["status"] == "error"
        assert files[key].name in row["error"] and "\n" not in row["error"]
    assert "2D" in vols.loc["flat2d.nii.gz", "error"]
    assert "empty" in vols.loc["empty.nii.gz", "error"]
    assert "NaN" in vols.loc["allnan.nii.gz", "error"]
    assert sum(1 for ln in lines if ln.startswith("error:")) == 5


def test_partial_nan_is_cleaned(tmp_path: Path, phantom):
    data, _ = phantom
    data = data.copy()
    data[0, 0, :] = np.nan
    save_nifti(tmp_path / "d" / "partnan.nii.gz", data, ras_affine())
    s = run_slice("nifti", tmp_path / "d", cfg_for(tmp_path / "w"), log=quiet)
    assert s.processed == 1
    vol = np.load(tmp_path / "w" / read_manifest(tmp_path / "w/manifests/volumes.parquet")["volume_path"][0])
    assert np.isfinite(vol.astype(np.float32)).all()


def test_missing_label_file_leaves_the_image_sliced_without_labels(tmp_path: Path, phantom):
    data, label = phantom
    aff = ras_affine()
    task = write_msd_task(tmp_path / "d", "Task02_Two", {"a_1": (data, aff, label), "a_2": (data, aff, label)})
    (task / "labelsTr" / "a_2.nii.gz").unlink()
    s = run_slice("msd", task, cfg_for(tmp_path / "w"), log=quiet)
    assert s.processed == 2 and s.errors == 0
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet").set_index("source_path")
    a2 = vols.loc["imagesTr/a_2.nii.gz"]
    assert pd.isna(a2["label_volume_path"]) and "a_2.nii.gz" in a2["notes"] and "missing" in a2["notes"]
    assert vols.loc["imagesTr/a_1.nii.gz"]["label_volume_path"] is not None


def test_cli_exit_codes(tmp_path: Path, phantom):
    from typer.testing import CliRunner

    from med3dinsight.curate import app

    data, _ = phantom
    root = tmp_path / "data"
    _write_bad_inputs(root, data)
    runner = CliRunner()
    args = ["slice", "--dataset", "nifti", "--root", str(root), "--workdir", str(tmp_path / "w"), "--grid-size", str(G)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "errors" in res.output
    res = runner.invoke(app, [*args, "--strict"])
    assert res.exit_code == 1
    (root / "good.nii.gz").unlink()
    res = runner.invoke(app, [*args[:-4], "--workdir", str(tmp_path / "w2"), "--grid-size", str(G)])
    assert res.exit_code == 1  # nothing succeeded


def _tree_digest(workdir: Path) -> dict[str, str]:
    out = {}
    for p in sorted((workdir / "volumes").rglob("*")):
        if p.is_file() and p.suffix in (".npy", ".zst"):
            out[p.relative_to(workdir).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _make_cases(root: Path, n: int = 4) -> None:
    cases = {}
    for k in range(n):
        data, label = phantom_ras(seed=k)
        cases[f"case_{k}"] = (np.roll(data, k, axis=0), ras_affine(), np.roll(label, k, axis=0))
    write_msd_task(root, "Task03_Many", cases)


def test_resume_reproduces_uninterrupted_run(tmp_path: Path):
    _make_cases(tmp_path / "d")
    task = tmp_path / "d" / "Task03_Many"
    full = run_slice("msd", task, cfg_for(tmp_path / "full"), log=quiet)
    assert full.processed == 4
    # "interrupted": only half the volumes got done, then a leftover temp file from a kill
    part = run_slice("msd", task, cfg_for(tmp_path / "res", shard=(0, 2)), log=quiet)
    assert part.processed == 2
    lines: list[str] = []
    resumed = run_slice("msd", task, cfg_for(tmp_path / "res"), log=lines.append)
    assert resumed.skipped == 2 and resumed.processed == 2
    assert any("resuming" in ln for ln in lines)
    assert _tree_digest(tmp_path / "full") == _tree_digest(tmp_path / "res")
    for name in ("volumes.parquet", "slices.parquet"):
        a = read_manifest(tmp_path / "full/manifests" / name)
        b = read_manifest(tmp_path / "res/manifests" / name)
        pd.testing.assert_frame_equal(a, b)
    again = run_slice("msd", task, cfg_for(tmp_path / "res"), log=quiet)
    assert again.skipped == 4 and again.processed == 0


def test_a_workdir_sliced_before_keeps_its_volumes_and_pngs(tmp_path: Path):
    """Volumes sliced by an earlier version (slice rows in slices.parquet, a 1 mm display volume
    placed by an integer display_offset) are resumed, not redone: same manifests, same PNGs."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.slicing.render import render_slice

    _make_cases(tmp_path / "d")
    task = tmp_path / "d" / "Task03_Many"
    w = tmp_path / "w"
    run_slice("msd", task, cfg_for(w), log=quiet)
    vol_dirs = sorted((w / "volumes").iterdir())
    for vdir in vol_dirs:  # rewrite each volume folder as the earlier version left it
        rows = json.loads((vdir / "slices.json").read_text())
        pq.write_table(pa.Table.from_pylist(rows), vdir / "slices.parquet")
        (vdir / "slices.json").unlink()
        rec = json.loads((vdir / "record.json").read_text())
        origin = rec.pop("display_origin_mm")
        rec["display_offset"] = [round(o / s) for o, s in zip(origin, rec["display_spacing"])]
        (vdir / "record.json").write_text(json.dumps(rec))
    before = read_manifest(w / "manifests/slices.parquet")
    again = run_slice("msd", task, cfg_for(w), log=quiet)
    assert again.skipped == 4 and again.processed == 0
    pd.testing.assert_frame_equal(read_manifest(w / "manifests/slices.parquet"), before)
    vols = read_manifest(w / "manifests/volumes.parquet")
    v = vols.iloc[0].to_dict()
    assert v["display_origin_mm"] is None and list(v["display_offset"])
    rel, sha = render_slice(w, v, "axial", G // 2, size=48)  # the legacy geometry renders
    assert (w / rel).exists() and render_slice(w, v, "axial", G // 2, size=48)[1] == sha


def test_shards_then_merge_equal_single_run(tmp_path: Path):
    _make_cases(tmp_path / "d", n=3)
    task = tmp_path / "d" / "Task03_Many"
    run_slice("msd", task, cfg_for(tmp_path / "one"), log=quiet)
    for i in range(2):
        run_slice("msd", task, cfg_for(tmp_path / "sh", shard=(i, 2)), log=quiet)
    assert not (tmp_path / "sh/manifests/volumes.parquet").exists()
    merge_shards(tmp_path / "sh")
    # another dataset sliced into the same workdir survives a later merge
    data, _ = phantom_ras(seed=9)
    save_nifti(tmp_path / "other" / "x.nii.gz", data, ras_affine())
    run_slice("nifti", tmp_path / "other", cfg_for(tmp_path / "sh"), log=quiet)
    merge_shards(tmp_path / "sh")
    merged = read_manifest(tmp_path / "sh/manifests/volumes.parquet")
    assert set(merged["dataset"]) == {"msd", "nifti"}
    merged_slices = read_manifest(tmp_path / "sh/manifests/slices.parquet")
    assert set(merged_slices["volume_id"]) == set(merged["volume_id"])
    # the single-run comparison below is about the msd rows
    msd_ids = set(merged[merged["dataset"] == "msd"]["volume_id"])
    for name in ("volumes.parquet", "slices.parquet"):
        a = read_manifest(tmp_path / "one/manifests" / name)
        b = read_manifest(tmp_path / "sh/manifests" / name)
        b = b[b["volume_id"].isin(msd_ids)].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)


def test_workers_match_serial(tmp_path: Path):
    _make_cases(tmp_path / "d", n=2)
    task = tmp_path / "d" / "Task03_Many"
    run_slice("msd", task, cfg_for(tmp_path / "s"), log=quiet)
    run_slice("msd", task, cfg_for(tmp_path / "p", workers=2), log=quiet)
    assert _tree_digest(tmp_path / "s") == _tree_digest(tmp_path / "p")


class _ShippingExecutor(Executor):
    """Another executor for the same step: items last-first, the step and each item shipped
    through pickle (as to a Ray task or an array job), results back through pickle."""

    def imap(self, step, items):
        shipped = pickle.loads(pickle.dumps(step))
        for item in reversed(items):
            yield item, pickle.loads(pickle.dumps(shipped(pickle.loads(pickle.dumps(item)))))


class _CrashFirstExecutor(Executor):
    """In process, but the first item's "worker" dies."""

    def imap(self, step, items):
        for k, item in enumerate(items):
            yield item, (RuntimeError("boom") if k == 0 else step(item))


def test_another_executor_runs_the_same_step_to_the_same_outputs(tmp_path: Path):
    _make_cases(tmp_path / "d", n=3)
    task = tmp_path / "d" / "Task03_Many"
    local = run_slice("msd", task, cfg_for(tmp_path / "local"), log=quiet, executor=LocalExecutor(1))
    progress: list[tuple[int, int]] = []
    other = run_slice("msd", task, cfg_for(tmp_path / "other"), log=quiet, executor=_ShippingExecutor(),
                      on_progress=lambda done, total, name: progress.append((done, total)))
    assert local.processed == other.processed == 3 and progress == [(1, 3), (2, 3), (3, 3)]
    assert _tree_digest(tmp_path / "local") == _tree_digest(tmp_path / "other")
    for name in ("volumes.parquet", "slices.parquet"):
        pd.testing.assert_frame_equal(read_manifest(tmp_path / "local/manifests" / name),
                                      read_manifest(tmp_path / "other/manifests" / name))
    # the step's resume check sees what the other executor wrote
    step = SliceStep(cfg_for(tmp_path / "other"))
    specs, _ = discover("msd", task)
    assert all(step.done(spec) for spec in specs)


def test_a_crashed_worker_is_an_error_row_and_the_run_goes_on(tmp_path: Path):
    _make_cases(tmp_path / "d", n=3)
    task = tmp_path / "d" / "Task03_Many"
    lines: list[str] = []
    s = run_slice("msd", task, cfg_for(tmp_path / "w"), log=lines.append, executor=_CrashFirstExecutor())
    assert (s.processed, s.errors) == (2, 1)
    assert s.error_lines[0].endswith("worker failed (RuntimeError: boom)")
    assert lines == [f"error: {s.error_lines[0]}"]
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet")
    assert sorted(vols["status"]) == ["error", "ok", "ok"]
    again = run_slice("msd", task, cfg_for(tmp_path / "w"), log=quiet)  # the crashed one is redone
    assert (again.skipped, again.processed, again.errors) == (2, 1, 0)


def test_4d_multichannel_gives_one_volume_per_channel(tmp_path: Path, phantom):
    data, label = phantom
    four = np.stack([data, data * 0.5 + 10], axis=-1)
    task = write_msd_task(
        tmp_path / "d", "Task01_BrainTumour", {"b_1": (four, ras_affine(), label)}, modality={"0": "FLAIR", "1": "T1w"}
    )
    s = run_slice("msd", task, cfg_for(tmp_path / "w"), log=quiet)
    assert s.processed == 2
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet").sort_values("channel")
    assert list(vols["channel_name"]) == ["FLAIR", "T1w"]
    assert set(vols["modality"]) == {"MR"} and vols["case_id"].nunique() == 1
    again = run_slice("msd", task, cfg_for(tmp_path / "w"), log=quiet)
    assert again.skipped == 1 and again.processed == 0


def test_3dseg8_discovers_every_layout(tmp_path: Path, phantom):
    data, label = phantom
    aff = ras_affine()
    root = tmp_path / "3dseg8"
    write_msd_task(root, "Task09_Spleen", {"spleen_1": (data, aff, label)})
    save_nifti(root / "LiTS" / "volume-0.nii", data - 1000, aff)
    save_nifti(root / "LiTS" / "segmentation-0.nii", label, aff)
    case = root / "BraTS2020" / "BraTS20_Training_001"
    for mod in ("flair", "t1", "t1ce", "t2"):
        save_nifti(case / f"BraTS20_Training_001_{mod}.nii.gz", data, aff)
    save_nifti(case / "BraTS20_Training_001_seg.nii.gz", label, aff)
    save_nifti(root / "MRBrainS18" / "images" / "070.nii.gz", data, aff)
    save_nifti(root / "MRBrainS18" / "label" / "070.nii.gz", label, aff)
    save_nifti(root / "Heart" / "img" / "h1.nii.gz", data, aff)
    (root / "train.txt").write_text("Heart/img/h1.nii.gz\n")
    save_nifti(root / "KiTS19" / "case_00000" / "imaging.nii.gz", data - 1000, aff)
    save_nifti(root / "KiTS19" / "case_00000" / "segmentation.nii.gz", label, aff)
    s = run_slice("3dseg8", root, cfg_for(tmp_path / "w"), log=quiet)
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet")
    assert s.errors == 0, vols["error"].dropna().tolist()
    by_subset = vols.groupby("subset")["volume_id"].count().to_dict()
    assert by_subset == {"BraTS2020": 4, "Heart": 1, "KiTS19": 1, "LiTS": 1, "MRBrainS18": 1, "Task09_Spleen": 1}
    kits = vols[vols["subset"] == "KiTS19"].iloc[0]
    assert kits["modality"] == "CT" and kits["label_volume_path"] is not None
    lits = vols[vols["subset"] == "LiTS"].iloc[0]
    assert lits["modality"] == "CT" and lits["body_region"] == "abdomen"
    brats = vols[vols["subset"] == "BraTS2020"]
    assert set(brats["channel_name"]) == {"FLAIR", "T1", "T1CE", "T2"} and brats["case_id"].nunique() == 1
    assert vols[vols["subset"] == "Heart"]["modality"].iloc[0] == "MR"
    # no raw case names in ids
    assert not vols["volume_id"].str.contains("BraTS20_Training_001").any()
    assert not vols["case_id"].str.contains("spleen_1").any()


def test_render_is_deterministic_and_recorded(tmp_path: Path, phantom):
    data, _ = phantom
    save_nifti(tmp_path / "d" / "ph.nii.gz", data, ras_affine())
    run_slice("nifti", tmp_path / "d", cfg_for(tmp_path / "w", render_all=True, render_size=64), log=quiet)
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet")
    slices = read_manifest(tmp_path / "w/manifests/slices.parquet")
    pngs = sorted((tmp_path / "w/cache/png/64").rglob("*.png"))
    assert len(pngs) == len(slices)
    first = {p: p.read_bytes() for p in pngs[:5]}
    for p in first:
        p.unlink()
    out = render_slices(tmp_path / "w", slices.head(5), vols, size=64)
    for rel, sha in zip(out["image_path"], out["image_sha256"]):
        b = (tmp_path / "w" / rel).read_bytes()
        assert hashlib.sha256(b).hexdigest() == sha
    assert {p: p.read_bytes() for p in first} == first


def test_dicom_series_gives_the_same_slices_as_nifti(tmp_path: Path, phantom):
    from curation.sample.dicom_write import write_series

    data, _ = phantom
    aff = ras_affine(spacing=(1.0, 1.0, 2.0))
    task = write_msd_task(tmp_path / "nii", "Task00_CT", {"ph": (data, aff, None)}, modality={"0": "CT"})
    # LPS-stored axial series, files shuffled and InstanceNumbers disagreeing with position,
    # under a folder named after the patient (as exported by many PACS)
    lps, lps_aff = reorient(data, aff, "LPS")
    write_series(lps, lps_aff, tmp_path / "dcm" / "DOE^JOHN_12345" / "s1", modality="CT", shuffle=True,
                 instance_numbers="random", patient_name="DOE^JOHN", patient_id="12345")
    (tmp_path / "dcm" / "DOE^JOHN_12345" / "notes.txt").write_text("not dicom")
    run_slice("msd", task, cfg_for(tmp_path / "w1"), log=quiet)
    lines: list[str] = []
    s = run_slice("dicom", tmp_path / "dcm", cfg_for(tmp_path / "w2"), log=lines.append)
    assert s.processed == 1
    # the junk file gets a line, by a content id (a path may carry identifiers); the run goes on
    assert any("input-" in ln and "not a DICOM file" in ln for ln in lines)
    v1 = read_manifest(tmp_path / "w1/manifests/volumes.parquet").iloc[0]
    v2 = read_manifest(tmp_path / "w2/manifests/volumes.parquet").iloc[0]
    assert v2["modality"] == "CT" and v2["source_axcodes"] == "LPS"
    np.testing.assert_array_equal(np.load(tmp_path / "w1" / v1["volume_path"]), np.load(tmp_path / "w2" / v2["volume_path"]))
    np.testing.assert_array_equal(load_display(tmp_path / "w1" / v1["display_path"]), load_display(tmp_path / "w2" / v2["display_path"]))
    s1 = read_manifest(tmp_path / "w1/manifests/slices.parquet").drop(columns=["slice_id", "volume_id"])
    s2 = read_manifest(tmp_path / "w2/manifests/slices.parquet").drop(columns=["slice_id", "volume_id"])
    pd.testing.assert_frame_equal(s1, s2)
    for path in (tmp_path / "w2/manifests").glob("*.parquet"):
        blob = path.read_bytes()
        assert b"DOE" not in blob and b"12345" not in blob and b"JOHN" not in blob
    assert "DOE" not in "\n".join(lines)


def test_sample_data_end_to_end_through_the_cli(tmp_path: Path):
    """Real package-shipped volumes (nilearn MNI152 + masks, nibabel, pydicom) through the CLI."""
    from typer.testing import CliRunner

    from med3dinsight.curate import app

    runner = CliRunner()
    res = runner.invoke(app, ["sample-data", "--out", str(tmp_path / "data")])
    assert res.exit_code == 0, res.output
    w = str(tmp_path / "w")
    res = runner.invoke(app, ["slice", "--dataset", "3dseg8", "--root", str(tmp_path / "data/3dseg8"), "--workdir", w, "--grid-size", "64"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["slice", "--dataset", "dicom", "--root", str(tmp_path / "data/dicom"), "--workdir", w, "--grid-size", "64"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["query", "SELECT dataset, count(*) AS n FROM volumes WHERE status = 'ok' GROUP BY 1 ORDER BY 1", "--workdir", w, "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == ["dataset,n", "3dseg8,4", "dicom,3"]
    res = runner.invoke(app, ["query", "SELECT DISTINCT unnest(labels_present) AS l FROM slices ORDER BY 1", "--workdir", w, "--format", "json"])
    assert "grey matter" in res.output and "white matter" in res.output
    res = runner.invoke(app, ["stats", "--workdir", w])
    assert res.exit_code == 0 and "axial" in res.output
    res = runner.invoke(app, ["query", "SELEC nonsense", "--workdir", w])
    assert res.exit_code == 2


def test_dicom_body_part_sets_region_and_ct_display_window(tmp_path: Path, phantom):
    import pydicom

    from curation.sample.dicom_write import write_series

    data, _ = phantom
    files = write_series(data - 1000, ras_affine(), tmp_path / "dcm" / "s", modality="CT")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.BodyPartExamined = "CHEST"
        ds.save_as(f)
    run_slice("dicom", tmp_path / "dcm", cfg_for(tmp_path / "w"), log=quiet)
    v = read_manifest(tmp_path / "w/manifests/volumes.parquet").iloc[0]
    assert v["body_region"] == "chest"
    assert list(v["display_window"]) == [-1000.0, 400.0]


def test_unnamed_4d_time_series_keeps_its_first_volume(tmp_path: Path, phantom):
    data, _ = phantom
    series = np.stack([data + t for t in range(12)], axis=-1)  # e.g. fMRI: 12 time points
    save_nifti(tmp_path / "d" / "bold.nii.gz", series, ras_affine())
    s = run_slice("nifti", tmp_path / "d", cfg_for(tmp_path / "w"), log=quiet)
    assert s.processed == 1
    assert run_slice("nifti", tmp_path / "d", cfg_for(tmp_path / "w"), log=quiet).skipped == 1


def test_sample_data_rerun_keeps_files_so_slicing_resumes(tmp_path: Path):
    from curation.sample.sample_data import write_nibabel_subset

    root = tmp_path / "3dseg8"
    write_nibabel_subset(root)
    first = run_slice("3dseg8", root, cfg_for(tmp_path / "w"), log=quiet)
    assert first.processed == 3
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    write_nibabel_subset(root)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes
    again = run_slice("3dseg8", root, cfg_for(tmp_path / "w"), log=quiet)
    assert again.processed == 0 and again.skipped == 2  # anatomical.nii + the 4D file (2 channels)


def test_nifti_case_folders_and_flat_folders(tmp_path: Path, phantom):
    """KiTS-style case folders (imaging + segmentation) are one subject each, with their label;
    a flat images/ folder is one subject per file."""
    data, label = phantom
    aff = ras_affine()
    root = tmp_path / "kits19"
    for k in range(2):
        save_nifti(root / f"case_0000{k}" / "imaging.nii.gz", data - 1000, aff)
        save_nifti(root / f"case_0000{k}" / "segmentation.nii.gz", label, aff)
    save_nifti(root / "case_00002" / "t1.nii.gz", data, aff)
    save_nifti(root / "case_00002" / "t2.nii.gz", data * 0.5, aff)
    s = run_slice("nifti", root, cfg_for(tmp_path / "w"), log=quiet)
    assert s.processed == 4 and s.errors == 0
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet")
    assert vols["case_id"].nunique() == 3  # case_00002's t1 and t2 are one subject
    assert vols["label_volume_path"].notna().sum() == 2
    assert set(vols["subset"]) == {"kits19"}
    kits = vols[vols["label_volume_path"].notna()]
    assert set(kits["modality"]) == {"CT"} and set(kits["body_region"]) == {"abdomen"}
    flat = tmp_path / "flat"
    for k in range(3):
        save_nifti(flat / "images" / f"p{k}.nii.gz", data, aff)
    run_slice("nifti", flat, cfg_for(tmp_path / "w2"), log=quiet)
    assert read_manifest(tmp_path / "w2/manifests/volumes.parquet")["case_id"].nunique() == 3


def test_modality_and_body_region_overrides(tmp_path: Path, phantom):
    data, _ = phantom
    save_nifti(tmp_path / "d" / "x.nii.gz", data, ras_affine())
    run_slice("nifti", tmp_path / "d", cfg_for(tmp_path / "w", modality="CT", body_region="chest"), log=quiet)
    v = read_manifest(tmp_path / "w/manifests/volumes.parquet").iloc[0]
    assert (v["modality"], v["body_region"]) == ("CT", "chest")
    assert list(v["intensity_window"]) == [-1000.0, 1000.0] and list(v["display_window"]) == [-1000.0, 400.0]
