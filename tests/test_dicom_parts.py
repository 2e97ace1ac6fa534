"""Series as hospitals export them: split by what tells images apart at one position, mosaics
unpacked, localizers set aside, error lines naming the series, a header index for reruns."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_dicom import AFFINES, assert_same_world, volume

from curation.dicom.load import find_series, load_series
from curation.imageio.volume_io import VolumeError
from curation.sample.dicom_write import write_series
from curation.sample.dicom_write_parts import write_enhanced_parts, write_mosaic
from curation.sources.dicom_tree import dicom_tree

UID = "1.2.826.0.1.3680043.8.498.77"
NIBABEL_DATA = Path(__import__("nibabel").__file__).parent / "nicom" / "tests" / "data"


def _set(**values):
    def edit(ds, k):
        for key, value in values.items():
            setattr(ds, key, value)
    return edit


def _parts(found) -> dict[str, object]:
    return {s.part: s for s in found}


def test_multi_echo_parts_have_labels_and_geometry(tmp_path: Path) -> None:
    arrays = {e: volume(30 + e) for e in (1, 2, 3)}
    for e, array in arrays.items():
        write_series(array, AFFINES["double_oblique"], tmp_path / f"e{e}", modality="MR", series_uid=UID,
                     edit=_set(EchoNumbers=e, EchoTime=5.0 * e), seed=e)
    found = find_series(tmp_path)
    assert sorted(_parts(found)) == ["echo1", "echo2", "echo3"]
    assert len({s.series_key for s in found}) == 3 and len({s.patient_key for s in found}) == 1
    for s in found:
        assert_same_world(load_series(s), arrays[int(s.part[-1])], AFFINES["double_oblique"])


def test_magnitude_and_phase(tmp_path: Path) -> None:
    mag, phase = volume(40, 0, 4000), volume(41, -4096, 4096)
    for kind, array in (("M", mag), ("P", phase)):
        write_series(array, AFFINES["sagittal"], tmp_path / kind, modality="MR", series_uid=UID,
                     edit=_set(ImageType=["ORIGINAL", "PRIMARY", kind, "ND"]), seed=ord(kind))
    found = _parts(find_series(tmp_path))
    assert sorted(found) == ["magnitude", "phase"]
    assert_same_world(load_series(found["magnitude"]), mag, AFFINES["sagittal"])
    assert_same_world(load_series(found["phase"]), phase, AFFINES["sagittal"])


def _dwi(root: Path) -> dict[str, np.ndarray]:
    """b0 plus two directions at b=1000, Siemens style (private b-value and direction tags)."""
    out = {}
    encodings = [(0, None), (1000, (1.0, 0.0, 0.0)), (1000, (0.0, 0.70710678, 0.70710678))]
    for n, (b, direction) in enumerate(encodings):
        array = volume(50 + n, 0, 3000)

        def edit(ds, k, b=b, direction=direction, n=n):
            ds.AcquisitionNumber = n + 1  # scanners number the diffusion volumes in acquisition order
            block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
            block.add_new(0x0C, "IS", str(b))
            if direction is not None:
                block.add_new(0x0E, "FD", list(direction))
        write_series(array, AFFINES["axial_lps"], root / f"d{n}", modality="MR", series_uid=UID, edit=edit, seed=n)
        out["b0" if b == 0 else f"b{b}-dir{n:02d}"] = array
    return out


def test_dwi_b_values_and_directions_and_policy(tmp_path: Path) -> None:
    arrays = _dwi(tmp_path)
    every = _parts(find_series(tmp_path, series_parts="all"))
    assert sorted(every) == sorted(arrays) == ["b0", "b1000-dir01", "b1000-dir02"]
    for label, s in every.items():
        assert_same_world(load_series(s), arrays[label], AFFINES["axial_lps"])
        assert s.n_parts == 3
    # a diffusion series is a time series: anatomical and first keep its first volume only
    assert [s.part for s in find_series(tmp_path)] == ["b0"]
    assert [s.part for s in find_series(tmp_path, series_parts="first")] == ["b0"]
    with pytest.raises(ValueError, match="all, first, anatomical"):
        find_series(tmp_path, series_parts="some")


def test_repeated_positions_become_time_points(tmp_path: Path) -> None:
    """A dynamic series with no temporal tag: acquisition order makes t001, t002, t003."""
    arrays = [volume(60 + t) for t in range(3)]
    for t, array in enumerate(arrays):
        write_series(array, AFFINES["coronal"], tmp_path / f"t{t}", modality="MR", series_uid=UID,
                     edit=_set(AcquisitionNumber=t + 1), seed=t)
    found = _parts(find_series(tmp_path, series_parts="all"))
    assert sorted(found) == ["t001", "t002", "t003"]
    for t, array in enumerate(arrays):
        assert_same_world(load_series(found[f"t{t + 1:03d}"]), array, AFFINES["coronal"])
    assert [s.part for s in find_series(tmp_path)] == ["t001"]


def test_enhanced_multiframe_dimension_parts(tmp_path: Path) -> None:
    arrays = [volume(70 + v) for v in range(4)]
    groups = [{"echo_time": 4.0, "temporal": 1}, {"echo_time": 9.0, "temporal": 1},
              {"echo_time": 4.0, "temporal": 2}, {"echo_time": 9.0, "temporal": 2}]
    write_enhanced_parts(arrays, AFFINES["tilted_oblique"], tmp_path / "mf.dcm", groups)
    every = _parts(find_series(tmp_path, series_parts="all"))
    assert sorted(every) == ["echo1-t001", "echo1-t002", "echo2-t001", "echo2-t002"]
    for label, n in (("echo1-t001", 0), ("echo2-t001", 1), ("echo1-t002", 2), ("echo2-t002", 3)):
        s = every[label]
        assert s.n_frames == SHAPE_K and s.frames is not None
        assert_same_world(load_series(s), arrays[n], AFFINES["tilted_oblique"])
    # multi-echo kept, time reduced to its first point
    assert sorted(s.part for s in find_series(tmp_path)) == ["echo1-t001", "echo2-t001"]
    assert [s.part for s in find_series(tmp_path, series_parts="first")] == ["echo1-t001"]


SHAPE_K = volume().shape[2]


def test_enhanced_frame_types_diffusion_and_asl(tmp_path: Path) -> None:
    arrays = [volume(80 + v, 0, 3000) for v in range(2)]
    write_enhanced_parts(arrays, AFFINES["axial_ras"], tmp_path / "a" / "mf.dcm",
                         [{"frame_type": ["ORIGINAL", "PRIMARY", "WATER", "NONE"]},
                          {"frame_type": ["ORIGINAL", "PRIMARY", "FAT", "NONE"]}])
    dixon = _parts(find_series(tmp_path / "a"))
    assert sorted(dixon) == ["fat", "water"]
    assert_same_world(load_series(dixon["fat"]), arrays[1], AFFINES["axial_ras"])
    write_enhanced_parts(arrays, AFFINES["axial_ras"], tmp_path / "b" / "mf.dcm",
                         [{"b": 0}, {"b": 700, "direction": (0.0, 0.0, 1.0)}], seed=1)
    assert sorted(_parts(find_series(tmp_path / "b", series_parts="all"))) == ["b0", "b700-dir01"]
    write_enhanced_parts(arrays, AFFINES["axial_ras"], tmp_path / "c" / "mf.dcm",
                         [{"asl": "LABEL"}, {"asl": "CONTROL"}], seed=2)
    asl = _parts(find_series(tmp_path / "c", series_parts="all"))
    assert sorted(asl) == ["control", "label"]
    assert_same_world(load_series(asl["label"]), arrays[0], AFFINES["axial_ras"])


@pytest.mark.parametrize("name", ["axial_lps", "double_oblique"])
def test_mosaic_is_unpacked_with_corrected_positions(tmp_path: Path, name: str) -> None:
    array, affine = volume(90), AFFINES[name]
    write_mosaic(array, affine, tmp_path / "mosaic.dcm")
    found = find_series(tmp_path)
    assert len(found) == 1
    vol = load_series(found[0])
    assert vol.meta["mosaic"] is True
    assert_same_world(vol, array, affine)


def test_mosaic_time_series(tmp_path: Path) -> None:
    arrays = [volume(91 + t) for t in range(3)]
    for t, array in enumerate(arrays):
        write_mosaic(array, AFFINES["axial_lps"], tmp_path / f"{t}.dcm", series_uid=UID, instance=t + 1, seed=t)
    every = _parts(find_series(tmp_path, series_parts="all"))
    assert sorted(every) == ["t001", "t002", "t003"]
    assert_same_world(load_series(every["t003"]), arrays[2], AFFINES["axial_lps"])
    assert len(find_series(tmp_path)) == 1


def _siemens_dwi(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz"):
        (folder / name[:-3]).write_bytes(gzip.open(NIBABEL_DATA / name).read())
    return folder


@pytest.mark.skipif(not (NIBABEL_DATA / "siemens_dwi_1000.dcm.gz").exists(), reason="nibabel test data missing")
def test_real_siemens_mosaic_dwi(tmp_path: Path) -> None:
    """Two real Siemens mosaic files (b0 and b1000, one series): two parts of 128x128x48, and the
    geometry nibabel's independent reader gives."""
    import nibabel.nicom.dicomwrappers as wrappers

    folder = _siemens_dwi(tmp_path / "dwi")
    parts = _parts(find_series(folder, series_parts="all"))
    assert sorted(parts) == ["b0", "b1000-dir01"]
    vol = load_series(parts["b1000-dir01"])
    assert vol.data.shape == (128, 128, 48)
    ref = wrappers.wrapper_from_data(pydicom.dcmread(folder / "siemens_dwi_1000.dcm"))
    # nibabel: (row, col, slice) voxels -> LPS; ours: (col, row, slice) -> RAS
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    np.testing.assert_allclose(lps[:3, [1, 0, 2, 3]], ref.affine[:3], atol=1e-3)
    np.testing.assert_allclose(vol.data.transpose(1, 0, 2), ref.get_data(), rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed")
@pytest.mark.skipif(not (NIBABEL_DATA / "siemens_dwi_1000.dcm.gz").exists(), reason="nibabel test data missing")
def test_mosaic_geometry_matches_dcm2niix(tmp_path: Path) -> None:
    import nibabel as nib

    folder = _siemens_dwi(tmp_path / "dwi")
    out = tmp_path / "nii"
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(folder)],
                   check=True, capture_output=True)
    ref = nib.load(next(out.glob("ref*.nii")))
    vol = load_series(_parts(find_series(folder, series_parts="all"))["b1000-dir01"])
    ref_data = np.asarray(ref.dataobj)[..., -1]  # the b1000 volume (dcm2niix sorts by b-value)
    assert vol.data.shape == ref_data.shape[:3]
    # every voxel of ours lands on the voxel of dcm2niix's volume at the same place, same value
    ijk = np.indices(vol.data.shape).reshape(3, -1).astype(float)
    world = vol.affine[:3, :3] @ ijk + vol.affine[:3, 3:]
    theirs = np.linalg.solve(ref.affine[:3, :3], world - ref.affine[:3, 3:])
    index = np.rint(theirs).astype(int)
    np.testing.assert_allclose(theirs, index, atol=0.05)
    np.testing.assert_array_equal(vol.data.reshape(-1), ref_data[tuple(index)].astype(np.float32))


