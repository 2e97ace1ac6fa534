"""Inputs you can trust: malformed collections, damaged workdirs, shape bombs, exact labels,
one line per fault."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import phantom_ras, ras_affine, save_nifti, write_msd_task

from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.render import display_volume
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.fsutil import WorkdirError
from curation.store.manifest import read_manifest
from curation.store.volume_store import StoreError

G = 24
ROOT = Path(__file__).resolve().parent.parent


def cfg_for(workdir: Path, **kw) -> SliceConfig:
    return SliceConfig(workdir=workdir, pre=PreprocessConfig(grid_size=G), **kw)


def _vols(w: Path):
    return read_manifest(w / "manifests/volumes.parquet")


def _run(root: Path, w: Path, dataset: str = "nifti", **kw):
    lines: list[str] = []
    s = run_slice(dataset, root, cfg_for(w, **kw), log=lines.append)
    return s, lines


# --------------------------------------------------------------------------- discovery


def test_malformed_dataset_json_is_one_line_and_other_collections_go_on(tmp_path: Path) -> None:
    data, label = phantom_ras()
    root = tmp_path / "seg8"
    write_msd_task(root, "Task01_Good", {"g": (data, ras_affine(), label)})
    bad = write_msd_task(root, "Task02_Bad", {"b": (data, ras_affine(), label)})
    (tmp_path / "secret.nii.gz").write_bytes((bad / "imagesTr/b.nii.gz").read_bytes())
    info = {"labels": ["background", "blob"], "modality": 7,
            "training": [None, {"image": 42}, {"image": "../../../secret.nii.gz"},
                         {"image": "./imagesTr/b.nii.gz", "label": ["x"]}]}
    (bad / "dataset.json").write_text(json.dumps(info))
    null_task = write_msd_task(root, "Task03_Null", {"n": (data, ras_affine(), label)})
    (null_task / "dataset.json").write_text("null")
    s, lines = _run(root, tmp_path / "w", "3dseg8")
    text = "\n".join(lines)
    assert s.processed == 3, text  # good task, the bad task's valid entry, the null task's folders
    for fault in ("'labels'", "'modality'", "training[0]", "training[1].image", "training[3].label",
                  "outside --root", "JSON NoneType"):
        assert fault in text, fault
    assert all("\n" not in ln for ln in lines) and "secret" not in "".join(_vols(tmp_path / "w")["source_path"])


def test_malformed_list_file_lines_are_named(tmp_path: Path) -> None:
    data, _ = phantom_ras()
    root = tmp_path / "seg8"
    save_nifti(root / "MRBrainS18" / "images" / "x.nii.gz", data, ras_affine())
    (root / "train.txt").write_text("MRBrainS18/images/x.nii.gz\n../../evil.nii.gz\na.nii.gz b.nii.gz c.nii.gz\n")
    s, lines = _run(root, tmp_path / "w", "3dseg8")
    text = "\n".join(lines)
    assert s.processed == 1 and "train.txt" in text and "line 2" in text and "line 3" in text


# --------------------------------------------------------------------------- resume


def test_resume_redoes_damaged_outputs_with_one_line(tmp_path: Path, caplog) -> None:
    root = tmp_path / "d"
    for k in range(4):
        data, label = phantom_ras(seed=k)
        save_nifti(root / f"c{k}" / "img.nii.gz", data, ras_affine())
    w = tmp_path / "w"
    _run(root, w)
    vols = _vols(w).sort_values("source_path").reset_index(drop=True)
    before = {p: p.read_bytes() for p in (w / "volumes").rglob("*.np*")}
    vdirs = [w / "volumes" / v for v in vols["volume_id"]]
    (vdirs[0] / "record.json").write_text("{not json")
    raw = (vdirs[1] / "volume.npy").read_bytes()
    (vdirs[1] / "volume.npy").write_bytes(raw[: len(raw) // 2])
    (vdirs[2] / "display.npy.zst").unlink()
    rows = (vdirs[3] / "slices.json").read_bytes()
    (vdirs[3] / "slices.json").write_bytes(rows[: len(rows) // 2])
    caplog.set_level("WARNING", logger="curation.slice")
    s, _ = _run(root, w)
    assert (s.processed, s.skipped) == (4, 0)
    redo = [r.getMessage() for r in caplog.records if "redoing" in r.getMessage()]
    assert len(redo) == 4 and any("record.json" in m for m in redo) and any("volume.npy" in m for m in redo)
    assert any("slices.json: damaged slice rows" in m for m in redo)
    assert {p: p.read_bytes() for p in (w / "volumes").rglob("*.np*")} == before


def test_later_stages_name_the_unreadable_array(tmp_path: Path) -> None:
    root = tmp_path / "d"
    data, _ = phantom_ras()
    save_nifti(root / "a.nii.gz", data, ras_affine())
    w = tmp_path / "w"
    _run(root, w)
    vol = _vols(w).iloc[0].to_dict()
    path = w / vol["display_path"]
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(StoreError, match="display.npy.zst"):
        display_volume(w, vol)
    path.unlink()
    with pytest.raises(StoreError, match="display.npy.zst: display volume is missing"):
        display_volume(w, vol)


# --------------------------------------------------------------------------- memory


def _shape_bomb(path: Path, gz: bool) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1200, 1200, 1200))
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(np.eye(4), code=1)
    blob = hdr.binaryblock + b"\0" * 4 + b"\0" * 1000
    path.write_bytes(gzip.compress(blob) if gz else blob)


def test_shape_bomb_is_an_error_row_with_bounded_memory(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    _shape_bomb(root / "bomb.nii", gz=False)
    _shape_bomb(root / "bombgz.nii.gz", gz=True)
    data, _ = phantom_ras()
    save_nifti(root / "ok.nii.gz", data, ras_affine())
    tracemalloc.start()
    s, lines = _run(root, tmp_path / "w", max_voxels=None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert s.processed == 1 and s.errors == 2 and peak < 300e6, peak
    errors = sorted(_vols(tmp_path / "w").dropna(subset=["error"])["error"])
    assert "bomb.nii: header declares" in errors[0] and "bombgz.nii.gz: header declares" in errors[1]
    # named root-relative, as in source_path: no absolute path (home folder, hospital mount) in a row or log
    assert errors[0].startswith("bomb.nii: ") and errors[1].startswith("bombgz.nii.gz: "), errors
    assert not any(str(tmp_path) in line for line in [*errors, *lines]), (errors, lines)
    s, _ = _run(root, tmp_path / "w2", max_voxels=1000)
    assert s.processed == 0 and any("over --max-voxels" in e for e in _vols(tmp_path / "w2")["error"])


# --------------------------------------------------------------------------- labels


def test_labels_kept_exactly_and_faults_blame_the_label(tmp_path: Path) -> None:
    data, label = phantom_ras()
    aff = ras_affine()
    big = (label > 0).astype(np.int32) * 70000
    frac = label.astype(np.float32) * 1.7
    nan = label.astype(np.float32)
    nan[0, 0, 0] = np.nan
    shifted = aff.copy()
    shifted[:3, 3] += 5.0
    task = write_msd_task(tmp_path / "d", "Task09_Labels", {
        "wide": (data, aff, big), "frac": (data, aff, frac), "nan": (data, aff, nan), "moved": (data, aff, label)})
    save_nifti(task / "labelsTr/moved.nii.gz", label, shifted)
    save_nifti(task / "imagesTr/flat.nii.gz", data[:, :, :1], aff)  # a 2D image with a 2D label
    save_nifti(task / "labelsTr/flat.nii.gz", label[:, :, :1], aff)
    info = json.loads((task / "dataset.json").read_text())
    info["training"].append({"image": "./imagesTr/flat.nii.gz", "label": "./labelsTr/flat.nii.gz"})
    (task / "dataset.json").write_text(json.dumps(info))
    s, _ = _run(task, tmp_path / "w", "msd")
    vols = _vols(tmp_path / "w").set_index("source_path")
    wide = vols.loc["imagesTr/wide.nii.gz"]
    lab = np.load(tmp_path / "w" / wide["label_volume_path"])
    assert set(np.unique(lab)) <= {0, 70000} and 70000 in lab
    rows = read_manifest(tmp_path / "w/manifests/slices.parquet")
    assert any("label_70000" in labs for labs in rows["labels_present"])
    for case, fault in (("frac", "non-integer"), ("nan", "NaN"), ("moved", "affine")):
        err = vols.loc[f"imagesTr/{case}.nii.gz"]["error"]
        assert f"labelsTr/{case}.nii.gz: label has {fault}" in err or (f"labelsTr/{case}.nii.gz" in err and fault in err), err
    flat = vols.loc["imagesTr/flat.nii.gz"]["error"]
    assert "imagesTr/flat.nii.gz: 2D image" in flat and "labelsTr" not in flat


# --------------------------------------------------------------------------- one line


def test_newline_in_a_file_name_and_library_warnings_stay_one_line(tmp_path: Path, caplog) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "bad\nname.nii.gz").write_bytes(b"not gzip at all")
    img = nib.Nifti1Image(phantom_ras()[0], None)
    img.header["pixdim"][1:4] = [-1.0, 1.0, 1.0]
    nib.save(img, str(root / "pixdim.nii"))
    caplog.set_level("WARNING", logger="curation.slice")
    s, lines = _run(root, tmp_path / "w")
    err = _vols(tmp_path / "w").dropna(subset=["error"])["error"].iloc[0]
    assert "\n" not in err and "bad\\nname.nii.gz" in err
    warned = [r.getMessage() for r in caplog.records]
    assert any("pixdim.nii: pixdim[1,2,3] should be positive" in m for m in warned), warned


def _curate(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from med3dinsight.common import main; from med3dinsight.curate import app; main(app)"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "40", "HOME": "/tmp"}, timeout=300)


def test_filesystem_faults_are_one_line_and_a_nonzero_exit(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "d"
    data, _ = phantom_ras()
    save_nifti(root / "a_rather_long_file_name_that_would_wrap_at_forty_columns.nii.gz", data, ras_affine())
    (tmp_path / "wfile").write_text("I am a file")
    res = _curate("slice", "--dataset", "nifti", "--root", str(root), "--workdir", str(tmp_path / "wfile"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "wfile" in line[0] and "not a folder" in line[0], res.stderr
    # disk full while writing a volume: the run stops with one line, manifests stay as they were
    w = tmp_path / "w"
    _run(root, w)
    manifest = (w / "manifests/volumes.parquet").read_bytes()
    save_nifti(root / "b.nii.gz", data[::-1].copy(), ras_affine())
    import curation.slicing.step as step

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(step, "save_npy", full)
    with pytest.raises(WorkdirError, match="No space left on device"):
        _run(root, w)
    assert (w / "manifests/volumes.parquet").read_bytes() == manifest


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "u1", "<f4", ">f8", "<u2"])
def test_gz_voxels_read_as_nibabel_reads_them(tmp_path: Path, dtype: str) -> None:
    """The inflate-into-the-array reader returns nibabel's values, type and shape, scaled files
    fall back to nibabel, and a file cut short is one line naming it."""
    from curation.imageio.volume_io import VolumeError, load_nifti

    rng = np.random.default_rng(3)
    data = (rng.random((21, 17, 9)) * 200).astype(dtype)
    img = nib.Nifti1Image(data, ras_affine())
    img.header.set_data_dtype(np.dtype(dtype))
    path = tmp_path / "v.nii.gz"
    nib.save(img, str(path))
    ref = np.asarray(nib.load(str(path)).dataobj)
    got = load_nifti(path).data
    if ref.dtype.kind == "f":
        ref = ref.astype(np.float32)
    assert got.dtype.kind == ref.dtype.kind and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    # a scaled file (slope/intercept) is nibabel's get_fdata
    scaled = nib.Nifti1Image(data.astype(np.int16), ras_affine())
    scaled.header.set_slope_inter(0.5, -3.0)
    nib.save(scaled, str(tmp_path / "s.nii.gz"))
    np.testing.assert_allclose(load_nifti(tmp_path / "s.nii.gz").data, nib.load(str(tmp_path / "s.nii.gz")).get_fdata())
    # truncated: the header is whole, the voxels are not
    raw = gzip.decompress(path.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw[: len(raw) - 100]))
    with pytest.raises(VolumeError, match=r"cut\.nii\.gz: cannot read image"):
        load_nifti(cut)


def test_damaged_manifests_are_rebuilt_from_the_volume_records(tmp_path: Path) -> None:
    """Truncated volumes.parquet and slices.parquet: the next `curate slice` says so in one line
    each and rebuilds both, other datasets of the workdir included (from their volume folders)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for k in range(2):
        data, _ = phantom_ras(seed=k)
        save_nifti(a / f"x{k}.nii.gz", data, ras_affine())
    data, label = phantom_ras(seed=5)
    write_msd_task(b, "Task02_Heart", {"h0": (data, ras_affine(), label)})
    w = tmp_path / "w"
    _run(a, w)
    _run(b / "Task02_Heart", w, dataset="msd")
    before_v, before_s = _vols(w), read_manifest(w / "manifests/slices.parquet")
    assert set(before_v["dataset"]) == {"nifti", "msd"}
    for name in ("volumes.parquet", "slices.parquet"):
        path = w / "manifests" / name
        path.write_bytes(path.read_bytes()[:200])
    lines: list[str] = []
    s = run_slice("nifti", a, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=G)), log=lines.append)
    assert s.skipped == 2 and s.processed == 0
    damaged = [ln for ln in lines if "unreadable" in ln]
    assert len(damaged) == 2 and all("rebuilt from the volume records" in ln for ln in damaged)
    cols = ["volume_id", "dataset", "status", "volume_path", "n_slices"]
    after_v = _vols(w)
    assert after_v.sort_values("volume_id")[cols].reset_index(drop=True).equals(
        before_v.sort_values("volume_id")[cols].reset_index(drop=True))
    after_s = read_manifest(w / "manifests/slices.parquet")
    assert sorted(after_s["slice_id"]) == sorted(before_s["slice_id"])
    # a later stage meeting a damaged manifest says which file and what to do, in one line
    from curation.store.manifest import ManifestError

    path = w / "manifests" / "slices.parquet"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ManifestError, match=r"slices\.parquet: unreadable manifest .*rerun `curate slice`"):
        read_manifest(path)
