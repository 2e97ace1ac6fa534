"""Hostile inputs (issue 22): compression bombs in NIfTI headers, FIFOs where files are expected,
undecodable file names, links out of --root, release rows that point out of the workdir.
Each is one line, recorded, and the rest of the run goes on."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import phantom_ras, ras_affine, save_nifti

from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.manifest import read_manifest, write_manifest

G = 24
ROOT = Path(__file__).resolve().parent.parent


def _run(dataset: str, root: Path, w: Path, **kw):
    lines: list[str] = []
    s = run_slice(dataset, root, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=G), **kw), log=lines.append)
    return s, lines


def _vols(w: Path) -> pd.DataFrame:
    return read_manifest(w / "manifests/volumes.parquet")


# --------------------------------------------------------------------------- compression bombs

ZEROS_64M = None


def _extension_bomb(path: Path, esize: int, vox_offset: int) -> None:
    """A 4^3 uint8 .nii.gz whose one header extension declares ``esize`` bytes, inflated from
    about 1 KB per 1 MB of zeros (repeated gzip members: ~1 MB on disk per GB inflated)."""
    global ZEROS_64M
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(np.eye(4), code=1)
    hdr["vox_offset"] = vox_offset
    head = hdr.binaryblock + b"\x01\x00\x00\x00" + struct.pack("<ii", esize, 0)
    if ZEROS_64M is None:
        ZEROS_64M = gzip.compress(b"\x00" * (64 << 20), compresslevel=9, mtime=0)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(head, mtime=0))
        for _ in range(esize // (64 << 20) + 1):
            fh.write(ZEROS_64M)


LOAD_AND_MEASURE = """
import json, resource, sys, time
from curation.imageio.volume_io import VolumeError, load_nifti
out = []
for path in sys.argv[1:]:
    t0 = time.perf_counter()
    try:
        load_nifti(path)
        err = None
    except VolumeError as exc:
        err = str(exc)
    out.append({"error": err, "seconds": time.perf_counter() - t0})
try:  # this process's own peak (ru_maxrss may carry the forking parent's over exec)
    peak = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": out, "maxrss_kb": peak}))
"""


def test_header_extension_bombs_are_stopped_while_inflating(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    gib = 1 << 30
    # the extension runs to a data offset 1 GiB in; an extension larger than the room before
    # the data (nibabel then reads to the end of the stream); a chain of 48 MiB extensions
    _extension_bomb(root / "offset.nii.gz", gib - 352, gib)
    _extension_bomb(root / "overrun.nii.gz", gib, 352 + 32)
    _extension_bomb(root / "negative.nii.gz", -64, 352 + 32)
    assert (root / "offset.nii.gz").stat().st_size < 2 << 20
    files = [str(root / n) for n in ("offset.nii.gz", "overrun.nii.gz", "negative.nii.gz")]
    res = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, *files], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    for path, r in zip(files, report["results"]):
        assert r["error"] and r["error"].startswith(path), r
        assert "refused" in r["error"] and "\n" not in r["error"], r
        assert r["seconds"] < 5, r
    assert report["maxrss_kb"] < 400_000, report  # never near the GiB the headers ask for
    # in a run: error rows, and the good volume beside them is sliced
    data, _ = phantom_ras()
    save_nifti(root / "ok.nii.gz", data, ras_affine())
    s, lines = _run("nifti", root, tmp_path / "w")
    assert s.processed == 1 and s.errors == 3, lines
    errors = _vols(tmp_path / "w").dropna(subset=["error"])
    assert set(errors["status"]) == {"error"} and errors["error"].str.contains("refused").all()


# --------------------------------------------------------------------------- FIFOs

SLICE_IN_CHILD = """
import json, sys
from pathlib import Path
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice
lines = []
s = run_slice(sys.argv[1], Path(sys.argv[2]), SliceConfig(workdir=Path(sys.argv[3]), pre=PreprocessConfig(grid_size=24)),
              log=lines.append)
