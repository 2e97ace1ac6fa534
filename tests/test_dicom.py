"""DICOM series discovery and loading: round trips through our writer, bad input, shipped files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from curation.dicom.load import DicomSeries, find_series, load_series
from curation.imageio.volume_io import VolumeError
from curation.sample.dicom_write import write_multiframe, write_series

SITE = Path(pydicom.__file__).parent.parent
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DATA_STORE = SITE / "data_store" / "data"
needs_data_store = pytest.mark.skipif(not DATA_STORE.is_dir(), reason="pydicom-data not installed")

SHAPE = (12, 10, 8)
PHI_NAME, PHI_ID = "Doe^Jane", "PID-998877"


def volume(seed: int = 0, low: int = -1000, high: int = 2000) -> np.ndarray:
    """Integer-valued, asymmetric, so any flip or transpose changes the values."""
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, size=SHAPE).astype(np.float64)


def rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cc, -sc], [0, sc, cc]])
    return rz @ ry @ rx


def affine_from(columns: np.ndarray, origin=(12.5, -30.25, 40.0)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = columns
    aff[:3, 3] = origin
    return aff


SP = np.diag([0.7, 0.8, 2.5])
TILT = np.deg2rad(20)
AFFINES = {
    # standard supine head-first axial: RAS affine of a plain DICOM stack
    "axial_lps": affine_from(np.diag([-0.7, -0.8, 2.5])),
    "axial_ras": affine_from(SP),
    "sagittal": affine_from(np.array([[0, 0, -2.5], [0.7, 0, 0], [0, -0.8, 0]])),
    "coronal": affine_from(np.array([[0.7, 0, 0], [0, 0, 2.5], [0, -0.8, 0]])),
    "double_oblique": affine_from(rotation(0.4, 0.6, -0.3) @ SP),
    # tilted gantry: slices step along z but drift in y (sheared, non-orthogonal affine)
    "tilted_gantry": affine_from(np.array([[-0.7, 0, 0], [0, -0.8, 2.5 * np.tan(TILT)], [0, 0, 2.5]])),
    "tilted_oblique": affine_from(rotation(0.2, 0.1, 0.0) @ np.array(
        [[0.7, 0, 0.4], [0, 0.8, 0.9], [0, 0, 2.5]])),
    # prone: image rows run anterior, columns toward patient right
    "prone": affine_from(np.diag([0.7, 0.8, 2.5])),
    # feet-first supine: slice index runs toward the feet
    "feet_first": affine_from(np.diag([-0.7, -0.8, -2.5])),
    "prone_feet_first_decubitus": affine_from(np.array([[0, 0.7, 0], [0.8, 0, 0], [0, 0, -2.5]])),
}


def assert_same_world(vol, array: np.ndarray, affine: np.ndarray) -> None:
    """Every loaded voxel sits where the original voxel with the same value sat, one to one."""
    assert vol.data.size == array.size
    assert vol.data.dtype == np.float32
    ijk = np.indices(vol.data.shape).reshape(3, -1).astype(np.float64)
    world = vol.affine[:3, :3] @ ijk + vol.affine[:3, 3:]
    source = np.linalg.solve(affine[:3, :3], world - affine[:3, 3:])
    index = np.rint(source).astype(int)
    np.testing.assert_allclose(source, index, atol=1e-3)
    assert np.all(index >= 0) and np.all(index < np.array(array.shape)[:, None])
    flat = np.ravel_multi_index(tuple(index), array.shape)
    assert len(np.unique(flat)) == array.size
    np.testing.assert_array_equal(vol.data.reshape(-1), array[tuple(index)])


def load_only(folder: Path):
    series = find_series(folder)
    assert len(series) == 1, series
    return load_series(series[0])


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_round_trip_orientations(tmp_path: Path, name: str) -> None:
    array, affine = volume(1), AFFINES[name]
    write_series(array, affine, tmp_path, rescale=(1.0, -1024.0))
    vol = load_only(tmp_path)
    assert_same_world(vol, array, affine)
    assert vol.modality == "CT"
    assert vol.meta["geometry"] == "dicom" and vol.meta["n_files"] == SHAPE[2]
    np.testing.assert_allclose(sorted(vol.spacing[:2]), sorted(np.linalg.norm(affine[:3, :2], axis=0)), rtol=1e-6)


def test_plain_axial_loads_identically(tmp_path: Path) -> None:
    array, affine = volume(2), AFFINES["axial_lps"]
    write_series(array, affine, tmp_path)
    vol = load_only(tmp_path)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(vol.data, array)
    assert vol.axcodes == "LPS"
    assert vol.meta["gantry_tilt_deg"] == 0


def test_tilted_gantry_affine_is_sheared(tmp_path: Path) -> None:
    affine = AFFINES["tilted_gantry"]
    write_series(volume(3), affine, tmp_path)
    vol = load_only(tmp_path)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(20.0, abs=1e-3)


def test_order_ignores_file_names_and_instance_numbers(tmp_path: Path) -> None:
    array, affine = volume(4), AFFINES["double_oblique"]
    write_series(array, affine, tmp_path / "ref")
    reference = load_only(tmp_path / "ref")
    for mode in ("reversed", "random"):
        write_series(array, affine, tmp_path / mode, shuffle=True, instance_numbers=mode, seed=7)
        vol = load_only(tmp_path / mode)
        np.testing.assert_array_equal(vol.data, reference.data)
        np.testing.assert_allclose(vol.affine, reference.affine, atol=1e-9)


def test_per_slice_rescale(tmp_path: Path) -> None:
    array, affine = volume(5, -1024, 3000), AFFINES["coronal"]
    pairs = [(1.0, -1024.0), (0.5, 0.0), (0.25, -1024.0), (1.0, 7.0), (0.5, -2048.0),
             (1.0, 0.0), (0.25, 100.0), (0.5, -3.0)]
    write_series(array, affine, tmp_path, rescale=pairs, shuffle=True)
    stored = {int(ds.InstanceNumber): float(ds.RescaleSlope) for ds in map(pydicom.dcmread, tmp_path.iterdir())}
    assert len(set(stored.values())) == 3
    assert_same_world(load_only(tmp_path), array, affine)


@pytest.mark.parametrize("name", ["axial_lps", "double_oblique", "tilted_oblique", "feet_first"])
def test_multiframe_round_trip(tmp_path: Path, name: str) -> None:
    array, affine = volume(6), AFFINES[name]
    path = write_multiframe(array, affine, tmp_path / "enhanced.dcm", modality="MR", rescale=(0.5, -100.0),
                            shuffle=True)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID.name == "Enhanced MR Image Storage" and int(ds.NumberOfFrames) == SHAPE[2]
    series = find_series(tmp_path)
    assert len(series) == 1 and series[0].n_frames == SHAPE[2]
    vol = load_series(series[0])
    assert vol.modality == "MR"
    assert_same_world(vol, array, affine)


def test_two_series_in_one_folder(tmp_path: Path) -> None:
    write_series(volume(7), AFFINES["axial_lps"], tmp_path)
    write_series(volume(8)[:, :, :5], AFFINES["sagittal"], tmp_path, modality="MR")
    series = find_series(tmp_path)
    assert len(series) == 2 and series.skipped == []
    assert len({s.series_key for s in series}) == 2
    assert sorted(s.n_frames for s in series) == [5, 8]
    assert sorted(s.modality for s in series) == ["CT", "MR"]
    for s in series:
        assert load_series(s).data.shape[2] == s.n_frames


def test_multi_echo_series_splits_into_one_volume_per_echo(tmp_path: Path) -> None:
    """Two echoes interleaved in one SeriesInstanceUID at the same positions (multi-echo MR)."""
    import pydicom

    uid = "1.2.826.0.1.3680043.8.498.1234567"
    for echo, seed in ((1, 11), (2, 12)):
        files = write_series(volume(seed), AFFINES["axial_lps"], tmp_path / f"e{echo}", modality="MR", series_uid=uid)
        for f in files:
            ds = pydicom.dcmread(f)
            ds.EchoNumbers = echo
            ds.save_as(f)
    series = find_series(tmp_path)
    assert len(series) == 2 and {s.n_parts for s in series} == {2}
    loaded = sorted((load_series(s).data for s in series), key=lambda a: float(a.mean()))
    expected = sorted((load_series(find_series(tmp_path / f"e{e}")[0]).data for e in (1, 2)), key=lambda a: float(a.mean()))
    for a, b in zip(loaded, expected):
        np.testing.assert_array_equal(a, b)


def test_junk_and_truncated_header_are_skipped_and_reported(tmp_path: Path) -> None:
    paths = write_series(volume(9), AFFINES["axial_lps"], tmp_path)
    (tmp_path / "notes.txt").write_text("not dicom\n")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 64)
    head_only = tmp_path / "broken.dcm"
    head_only.write_bytes(paths[-1].read_bytes()[:300])
    paths[-1].unlink()  # the last slice: removing it leaves no gap
    series = find_series(tmp_path)
    reasons = dict(series.skipped)
    assert reasons[tmp_path / "notes.txt"] == "not a DICOM file"
    assert reasons[tmp_path / "DICOMDIR"] == "not a DICOM file"
    assert "truncated" in reasons[head_only]
    assert all("\n" not in r for r in reasons.values())
    assert len(series) == 1 and load_series(series[0]).data.shape == (12, 10, 7)


def test_truncated_pixel_data_names_the_file(tmp_path: Path) -> None:
    paths = write_series(volume(10), AFFINES["axial_lps"], tmp_path)
    paths[3].write_bytes(paths[3].read_bytes()[:-40])
    series = find_series(tmp_path)
    assert len(series) == 1 and paths[3] in series[0].files
    with pytest.raises(VolumeError, match="cannot decode pixel data") as err:
        load_series(series[0])
    assert str(paths[3]) in str(err.value) and "\n" not in str(err.value)


def test_duplicate_files_are_dropped(tmp_path: Path) -> None:
    array, affine = volume(11), AFFINES["axial_ras"]
    paths = write_series(array, affine, tmp_path)
    shutil.copy(paths[2], tmp_path / "copy.dcm")
    series = find_series(tmp_path)
    assert (tmp_path / "copy.dcm", "duplicate of another file (same SOPInstanceUID)") in series.skipped
    # the same copy reaching the loader anyway: identical pixels at one position are dropped
    vol = load_series(DicomSeries(files=paths + [tmp_path / "copy.dcm"], series_key="x"))
    assert vol.meta["duplicates_dropped"] == 1
    assert_same_world(vol, array, affine)


def test_same_position_different_pixels(tmp_path: Path) -> None:
    a = write_series(volume(12), AFFINES["axial_lps"], tmp_path / "a", series_uid="1.2.3.4")
    b = write_series(volume(13), AFFINES["axial_lps"], tmp_path / "b", series_uid="1.2.3.5")
    with pytest.raises(VolumeError, match="share a position") as err:
        load_series(DicomSeries(files=a + b, series_key="x"))
    assert str(tmp_path) in str(err.value)


def test_single_image_is_not_a_volume(tmp_path: Path) -> None:
    write_series(volume(14)[:, :, :1], AFFINES["axial_lps"], tmp_path, patient_name=PHI_NAME, patient_id=PHI_ID)
    series = find_series(tmp_path)
    with pytest.raises(VolumeError, match="single 2D image, not a volume") as err:
        load_series(series[0])
    assert PHI_NAME not in str(err.value) and PHI_ID not in str(err.value)


def test_missing_middle_slice(tmp_path: Path) -> None:
    paths = write_series(volume(15), AFFINES["double_oblique"], tmp_path, shuffle=True)
    paths[4].unlink()
    with pytest.raises(VolumeError, match="non-uniform slice spacing") as err:
        load_only(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_mixed_sizes_and_orientations_split_or_rejected(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    a = write_series(volume(16), AFFINES["axial_lps"], tmp_path / "a", series_uid=uid)
    b = write_series(volume(17)[:, :6, :], AFFINES["axial_lps"], tmp_path / "b", series_uid=uid)
    c = write_series(volume(18), AFFINES["sagittal"], tmp_path / "c", series_uid=uid)
    series = find_series(tmp_path)
    assert [(s.part_index, s.n_parts, s.n_frames) for s in series] == [(1, 3, 8), (2, 3, 8), (3, 3, 8)]
    assert len({s.series_key for s in series}) == 3 and all(uid not in s.series_key for s in series)
    assert [load_series(s).data.shape for s in series] == [(12, 10, 8), (12, 6, 8), (12, 10, 8)]
    with pytest.raises(VolumeError, match="mixed image sizes") as err:
        load_series(DicomSeries(files=a + b, series_key="x"))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(VolumeError, match="mixed image orientations"):
        load_series(DicomSeries(files=a + c, series_key="x"))


def test_patient_identifiers_stay_out(tmp_path: Path) -> None:
    paths = write_series(volume(19), AFFINES["prone"], tmp_path, patient_name=PHI_NAME, patient_id=PHI_ID)
    series = find_series(tmp_path)[0]
    assert PHI_NAME in series.patient_tokens and PHI_ID in series.patient_tokens and "Doe" in series.patient_tokens
    vol = load_series(series)
    for text in (series.series_key, repr(series), repr(vol.meta), series.description):
        assert "Doe" not in text and "Jane" not in text and PHI_ID not in text
    paths[3].unlink()
    with pytest.raises(VolumeError) as err:
        load_series(find_series(tmp_path)[0])
    assert "Doe" not in str(err.value) and PHI_ID not in str(err.value)


def test_missing_root() -> None:
    with pytest.raises(VolumeError, match="no such"):
        find_series(Path("/nonexistent/dicom/folder"))


@needs_data_store
def test_rgb_is_rejected(tmp_path: Path) -> None:
    shutil.copy(DATA_STORE / "SC_rgb_2frame.dcm", tmp_path)
    found = find_series(tmp_path)  # a secondary capture: set aside with a reason, not an error
    assert list(found) == [] and [why for _, why in found.skipped_series] == ["secondary capture"]
    ds = pydicom.dcmread(tmp_path / "SC_rgb_2frame.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # as if MR
    ds.save_as(tmp_path / "SC_rgb_2frame.dcm")
    with pytest.raises(VolumeError, match="color image"):
        load_only(tmp_path)


@needs_data_store
def test_enhanced_mr_without_geometry() -> None:
    series = find_series(DATA_STORE / "emri_small.dcm")
    assert len(series) == 1 and series[0].n_frames == 10 and series[0].modality == "MR"
    vol = load_series(series[0])
    assert vol.data.shape == (64, 64, 10) and vol.data.dtype == np.float32
    assert vol.spacing == pytest.approx((1.0, 1.0, 1.2))
    assert vol.meta["geometry"] == "assumed" and vol.meta["sop_class"] == "Enhanced MR Image Storage"
    assert 0 <= vol.data.min() < vol.data.max() <= 4095
    for variant in ("emri_small_RLE.dcm", "emri_small_big_endian.dcm"):
        np.testing.assert_array_equal(load_series(find_series(DATA_STORE / variant)[0]).data, vol.data)
    with pytest.raises(VolumeError, match="no ImageOrientationPatient"):
        load_series(series[0], require_geometry=True)


@needs_data_store
def test_compressed_transfer_syntaxes_decode_losslessly() -> None:
    """JPEG-LS and JPEG 2000 lossless (as PACS exports use) decode to the uncompressed pixels
    with the decoder plugins the project depends on."""
    ref = load_series(find_series(DATA_STORE / "emri_small.dcm")[0]).data
    for variant in ("emri_small_jpeg_ls_lossless.dcm", "emri_small_jpeg_2k_lossless.dcm"):
        np.testing.assert_array_equal(load_series(find_series(DATA_STORE / variant)[0]).data, ref)


@needs_data_store
def test_enhanced_ct() -> None:
    vol = load_series(find_series(DATA_STORE / "eCT_Supplemental.dcm")[0])
    assert vol.data.shape == (512, 512, 2) and vol.modality == "CT"
    assert vol.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    # IOP row cosine is -x in LPS (+x, toward R, in RAS), so the normal row x column is -z:
    # k runs along the normal, from the frame at z = -149 to the one at z = -159
    np.testing.assert_allclose(vol.affine[:3, 0], [0.388672, 0, 0], atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, -10.0], atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 3], [-99.5, 301.5, -149.0], atol=1e-6)
    assert vol.data.min() >= -1024 and vol.data.max() > 0


@needs_data_store
def test_segmentation_multiframe() -> None:
    series = find_series(DATA_STORE / "liver.dcm")
    assert series[0].modality == "SEG"
    vol = load_series(series[0])
    assert vol.data.shape == (512, 512, 3)
    assert vol.spacing == pytest.approx((0.810547, 0.810547, 1.0))
    assert set(np.unique(vol.data)) <= {0.0, 1.0}


def test_pydicom_dicomdir_tree() -> None:
    root = PYDICOM_FILES / "dicomdirtests"
    series = find_series(root)
    reasons = {p.name: r for p, r in series.skipped}
    assert reasons["DICOMDIR"].startswith("DICOMDIR")
    assert "no pixel data" in reasons["IM000000"]
    ct = [s for s in series if s.n_frames == 5]
    assert len(ct) == 1
    vol = load_series(ct[0])
    assert vol.data.shape == (16, 16, 5) and vol.modality == "CT"
    assert vol.spacing == pytest.approx((0.488281, 0.488281, 2.5))
    assert vol.affine[2, 2] == pytest.approx(2.5)  # sorted by position although InstanceNumbers fall
    gapped = [s for s in series if s.n_frames == 4]
    with pytest.raises(VolumeError, match="non-uniform slice spacing"):
        load_series(gapped[0])
    # the radial MR localizer: seven orientations, split into seven single images
    radial = [s for s in series if s.folder.name == "MR700"]
    assert len(radial) == 7 and all(s.n_parts == 7 for s in radial)
    with pytest.raises(VolumeError, match="single 2D image"):
        load_series(radial[0])


@pytest.mark.parametrize("modality, loads", [("MR", True), ("XA", False)])
def test_multiframe_without_geometry(tmp_path: Path, modality: str, loads: bool) -> None:
    """Only CT/MR are assumed to be volumes when geometry is missing (not XA/US cine loops)."""
    path = write_multiframe(volume(20), AFFINES["double_oblique"], tmp_path / "mf.dcm", modality="MR")
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence
    ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = []
    ds.Modality = modality
    ds.save_as(path)
    series = find_series(tmp_path)
    if loads:
        vol = load_series(series[0])
        assert vol.meta["geometry"] == "assumed" and vol.spacing == pytest.approx((0.7, 0.8, 2.5))
        np.testing.assert_array_equal(vol.data, volume(20))
    else:
        with pytest.raises(VolumeError, match="no ImageOrientationPatient") as err:
            load_series(series[0])
        assert str(path) in str(err.value)