def test_localizer_secondary_capture_and_dose_report_are_skipped(tmp_path: Path) -> None:
    write_series(volume(100), AFFINES["axial_lps"], tmp_path / "loc", seed=1,
                 edit=_set(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    write_series(volume(101), AFFINES["axial_lps"], tmp_path / "scout", seed=2, edit=_set(SeriesDescription="AAHead_Scout"))
    write_series(volume(102), AFFINES["axial_lps"], tmp_path / "dose", seed=3,
                 edit=_set(SeriesDescription="Dose Report", SOPClassUID="1.2.840.10008.5.1.4.1.1.7"))
    write_series(volume(103), AFFINES["axial_lps"], tmp_path / "sc", seed=4,
                 edit=_set(SOPClassUID="1.2.840.10008.5.1.4.1.1.7"))
    write_series(volume(104), AFFINES["axial_lps"], tmp_path / "ct", seed=5)
    found = find_series(tmp_path)
    assert len(found) == 1 and found[0].folder.name == "ct"
    reasons = {s.folder.name: why for s, why in found.skipped_series}
    assert reasons == {"loc": "localizer/scout", "scout": "localizer/scout", "dose": "dose report",
                       "sc": "secondary capture"}
    specs, problems = dicom_tree(tmp_path)
    assert len(specs) == 1
    lines = [why for _, why in problems]
    assert len(lines) == 4 and all(line.startswith("skipped: series 1 ") for line in lines)
    assert any('"AAHead_Scout" is a localizer/scout' in line for line in lines)


def test_error_line_names_series_with_scrubbed_description(tmp_path: Path) -> None:
    paths = write_series(volume(110), AFFINES["axial_lps"], tmp_path / "x", patient_name="Doe^Jane",
                         patient_id="PID-998877", edit=_set(SeriesDescription="T1 Jane Doe", SeriesNumber=7))
    paths[3].unlink()
    specs, _ = dicom_tree(tmp_path)
    with pytest.raises(VolumeError) as err:
        load_series(specs[0].series)
    message = str(err.value)
    assert message.startswith('series 7 "T1 Jane Doe": ') and "non-uniform slice spacing" in message
    line = specs[0].safe_text(message)
    assert "\n" not in line and "series 7" in line and "Jane" not in line and "Doe" not in line


def test_header_index_skips_reading_on_rerun(tmp_path: Path, monkeypatch) -> None:
    arrays = _dwi(tmp_path / "d")
    (tmp_path / "d" / "notes.txt").write_text("not dicom")
    cache = tmp_path / "cache"
    first = find_series(tmp_path / "d", series_parts="all", cache_dir=cache, id_key=b"k" * 32)
    import curation.dicom.discover as discover

    calls = []
    real = discover.read_dataset
    monkeypatch.setattr(discover, "read_dataset", lambda p, pixels=True: calls.append(p) or real(p, pixels))
    again = find_series(tmp_path / "d", series_parts="all", cache_dir=cache, id_key=b"k" * 32)
    assert len(calls) == 1  # one header per series, for its identity; none per file
    assert [(s.part, s.files, s.series_key, s.patient_key) for s in again] == \
        [(s.part, s.files, s.series_key, s.patient_key) for s in first]
    assert again.skipped == first.skipped
    assert_same_world(load_series(_parts(again)["b0"]), arrays["b0"], AFFINES["axial_lps"])
    # the index holds no real path and no identifier
    raw = (cache / "dicom_headers.sqlite").read_bytes()
    assert str(tmp_path).encode() not in raw and b"ANON" not in raw and UID.encode() not in raw
    # a changed file is read again
    target = next((tmp_path / "d" / "d0").iterdir())
    target.write_bytes(target.read_bytes())
    calls.clear()
    find_series(tmp_path / "d", series_parts="all", cache_dir=cache, id_key=b"k" * 32)
    assert target in calls


def test_parallel_header_reading_matches_serial(tmp_path: Path, monkeypatch) -> None:
    import curation.dicom.discover as discover

    _dwi(tmp_path)
    serial = find_series(tmp_path, series_parts="all", workers=1)
    monkeypatch.setattr(discover, "PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(discover, "CHUNK", 5)
    parallel = find_series(tmp_path, series_parts="all", workers=2)
    assert [(s.part, s.files) for s in parallel] == [(s.part, s.files) for s in serial]