print(json.dumps({"processed": s.processed, "errors": s.errors, "lines": lines}))
"""


def _slice_in_child(dataset: str, root: Path, w: Path) -> dict:
    """A run in a child process: a FIFO opened by mistake would block it, not the test run."""
    res = subprocess.run([sys.executable, "-c", SLICE_IN_CHILD, dataset, str(root), str(w)], cwd=ROOT,
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_fifos_where_files_are_expected_do_not_hang(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    data, _ = phantom_ras()
    os.mkfifo(root / "pipe.nii.gz")  # a volume
    save_nifti(root / "ok.nii.gz", data, ras_affine())
    os.mkfifo(root / "ok_seg.nii.gz")  # its label
    nib.save(nib.AnalyzeImage(data.astype(np.int16), ras_affine()), str(root / "pair.img"))
    os.unlink(root / "pair.hdr")
    os.mkfifo(root / "pair.hdr")  # the header half of an Analyze pair
    os.mkfifo(root / "list.txt")  # a 3DSeg-8 list file
    os.mkfifo(root / "dataset.json")
    out = _slice_in_child("nifti", root, tmp_path / "w")
    text = "\n".join(out["lines"])
    assert out["processed"] == 1, out
    assert "pipe.nii.gz: image file is a FIFO (named pipe), not a regular file" in text, text
    assert "pair.hdr" in text and "FIFO" in text
    vols = _vols(tmp_path / "w")
    assert vols.loc[vols["status"] == "ok", "label_path"].isna().all()  # the FIFO label was not used
    errors = " ".join(vols.loc[vols["status"] == "error", "error"])  # recorded where a volume was expected
    assert "pipe.nii.gz: image file is a FIFO" in errors and "pair.hdr: image file is a FIFO" in errors, errors
    out = _slice_in_child("3dseg8", root, tmp_path / "w2")
    assert out["processed"] == 1 and any("list.txt" in ln for ln in out["lines"]), out
    task = tmp_path / "Task09_Spleen"
    save_nifti(task / "imagesTr" / "s_1.nii.gz", data, ras_affine())
    os.mkfifo(task / "imagesTr" / "s_2.nii.gz")
    os.mkfifo(task / "dataset.json")
    out = _slice_in_child("msd", task, tmp_path / "w3")
    assert out["processed"] == 1 and out["errors"] == 1, out
    assert any("s_2.nii.gz: image file is a FIFO" in ln for ln in out["lines"]), out


def test_fifo_label_named_directly_is_one_line(tmp_path: Path) -> None:
    from curation.imageio.labels import header_shape
    from curation.imageio.volume_io import VolumeError, load_nifti

    os.mkfifo(tmp_path / "lab.nii.gz")
    with pytest.raises(VolumeError, match="lab.nii.gz: label file is a FIFO"):
        header_shape(tmp_path / "lab.nii.gz")
    with pytest.raises(VolumeError, match="image file is a FIFO"):
        load_nifti(tmp_path / "lab.nii.gz")


# --------------------------------------------------------------------------- names and links


def test_undecodable_file_name_is_one_escaped_line_and_the_run_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "d"
    data, _ = phantom_ras()
    save_nifti(root / "ok.nii.gz", data, ras_affine())
    blob = (root / "ok.nii.gz").read_bytes()
    raw = os.fsencode(root) + b"/bad\xff\xfename.nii.gz"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, blob)
    os.close(fd)
    os.mkdir(os.fsencode(root) + b"/dir\xe9")
    s, lines = _run("nifti", root, tmp_path / "w")
    assert s.processed == 1, lines
    bad = [ln for ln in lines if "bad\\xff\\xfename.nii.gz" in ln]
    assert len(bad) == 1 and "not valid UTF-8" in bad[0], lines
    assert any("dir\\xe9" in ln for ln in lines), lines
    for ln in lines:
        ln.encode("utf-8")  # printable: no surrogates left
    assert list(_vols(tmp_path / "w")["source_path"]) == ["ok.nii.gz"]


def _outside(tmp_path: Path) -> Path:
    secret = tmp_path / "Doe_John_outside"
    data, _ = phantom_ras(seed=3)
    save_nifti(secret / "scan.nii.gz", data, ras_affine())
    save_nifti(secret / "sub" / "more.nii.gz", data[::-1].copy(), ras_affine())
    return secret


@pytest.mark.parametrize("dataset", ["nifti", "3dseg8"])
def test_links_out_of_root_are_not_followed(tmp_path: Path, dataset: str) -> None:
    from curation.report.html import build_report

    secret = _outside(tmp_path)
    root = tmp_path / "d"
    data, _ = phantom_ras()
    save_nifti(root / "ok.nii.gz", data, ras_affine())
    os.symlink(secret / "scan.nii.gz", root / "link.nii.gz")
    os.symlink(secret / "sub", root / "linked_dir")
    os.symlink(root / "ok.nii.gz", root / "inside_link.nii.gz")  # inside: fine
    (root / "list.txt").write_text("link.nii.gz\nlinked_dir/more.nii.gz\n")
    w = tmp_path / "w"
    s, lines = _run(dataset, root, w)
    text = "\n".join(lines)
    assert "link.nii.gz: link to a file outside --root; not followed" in text, text
    assert "linked_dir: link to a folder outside --root; not followed" in text, text
    vols = _vols(w)
    assert not vols["source_path"].str.contains("^link.nii.gz|linked_dir|scan|more", regex=True).any(), vols
    assert s.processed == len(vols) and "ok.nii.gz" in set(vols["source_path"])
    build_report(w, size=32)
    for p in w.rglob("*"):
        if p.is_file() and p.suffix in (".html", ".json", ".parquet"):
            assert b"Doe_John_outside" not in p.read_bytes(), p


# --------------------------------------------------------------------------- curate export


def test_export_packs_only_files_inside_the_workdir(tmp_path: Path) -> None:
    from curation.report.release_export import export_release

    w = tmp_path / "w"
    png = w / "cache/png/64/v/axial_1.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG fake")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"SECRET-BYTES")
    os.symlink(secret, png.parent / "axial_2.png")
    os.mkfifo(png.parent / "axial_5.png")
    paths = ["cache/png/64/v/axial_1.png", str(secret), "../secret.png", "cache/png/64/v/axial_2.png",
             "cache/png/64/v/../../../../../secret.png", "cache/png/64/v/axial_5.png"]
    df = pd.DataFrame({"slice_id": [f"v:axial:{i}" for i in range(len(paths))], "split": "train",
                       "caption": "a slice", "refused": False, "image_path": paths, "image_sha256": "x"})
    write_manifest(df, w / "manifests/v1.parquet")
    for fmt in ("webdataset", "csv"):
        result = export_release(w, None, fmt)
        assert result.rows["train"] == 1, result.errors
        assert len(result.errors) == 5 and all("\n" not in e for e in result.errors)
        assert all(str(secret) not in e for e in result.errors), result.errors
        for f in result.files:
            assert b"SECRET-BYTES" not in f.read_bytes() and b"secret.png" not in f.read_bytes()
