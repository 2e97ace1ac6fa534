"""DICOM discovery against hostile and odd files: implausible frame counts, broken encapsulation,
fuzzed headers, undecodable file names; and the header scanner agreeing with pydicom."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from curation.dicom import discover
from curation.dicom.load import find_series, load_series
from curation.sample.dicom_write import write_multiframe, write_series

AFFINE = np.diag([-0.8, -0.8, 2.0, 1.0])
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DATA_STORE = Path(pydicom.__file__).parent.parent / "data_store" / "data"


def _volume(shape=(8, 6, 5), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 500, size=shape).astype(np.float64)


def _good_series(folder: Path) -> list[Path]:
    return write_series(_volume(), AFFINE, folder, modality="MR", seed=1)


def _edit(path: Path, **values) -> Path:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


@pytest.mark.parametrize("frames", [100_000, 1_000_000])
def test_frames_that_cannot_fit_are_one_line_and_the_run_goes_on(tmp_path: Path, frames: int) -> None:
    data = tmp_path / "data"
    _good_series(data / "good")
    bad = write_series(_volume((8, 8, 1)), AFFINE, data / "bad", seed=2)[0]
    _edit(bad, NumberOfFrames=frames)
    assert bad.stat().st_size < 2000
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    found = find_series(data, cache_dir=cache, workers=1)
    assert time.perf_counter() - t0 < 5
    assert len(found) == 1 and len(found[0].files) == 5
    reasons = dict(found.skipped)
    assert list(reasons) == [bad]
    line = reasons[bad]
    assert line.startswith(f"implausible header: {frames} frame(s) of 8x8") and "the file holds 128 bytes" in line
    assert "\n" not in line
    assert (cache / "dicom_headers.sqlite").stat().st_size < 100_000  # no per-frame index entry
    t0 = time.perf_counter()
    again = find_series(data, cache_dir=cache, workers=1)
    assert time.perf_counter() - t0 < 5 and dict(again.skipped) == reasons


def test_enhanced_frames_must_match_their_functional_groups(tmp_path: Path) -> None:
    path = write_multiframe(_volume(), AFFINE, tmp_path / "mf.dcm", modality="MR")
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 100_000
    ds.PixelData = ds.PixelData * 20_000  # enough bytes: only the functional groups disagree
    ds.save_as(path)
    found = find_series(tmp_path, workers=1)
    assert list(found) == []
    why = "implausible header: 100000 frame(s) declared, 5 per-frame functional group item(s)"
    assert found.skipped == [(path, why)]


def _jpeg_file(path: Path, frames: int, fragments: int, offsets: bool = False) -> Path:
    ds = pydicom.dcmread(write_series(_volume((8, 8, 1)), AFFINE, path.parent / "tmp", seed=3)[0])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(30) + b"\xff\xd9"] * fragments, has_bot=offsets)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    for p in (path.parent / "tmp").iterdir():
        p.unlink()
    (path.parent / "tmp").rmdir()
    return path


def test_compressed_frames_must_match_fragments_and_offsets(tmp_path: Path) -> None:
    few = _jpeg_file(tmp_path / "few.dcm", frames=1000, fragments=3)
    table = _jpeg_file(tmp_path / "table.dcm", frames=4, fragments=5, offsets=True)
    fine = _jpeg_file(tmp_path / "fine.dcm", frames=3, fragments=3, offsets=True)
    reasons = dict(find_series(tmp_path, workers=1).skipped)
    assert reasons[few] == "implausible header: 1000 frame(s) declared, the compressed pixel data holds 3 fragment(s)"
    assert reasons[table] == "implausible header: 4 frame(s) declared, the pixel data's offset table lists 5"
    assert fine not in reasons


def test_fuzzed_headers_never_stop_discovery(tmp_path: Path) -> None:
    good = _good_series(tmp_path / "good")
    original = write_series(_volume(seed=5), AFFINE, tmp_path / "src", seed=5)[0].read_bytes()  # another series
    for p in (tmp_path / "src").iterdir():
        p.unlink()
    rng = random.Random(7)
    fuzz = tmp_path / "fuzz"
    fuzz.mkdir()
    for n in range(150):
        data = bytearray(original)
        if n % 3 == 0:
            data = data[: rng.randrange(132, len(data))]
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(128, len(data))] = rng.randrange(256)
        if n % 5 == 0 and len(data) > 140:  # an undefined length where a value length was
            at = rng.randrange(132, len(data) - 4)
            data[at:at + 4] = b"\xff\xff\xff\xff"
        (fuzz / f"f{n:03d}").write_bytes(bytes(data))
    t0 = time.perf_counter()
    found = find_series(tmp_path, workers=1)
    assert time.perf_counter() - t0 < 30
    assert any(sorted(s.files) == sorted(good) for s in found)
    assert all("\n" not in why for _, why in found.skipped)


def test_non_image_objects_and_dicomdir_are_set_aside_from_the_file_meta(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    _good_series(tmp_path / "good")
    names = {"sr": "1.2.840.10008.5.1.4.1.1.88.33", "pr": "1.2.840.10008.5.1.4.1.1.11.1",
             "ko": "1.2.840.10008.5.1.4.1.1.88.59", "DICOMDIR": "1.2.840.10008.1.3.10"}
    for name, sop in names.items():
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Modality = name.upper()
        ds.save_as(tmp_path / name, enforce_file_format=True)
    found = find_series(tmp_path, workers=1)
    reasons = {p.name: why for p, why in found.skipped}
    assert len(found) == 1 and set(reasons) == set(names)
    assert reasons["DICOMDIR"] == "DICOMDIR index, not an image"
    assert reasons["sr"] == "no pixel data (Comprehensive SR Storage)"
    assert reasons["pr"].startswith("no pixel data (") and reasons["ko"].startswith("no pixel data (")


def test_undecodable_file_names_do_not_stop_the_run(tmp_path: Path) -> None:
    paths = _good_series(tmp_path)
    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9_\xff.dcm")
    os.rename(paths[2], odd)
    junk = os.fsdecode(bytes(tmp_path) + b"/notes\xfe.txt")
    Path(junk).write_text("not dicom")
    for workers in (1, 2):
        found = find_series(tmp_path, workers=workers, cache_dir=tmp_path.parent / f"cache{workers}", id_key=b"k" * 32)
        assert len(found) == 1 and Path(odd) in found[0].files
        assert found.skipped == [(Path(junk), "not a DICOM file")]
        assert load_series(found[0]).data.shape == (8, 6, 5)


def test_many_files_use_the_worker_pool_and_agree_with_one_worker(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(discover, "PARALLEL_MIN_FILES", 4)
    monkeypatch.setattr(discover, "CHUNK", 3)
    for n in range(3):
        write_series(_volume(seed=n), AFFINE, tmp_path / f"s{n}", seed=n, patient_id=f"P{n}")
    (tmp_path / "junk.txt").write_text("x")
    one, two = find_series(tmp_path, workers=1), find_series(tmp_path, workers=2)
    def summary(found):
        return [(s.files, s.series_key, s.identifiers) for s in found]

    assert summary(one) == summary(two)
    assert one.skipped == two.skipped and len(one) == 3


def _corpus() -> list[Path]:
    files = [p for p in PYDICOM_FILES.rglob("*") if p.is_file()]
    return sorted(files + ([p for p in DATA_STORE.rglob("*") if p.is_file()] if DATA_STORE.is_dir() else []))


def test_scanner_reads_what_pydicom_reads() -> None:
    """The fast header scan gives the same summary, identity and SOP hash as a pydicom read on
    pydicom's own test files (odd encodings, private tags, broken files); only non-image objects,
    set aside from the file meta alone, are named by their SOP class instead of their Modality."""
    checked = 0
    for path in _corpus():
        fast, slow = discover._read_one(path), discover._read_one(path, fast=False)
        if fast[3].startswith("no pixel data (") and slow[3].startswith("no pixel data ("):
            continue
        assert fast == slow, path.name
        checked += fast[1] is not None
    assert checked >= 40


def _both_ways(series, monkeypatch) -> tuple:
    import curation.dicom.load as load

    fast = load_series(series)
    monkeypatch.setattr(load, "FAST", False)
    slow = load_series(series)
    monkeypatch.setattr(load, "FAST", True)
    return fast, slow


def test_native_pixels_read_directly_match_pydicom(tmp_path: Path, monkeypatch) -> None:
    from curation.sample.dicom_write_parts import write_mosaic

    def high_bits(ds, k):  # 12 bits stored, garbage in the unused high bits (pydicom clears them)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = (np.frombuffer(ds.PixelData, "<i2") | np.int16(-4096)).tobytes()

    def unsigned(ds, k):
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
        ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") | np.uint16(0xF000)).tobytes()

    write_series(_volume() - 250, AFFINE, tmp_path / "ct", modality="CT", rescale=(2.0, -1024.0), seed=1)
    write_series(_volume(seed=2) - 250, AFFINE, tmp_path / "signed12", seed=2, edit=high_bits)
    write_series(_volume(seed=3), AFFINE, tmp_path / "unsigned12", seed=3, edit=unsigned)
    write_mosaic(_volume((8, 8, 5), seed=4), AFFINE, tmp_path / "mosaic" / "m.dcm")
    found = find_series(tmp_path, workers=1)
    assert len(found) == 4
    for series in found:
        fast, slow = _both_ways(series, monkeypatch)
        np.testing.assert_array_equal(fast.data, slow.data)
        np.testing.assert_array_equal(fast.affine, slow.affine)
        assert fast.meta == slow.meta and fast.modality == slow.modality
    assert all(load_series(s).data.min() >= 0 for s in found if s.folder.name == "unsigned12")


def test_vendor_bulk_before_the_pixels_is_skipped_from_the_end(tmp_path: Path) -> None:
    from pydicom.sequence import Sequence

    from curation.dicom import scan

    def bulk(ds, k):  # a private group past the last attribute discovery reads, with a sequence
        block = ds.private_block(0x7001, "TEST BULK", create=True)
        for e in range(0x10, 0x90):
            block.add_new(e, "LO", f"v{e}")
        block.add_new(0xA0, "SQ", Sequence([pydicom.Dataset()]))
        if k == 1:  # one file carries a diffusion b-value where Philips puts it
            ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", 1000.0)

    paths = write_series(_volume(), AFFINE, tmp_path, seed=9, edit=bulk)
    for path in paths:
        with open(path, "rb") as fh:
            scanned = scan.scan(fh, path.stat().st_size)
        assert scanned.pixels == scan.Pixels(path.stat().st_size - 96, 96)
        assert (0x20011003 in scanned.elements) == (path == paths[1])
        assert discover._read_one(path) == discover._read_one(path, fast=False)
    found = find_series(tmp_path, series_parts="all", workers=1)
    assert sorted(s.part for s in found) == ["", "b1000"]


def test_a_fifo_and_a_link_out_of_the_root_neither_hang_nor_leak(tmp_path: Path) -> None:
    """The DICOM walk is the one every source uses: a FIFO is one line (no open, so no hang), and
    a link to a file outside the root is not followed (its target is never read)."""
    root = tmp_path / "export"
    root.mkdir()
    _good_series(root)
    os.mkfifo(root / "pipe.dcm")
    outside = tmp_path / "secret.dcm"
    outside.write_bytes(b"x" * 200)
    os.symlink(outside, root / "link.dcm")
    found = find_series(root, workers=1)
    assert len(found) == 1
    reasons = {Path(p).name: r for p, r in found.skipped}
    assert "pipe.dcm" in reasons and "link.dcm" in reasons, found.skipped
    assert "outside" in reasons["link.dcm"]
    assert all(str(outside) not in r for r in reasons.values())
