"""Write DICOM objects that hold several volumes or tile one: enhanced MR with per-frame
functional groups (echo, stack, temporal position, diffusion, frame type, ASL) and Siemens
mosaics. Used by the tests of series splitting; geometry as in `curation.sample.dicom_write`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from curation.sample.dicom_write import (
    ENHANCED_SOP_CLASSES,
    SOP_CLASSES,
    _base_dataset,
    _ds,
    _geometry,
    _item,
    _set_pixels,
    _stored,
    _uids,
)


def write_enhanced_parts(volumes: list[np.ndarray], affine_ras: np.ndarray, path: str | Path,
                         per_volume: list[dict[str, Any]], patient_id: str = "ANON", seed: int = 0) -> Path:
    """Write several 3D arrays as one Enhanced MR object, frames interleaved volume by volume.

    ``per_volume[v]`` sets volume v's per-frame groups: ``echo_time`` (MREchoSequence),
    ``temporal`` (TemporalPositionIndex), ``stack`` (StackID), ``b`` and ``direction``
    (MRDiffusionSequence), ``frame_type`` (MRImageFrameTypeSequence), ``asl`` (ASLContext).
    The dimension index is (temporal or volume number, in-stack position).
    """
    arrays = [np.asarray(v) for v in volumes]
    geo = _geometry(affine_ras)
    nk = arrays[0].shape[2]
    uids = _uids(np.stack(arrays), affine_ras, "MR", seed, patient_id, None, "enhanced-parts")
    ds = _base_dataset(ENHANCED_SOP_CLASSES["MR"], generate_uid(entropy_srcs=[uids["instances"], "0"]), "MR", uids,
                       "Anon", patient_id)
    ds.InstanceNumber = 1
    ds.NumberOfFrames = nk * len(arrays)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "MIXED", "NONE"]
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([_item(ImageOrientationPatient=_ds(geo["iop"]))])
    shared.PixelMeasuresSequence = DicomSequence([_item(
        PixelSpacing=_ds(geo["spacing"]), SliceThickness=_ds([geo["thickness"]])[0])])
    shared.PixelValueTransformationSequence = DicomSequence([_item(
        RescaleIntercept=_ds([0.0])[0], RescaleSlope=_ds([1.0])[0], RescaleType="US")])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.DimensionIndexSequence = DicomSequence([
        _item(DimensionIndexPointer=Tag("TemporalPositionIndex"), FunctionalGroupPointer=Tag("FrameContentSequence")),
        _item(DimensionIndexPointer=Tag("InStackPositionNumber"), FunctionalGroupPointer=Tag("FrameContentSequence"))])
    frames, pixels = [], []
    for k in range(nk):  # position-major, as scanners often store them
        for v, (array, extra) in enumerate(zip(arrays, per_volume)):
            item = Dataset()
            item.PlanePositionSequence = DicomSequence([_item(ImagePositionPatient=_ds(geo["origin"] + k * geo["step"]))])
            content = {"InStackPositionNumber": k + 1, "DimensionIndexValues": [int(extra.get("temporal", v + 1)), k + 1]}
            if "temporal" in extra:
                content["TemporalPositionIndex"] = int(extra["temporal"])
            if "stack" in extra:
                content["StackID"] = str(extra["stack"])
            item.FrameContentSequence = DicomSequence([_item(**content)])
            if "echo_time" in extra:
                item.MREchoSequence = DicomSequence([_item(EffectiveEchoTime=float(extra["echo_time"]))])
            if "b" in extra:
                diffusion = _item(DiffusionBValue=float(extra["b"]), DiffusionDirectionality="DIRECTIONAL")
                if "direction" in extra:
                    diffusion.DiffusionGradientDirectionSequence = DicomSequence(
                        [_item(DiffusionGradientOrientation=[float(x) for x in extra["direction"]])])
                item.MRDiffusionSequence = DicomSequence([diffusion])
            if "frame_type" in extra:
                item.MRImageFrameTypeSequence = DicomSequence([_item(FrameType=list(extra["frame_type"]))])
            if "asl" in extra:
                item.MRArterialSpinLabelingSequence = DicomSequence([_item(ASLContext=str(extra["asl"]))])
            frames.append(item)
            pixels.append(array[:, :, k].T)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    _set_pixels(ds, _stored(np.stack(pixels), 1.0, 0.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mosaic(array: np.ndarray, affine_ras: np.ndarray, path: str | Path, series_uid: str | None = None,
                 seed: int = 0, instance: int = 1, edit: Any = None) -> Path:
    """Write a 3D array as one Siemens mosaic: slices tiled row by row on a ceil(sqrt(n)) grid,
    (0019,100A) NumberOfImagesInMosaic, and ImagePositionPatient at the mosaic's corner as
    Siemens stores it (the position of slice 0 moved back by half the mosaic/tile difference)."""
    array = np.asarray(array)
    ni, nj, nk = array.shape
    grid = math.ceil(math.sqrt(nk))
    geo = _geometry(affine_ras)
    mosaic = np.zeros((grid * nj, grid * ni))
    for k in range(nk):
        r, c = divmod(k, grid)
        mosaic[r * nj:(r + 1) * nj, c * ni:(c + 1) * ni] = array[:, :, k].T
    row, col = geo["iop"][:3], geo["iop"][3:]
    corner = (geo["origin"] - col * geo["spacing"][0] * (grid * nj - nj) / 2
              - row * geo["spacing"][1] * (grid * ni - ni) / 2)
    uids = _uids(array, affine_ras, "MR", seed, "ANON", series_uid, "mosaic")
    ds = _base_dataset(SOP_CLASSES["MR"], generate_uid(entropy_srcs=[uids["instances"], str(instance)]), "MR", uids,
                       "Anon", "ANON")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.Manufacturer = "SIEMENS"
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = instance
    ds.ImageOrientationPatient = _ds(geo["iop"])
    ds.ImagePositionPatient = _ds(corner)
    ds.PixelSpacing = _ds(geo["spacing"])
    ds.SliceThickness = ds.SpacingBetweenSlices = _ds([geo["thickness"]])[0]
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, "US", nk)
    ds.RescaleSlope, ds.RescaleIntercept = _ds([1.0])[0], _ds([0.0])[0]
    _set_pixels(ds, _stored(mosaic[None], 1.0, 0.0))
    if edit is not None:
        edit(ds)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
