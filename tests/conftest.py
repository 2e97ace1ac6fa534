"""Shared fixtures: tiny asymmetric phantoms written in several orientations, and (as a plugin)
the fake OpenAI server fixtures of ``fake_openai.py``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# `tests/` is on sys.path (pyproject: pythonpath), so plugins and helpers import by name.
pytest_plugins = ["fake_openai"]


def phantom_ras(shape: tuple[int, int, int] = (24, 20, 16), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric integer-valued head-like phantom in RAS order plus a 3-class label.

    Integer values (as CT HU or MR units) so that DICOM int16 storage is exact.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x / 0.9) ** 2 + (y / 0.8) ** 2 + (z / 0.85) ** 2 < 1
    data = np.where(body, 400.0, 0.0)
    # Distinct blobs: right-anterior-superior bright blob, left-posterior dark one, inferior bar.
    ras = (x - 0.45) ** 2 + (y - 0.35) ** 2 + (z - 0.4) ** 2 < 0.08
    lps = (x + 0.4) ** 2 + (y + 0.4) ** 2 + (z + 0.1) ** 2 < 0.06
    bar = (np.abs(x) < 0.2) & (np.abs(y) < 0.6) & (z < -0.5) & body
    data[ras] = 1000.0
    data[lps] = 150.0
    data[bar] = 700.0
    data += np.round(rng.normal(0, 5, size=shape)) * body
    label = np.zeros(shape, dtype=np.uint8)
    label[ras] = 1
    label[lps] = 2
    label[bar] = 3
    return data.astype(np.float32), label


def ras_affine(spacing=(1.5, 1.2, 2.0), origin=(-20.0, -15.0, -10.0)) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def reorient(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Express the same image in another axis orientation (exact, no resampling)."""
    src = nib.orientations.io_orientation(affine)
    dst = nib.orientations.axcodes2ornt(tuple(codes))
    tr = nib.orientations.ornt_transform(src, dst)
    out = nib.orientations.apply_orientation(data, tr)
    new_aff = affine @ nib.orientations.inv_ornt_aff(tr, data.shape)
    return np.ascontiguousarray(out), new_aff


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def write_msd_task(root: Path, name: str, cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                   modality: dict | None = None, labels: dict | None = None) -> Path:
    task = root / name
    training = []
    for case, (data, affine, label) in cases.items():
        save_nifti(task / "imagesTr" / f"{case}.nii.gz", data, affine)
        item = {"image": f"./imagesTr/{case}.nii.gz"}
        if label is not None:
            save_nifti(task / "labelsTr" / f"{case}.nii.gz", label, affine)
            item["label"] = f"./labelsTr/{case}.nii.gz"
        training.append(item)
    info = {
        "name": name,
        "modality": modality or {"0": "CT"},
        "labels": labels or {"0": "background", "1": "blob", "2": "cyst", "3": "bar"},
        "training": training,
    }
    (task / "dataset.json").write_text(json.dumps(info))
    return task


@pytest.fixture
def phantom():
    return phantom_ras()
