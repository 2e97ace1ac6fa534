"""Write numpy volumes as valid DICOM (single-frame series or one enhanced multi-frame object).

Used by the tests and the sample-data generator. Geometry comes from a voxel -> RAS+ affine
(nibabel convention); DICOM is LPS, so the first two rows are negated on the way out.
Array axis i runs along DICOM columns, j along rows, k across slices; the slice step may be
oblique to the image plane (tilted gantry), only the in-plane axes must be orthogonal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
ENHANCED_SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
}

Rescale = tuple[float, float] | Sequence[tuple[float, float]]


def write_series(
    array: np.ndarray,
    affine_ras: np.ndarray,
    out_dir: str | Path,
    modality: str = "CT",
    shuffle: bool = False,
    instance_numbers: str = "position",
    rescale: Rescale = (1.0, 0.0),
    seed: int = 0,
    patient_name: str = "Anon",
    patient_id: str = "ANON",
    series_uid: str | None = None,
    edit: Callable[[Dataset, int], None] | None = None,
) -> list[Path]:
    """Write a 3D array as a single-frame CT/MR DICOM series, one file per k slice.

    Args:
        array: (i, j, k) values; stored as int16 round((v - intercept) / slope).
        affine_ras: 4x4 voxel -> RAS+ mm; i and j columns must be orthogonal.
        out_dir: folder to write into (created); file names start with a hash of the series.
        shuffle: permute file names so that name order disagrees with position order.
        instance_numbers: "position" (k + 1), "reversed" or "random".
        rescale: one (slope, intercept) or one per slice.
        series_uid: SeriesInstanceUID; default derived deterministically from data and seed.
        edit: called as ``edit(dataset, k)`` before each file is saved (echo, ImageType...).

    Returns:
        The written paths, in slice (k) order.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    nk = array.shape[2]
    geo = _geometry(affine_ras)
    scales = _per_slice_rescale(rescale, nk)
    rng = np.random.default_rng(seed)
    uids = _uids(array, affine_ras, modality, seed, patient_id, series_uid, "series")
    numbers = {"position": np.arange(1, nk + 1), "reversed": np.arange(nk, 0, -1),
               "random": rng.permutation(nk) + 1}.get(instance_numbers)
    if numbers is None:
        raise ValueError(f"instance_numbers must be position, reversed or random, not {instance_numbers!r}")
    names = rng.permutation(nk) if shuffle else np.arange(nk)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(uids["series"].encode()).hexdigest()[:8]
    paths = []
    for k in range(nk):
        slope, intercept = scales[k]
        sop_uid = generate_uid(entropy_srcs=[uids["instances"], str(k)])
        ds = _base_dataset(SOP_CLASSES[_modality(modality)], sop_uid, modality, uids, patient_name, patient_id)
        ds.InstanceNumber = int(numbers[k])
        ds.ImageOrientationPatient = _ds(geo["iop"])
        ds.ImagePositionPatient = _ds(geo["origin"] + k * geo["step"])
        ds.PixelSpacing = _ds(geo["spacing"])
        ds.SliceThickness = _ds([geo["thickness"]])[0]
        ds.SpacingBetweenSlices = _ds([geo["thickness"]])[0]
        ds.RescaleSlope = _ds([slope])[0]
        ds.RescaleIntercept = _ds([intercept])[0]
        _set_pixels(ds, _stored(array[:, :, k].T[None], slope, intercept))
        if edit is not None:
            edit(ds, k)
        path = out_dir / f"{tag}_{int(names[k]) + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe(
    array: np.ndarray,
    affine_ras: np.ndarray,
    path: str | Path,
    modality: str = "CT",
    rescale: tuple[float, float] = (1.0, 0.0),
    shuffle: bool = False,
    seed: int = 0,
    series_uid: str | None = None,
    patient_name: str = "Anon",
    patient_id: str = "ANON",
) -> Path:
    """Write a 3D array as one Enhanced CT/MR multi-frame object (one frame per k slice).

    Orientation, pixel measures and rescale go into the shared functional groups, each frame's
    position into its PlanePositionSequence. ``shuffle`` stores the frames in a random order.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    nk = array.shape[2]
    geo = _geometry(affine_ras)
    slope, intercept = rescale
    order = np.random.default_rng(seed).permutation(nk) if shuffle else np.arange(nk)
    uids = _uids(array, affine_ras, modality, seed, patient_id, series_uid, "multiframe")
    sop_uid = generate_uid(entropy_srcs=[uids["instances"], "0"])
    ds = _base_dataset(ENHANCED_SOP_CLASSES[_modality(modality)], sop_uid, modality, uids,
                       patient_name, patient_id)
    ds.InstanceNumber = 1
    ds.NumberOfFrames = nk
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER", "NONE"]
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([_item(ImageOrientationPatient=_ds(geo["iop"]))])
    shared.PixelMeasuresSequence = DicomSequence([_item(
        PixelSpacing=_ds(geo["spacing"]), SliceThickness=_ds([geo["thickness"]])[0],
        SpacingBetweenSlices=_ds([geo["thickness"]])[0])])
    shared.PixelValueTransformationSequence = DicomSequence([_item(
        RescaleIntercept=_ds([intercept])[0], RescaleSlope=_ds([slope])[0],
        RescaleType="HU" if modality == "CT" else "US")])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for n, k in enumerate(order):
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([_item(
            ImagePositionPatient=_ds(geo["origin"] + int(k) * geo["step"]))])
        item.FrameContentSequence = DicomSequence([_item(InStackPositionNumber=int(k) + 1,
                                                          DimensionIndexValues=[int(k) + 1])])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.ContentQualification = "RESEARCH"
    _set_pixels(ds, _stored(array[:, :, order].transpose(2, 1, 0), slope, intercept))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _modality(modality: str) -> str:
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be CT or MR, not {modality!r}")
    return modality


def _geometry(affine_ras: np.ndarray) -> dict[str, np.ndarray]:
    """Split an affine into DICOM IOP, PixelSpacing, origin (LPS) and per-slice step."""
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)
    col_i, col_j, step, origin = aff[:3, 0], aff[:3, 1], aff[:3, 2], aff[:3, 3]
    si, sj = np.linalg.norm(col_i), np.linalg.norm(col_j)
    if si == 0 or sj == 0 or abs(col_i @ col_j) > 1e-6 * si * sj:
        raise ValueError("in-plane axes (affine columns 0 and 1) must be non-zero and orthogonal")
    row_cos, col_cos = col_i / si, col_j / sj
    normal = np.cross(row_cos, col_cos)
    thickness = abs(float(step @ normal))
    if thickness == 0:
        raise ValueError("slice step (affine column 2) lies in the image plane")
    return {"iop": np.concatenate([row_cos, col_cos]), "spacing": np.array([sj, si]),
            "origin": origin, "step": step, "thickness": np.float64(thickness)}


def _per_slice_rescale(rescale: Rescale, nk: int) -> list[tuple[float, float]]:
    arr = np.asarray(rescale, dtype=np.float64)
    if arr.shape == (2,):
        arr = np.tile(arr, (nk, 1))
    if arr.shape != (nk, 2) or np.any(arr[:, 0] == 0):
        raise ValueError("rescale must be (slope, intercept) or one pair per slice, slope != 0")
    return [(float(s), float(b)) for s, b in arr]


def _stored(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    stored = np.round((values.astype(np.float64) - intercept) / slope)
    if stored.size and (stored.min() < -32768 or stored.max() > 32767):
        raise ValueError("values do not fit int16 with this rescale slope/intercept")
    return stored.astype("<i2")


def _uids(array: np.ndarray, affine: np.ndarray, modality: str, seed: int, patient_id: str,
          series_uid: str | None, kind: str) -> dict[str, str]:
    # Deterministic (reproducible sample data) but distinct for different data or seeds.
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    base = [digest, np.asarray(affine, dtype=np.float64).tobytes().hex(), modality, str(seed), patient_id, kind]
    series = series_uid or generate_uid(entropy_srcs=base + ["series"])
    return {"series": series,
            "instances": generate_uid(entropy_srcs=base + [series, "instances"]),
            "study": generate_uid(entropy_srcs=[series, "study"]),
            "frame": generate_uid(entropy_srcs=[series, "frame-of-reference"])}


def _base_dataset(sop_class: str, sop_uid: str, modality: str, uids: dict[str, str],
                  patient_name: str, patient_id: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "med3dinsight"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"synthetic {modality}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.PositionReferenceIndicator = ""
    if modality == "CT":
        ds.KVP = ""
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "3D"
    return ds


def _set_pixels(ds: Dataset, frames: np.ndarray) -> None:
    """frames: (n, rows, cols) int16."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(frames).tobytes()


def _item(**values: object) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _ds(values: Sequence[float] | np.ndarray) -> list[DSfloat]:
    # DS strings hold at most 16 characters; auto_format keeps as much precision as fits.
    return [DSfloat(float(v) + 0.0, auto_format=True) for v in np.asarray(values, dtype=np.float64).ravel()]
