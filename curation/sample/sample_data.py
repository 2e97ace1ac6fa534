"""`curate sample-data`: a small real dataset from volumes that installed packages ship.

Layout written under ``out``::

    3dseg8/Task90_MNI152/           MSD task: nilearn's MNI152 T1 template, labels from its
        dataset.json, imagesTr/, labelsTr/   grey/white-matter and brain masks (1 GM, 2 WM, 3 CSF)
    3dseg8/BrainMR_nibabel/images/  nibabel's test volumes (a 3D LAS MR and a 4D 2-volume file)
    3dseg8/train.txt                MedicalNet-style list file naming the nibabel images
    dicom/emri/                     pydicom-data's enhanced multi-frame MR (emri_small.dcm)
    dicom/ct5n/                     pydicom's classic single-frame CT series (dicomdirtests CT5N)
    dicom/mni_sagittal_oblique/     the MNI152 template written as a double-oblique sagittal
                                    MR series (shuffled files, disordered InstanceNumbers)

Nothing is downloaded: every file comes from site-packages.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import numpy as np

from curation.imageio.nib import nib
from curation.store.fsutil import atomic_write_bytes


def _put(path: Path, data: bytes) -> None:
    """Write only when the content differs, so a rerun leaves files (and mtimes) alone and
    `curate slice` can resume instead of reprocessing."""
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _put_nifti(path: Path, img: nib.Nifti1Image) -> None:
    _put(path, gzip.compress(img.to_bytes(), mtime=0))


def _site_file(module: str, *parts: str) -> Path:
    import importlib

    mod = importlib.import_module(module)
    return Path(mod.__file__).parent.joinpath(*parts)


def write_mni_task(out: Path, resolution: int = 2) -> Path:
    """MSD-style task folder from nilearn's MNI152 template and tissue masks."""
    from nilearn import datasets as nd

    task = out / "Task90_MNI152"
    (task / "imagesTr").mkdir(parents=True, exist_ok=True)
    (task / "labelsTr").mkdir(parents=True, exist_ok=True)
    t1 = nd.load_mni152_template(resolution=resolution)
    gm = np.asarray(nd.load_mni152_gm_mask(resolution=resolution).dataobj) > 0
    wm = np.asarray(nd.load_mni152_wm_mask(resolution=resolution).dataobj) > 0
    brain = np.asarray(nd.load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    label = np.zeros(t1.shape, dtype=np.uint8)
    label[brain] = 3
    label[wm] = 2
    label[gm & ~wm] = 1
    img = nib.Nifti1Image(np.asarray(t1.dataobj).astype(np.float32), t1.affine)
    img.set_qform(t1.affine, code=1)
    img.set_sform(t1.affine, code=1)
    _put_nifti(task / "imagesTr" / "mni152_001.nii.gz", img)
    lab = nib.Nifti1Image(label, t1.affine)
    lab.set_qform(t1.affine, code=1)
    lab.set_sform(t1.affine, code=1)
    _put_nifti(task / "labelsTr" / "mni152_001.nii.gz", lab)
    info = {
        "name": "MNI152",
        "description": "nilearn's MNI152 (ICBM 2009a symmetric) T1 template with tissue masks as labels",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "grey matter", "2": "white matter", "3": "cerebrospinal fluid"},
        "numTraining": 1,
        "training": [{"image": "./imagesTr/mni152_001.nii.gz", "label": "./labelsTr/mni152_001.nii.gz"}],
        "test": [],
    }
    _put(task / "dataset.json", json.dumps(info, indent=2).encode())
    return task


def write_nibabel_subset(out: Path) -> Path:
    sub = out / "BrainMR_nibabel" / "images"
    sub.mkdir(parents=True, exist_ok=True)
    data_dir = _site_file("nibabel", "tests", "data")
    for name in ("anatomical.nii", "example4d.nii.gz"):
        _put(sub / name, (data_dir / name).read_bytes())
    lines = [f"BrainMR_nibabel/images/{n}" for n in ("anatomical.nii", "example4d.nii.gz")]
    _put(out / "train.txt", ("\n".join(lines) + "\n").encode())
    return sub


def write_dicom_samples(out: Path) -> Path:
    """Copies of real DICOM objects shipped by pydicom and pydicom-data."""
    out.mkdir(parents=True, exist_ok=True)
    emri = out / "emri"
    emri.mkdir(exist_ok=True)
    src = _site_file("data_store", "data", "emri_small.dcm")
    if src.exists():
        _put(emri / "emri_small.dcm", src.read_bytes())
    ct5n = _site_file("pydicom", "data", "test_files", "dicomdirtests", "98892001", "CT5N")
    if ct5n.is_dir():
        dst = out / "ct5n"
        dst.mkdir(exist_ok=True)
        for f in sorted(ct5n.iterdir()):
            _put(dst / f"{f.name}.dcm", f.read_bytes())
    return out


def write_mni_dicom(out: Path, resolution: int = 2) -> Path:
    """nilearn's MNI152 template written as a sagittal, double-oblique MR series (shuffled
    files, InstanceNumbers that disagree with position): a real volume with a hard geometry."""
    from nilearn import datasets as nd

    from curation.sample.dicom_write import write_series

    t1 = nd.load_mni152_template(resolution=resolution)
    data = np.asarray(t1.dataobj).astype(np.float32)
    data = np.round(data / max(float(data.max()), 1e-6) * 1000.0)
    # Re-express as sagittal slices (slice axis = R) tilted 12 degrees about R and 8 about S.
    sag = np.ascontiguousarray(np.transpose(data, (1, 2, 0)))  # (A, S, R)
    aff = t1.affine[:, [1, 2, 0, 3]]
    a, b = np.deg2rad(12.0), np.deg2rad(8.0)
    rot_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rot_z = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    oblique = aff.copy()
    oblique[:3, :3] = rot_z @ rot_x @ aff[:3, :3]
    dst = out / "mni_sagittal_oblique"
    with tempfile.TemporaryDirectory() as tmp:
        for f in write_series(sag, oblique, Path(tmp), modality="MR", shuffle=True, instance_numbers="random", seed=7):
            _put(dst / f.name, f.read_bytes())
    return dst


SAMPLE_DIR = Path("data") / "sample"  # where the sample dataset goes inside a workdir by default


def default_out(workdir: str | Path) -> Path:
    """The sample dataset's default folder: ``<workdir>/data/sample``."""
    return Path(workdir) / SAMPLE_DIR


def make_sample_data(out: str | Path, resolution: int = 2) -> dict[str, Path]:
    """Build the whole sample dataset; returns the roots to pass to `curate slice`."""
    out = Path(out)
    seg8 = out / "3dseg8"
    seg8.mkdir(parents=True, exist_ok=True)
    write_mni_task(seg8, resolution=resolution)
    write_nibabel_subset(seg8)
    dicom = write_dicom_samples(out / "dicom")
    write_mni_dicom(dicom, resolution=2)
    return {"3dseg8": seg8, "dicom": dicom}
