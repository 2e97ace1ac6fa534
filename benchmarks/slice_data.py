"""The volumes `bench_slice.py` times: CT-like and MR-like NIfTI files generated once from a fixed
seed (plus nilearn's MNI152 template), each with a label file; see benchmarks/README.md."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

DATA_VERSION = 2
KINDS = ("ct", "mr", "mni")
N_FULL = {"ct": 8, "mr": 7, "mni": 1}
# The uneven set: 12 small MR, then 4 long CT whose slice counts grow to the last (discovery
# order: Task01 before Task03), the order in which a pool that hands volumes out as found ends
# with one worker on the largest volume while the other idles.
UNEVEN_VERSION = 1
UNEVEN_MR = 12
UNEVEN_CT_SLICES = (120, 200, 280, 360)

def _nifti(data, affine, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _make_ct(rng, k: int, nz: int | None = None):
    """A CT-like abdomen: air outside an elliptical body, fat rim, soft tissue, organs, spine,
    lung bases in the upper slices, a scanner table; int16 HU with noise (``nz`` slices, default
    48..61 drawn from ``rng``)."""
    import numpy as np

    nz = int(rng.integers(48, 62)) if nz is None else nz
    sx = float(rng.uniform(0.6, 0.8))
    sz = 5.0
    n = 512
    lps = k % 2 == 0  # alternate LPS and LAS, both seen from dcm2niix
    i = np.arange(n, dtype=np.float32)[:, None]
    j = np.arange(n, dtype=np.float32)[None, :]
    # j grows towards posterior for LPS, towards anterior for LAS
    post = 1.0 if lps else -1.0
    ci, cj = n / 2 + rng.uniform(-10, 10), n / 2 + rng.uniform(-10, 10)
    a = (330.0 / 2) / sx * rng.uniform(0.9, 1.05)  # half-width in voxels (~33 cm body)
    b = (240.0 / 2) / sx * rng.uniform(0.9, 1.05)
    vol = np.empty((n, n, nz), dtype=np.int16)
    label = np.zeros((n, n, nz), dtype=np.uint8)
    table_j = cj + post * (b + 25)
    for z in range(nz):
        t = z / max(nz - 1, 1)
        scale = 1.0 - 0.08 * abs(t - 0.5)
        r2 = ((i - ci) / (a * scale)) ** 2 + ((j - cj) / (b * scale)) ** 2
        sl = np.full((n, n), -1000.0, dtype=np.float32)
        sl[r2 <= 1.0] = -100.0  # fat rim
        sl[r2 <= 0.8] = 40.0  # soft tissue
        liver = ((i - (ci - post * 0.0 - 0.35 * a)) / (0.3 * a)) ** 2 + ((j - (cj - post * 0.1 * b)) / (0.45 * b)) ** 2
        sl[liver <= 1.0] = 60.0
        spleen = ((i - (ci + 0.45 * a)) / (0.12 * a)) ** 2 + ((j - (cj + post * 0.35 * b)) / (0.2 * b)) ** 2
        in_spleen = spleen <= 1.0 - 0.6 * abs(t - 0.55) * 2
        sl[in_spleen] = 50.0
        if t > 0.7:  # lung bases
            for side in (-1, 1):
                lung = ((i - (ci + side * 0.45 * a)) / (0.28 * a)) ** 2 + ((j - (cj + post * 0.1 * b)) / (0.5 * b)) ** 2
                sl[lung <= (t - 0.7) / 0.3] = -850.0
        vert = ((i - ci) ** 2 + (j - (cj + post * 0.7 * b)) ** 2) * sx * sx
        sl[vert <= 18.0**2] = 300.0  # cancellous bone
        sl[(vert <= 18.0**2) & (vert >= 15.0**2)] = 900.0  # cortex
        ribs = (r2 <= 0.86) & (r2 >= 0.8) & (np.abs(np.sin(np.arctan2(j - cj, i - ci) * 9)) > 0.8)
        sl[ribs & (t > 0.5)] = 700.0
        sl[(np.abs(j - table_j) < 6) & (np.abs(i - ci) < a * 1.1)] = 200.0  # table
        body = sl > -950
        noise = rng.normal(0.0, 15.0, size=(n, n)).astype(np.float32)
        sl = np.where(body, sl + noise, sl + noise * 0.3)
        vol[:, :, z] = np.clip(np.rint(sl), -1024, 3071).astype(np.int16)
        label[:, :, z] = in_spleen
    if lps:
        affine = np.diag([-sx, -sx, sz, 1.0])
    else:
        affine = np.diag([-sx, sx, sz, 1.0])
    affine[:3, 3] = [sx * n / 2, (sx * n / 2) if lps else -(sx * n / 2), -sz * nz / 2]
    return vol, label, affine


def _make_mr(rng, k: int):
    """An MR-like head: scalp, dark skull, grey/white matter, ventricles, Rician-ish background."""
    import numpy as np

    n, nz = 256, 24
    sx, sz = 0.9, 6.0
    i = np.arange(n, dtype=np.float32)[:, None, None]
    j = np.arange(n, dtype=np.float32)[None, :, None]
    z = np.arange(nz, dtype=np.float32)[None, None, :]
    ci, cj, cz = n / 2 + rng.uniform(-5, 5), n / 2 + rng.uniform(-5, 5), nz / 2
    a, b, c = 75.0 / sx, 95.0 / sx, 75.0 / sz
    r2 = ((i - ci) / a) ** 2 + ((j - cj) / b) ** 2 + ((z - cz) / c) ** 2
    vol = np.zeros((n, n, nz), dtype=np.float32)
    vol[r2 <= 1.0] = 900.0  # scalp fat
    vol[r2 <= 0.9] = 60.0  # skull
    vol[r2 <= 0.8] = 450.0  # grey matter
    wm = r2 <= 0.5
    vol[wm] = 650.0  # white matter
    vent = ((i - ci) / (0.12 * a)) ** 2 + ((j - cj) / (0.3 * b)) ** 2 + ((z - cz) / (0.3 * c)) ** 2 <= 1.0
    vol[vent] = 150.0
    texture = rng.normal(0.0, 1.0, size=(n // 8, n // 8, nz)).astype(np.float32)
    texture = np.repeat(np.repeat(texture, 8, axis=0), 8, axis=1)
    vol = vol * (1.0 + 0.05 * texture) * (1.0 + 0.15 * (i - ci) / n)  # bias field
    noise = np.abs(vol + rng.normal(0.0, 12.0, size=vol.shape) + 1j * rng.normal(0.0, 12.0, size=vol.shape))
    vol = noise.astype(np.float32)
    label = np.zeros((n, n, nz), dtype=np.uint8)
    label[r2 <= 0.8] = 1
    label[vent] = 2
    if k % 2 == 0:
        vol = np.rint(vol).astype(np.int16)
    orient = k % 3
    if orient == 0:  # LPS
        affine = np.diag([-sx, -sx, sz, 1.0])
    elif orient == 1:  # RAS
        affine = np.diag([sx, sx, sz, 1.0])
    else:  # LAS
        affine = np.diag([-sx, sx, sz, 1.0])
    affine[:3, 3] = [-affine[0, 0] * n / 2, -affine[1, 1] * n / 2, -sz * nz / 2]
    return vol, label, affine


def ensure_data(data_dir: Path, log=print) -> dict[str, Path]:
    """Generate the full set once (and the quick set as hard links into it); return set roots."""
    import numpy as np

    full, quick = data_dir / "full", data_dir / "quick"
    stamp = data_dir / f".complete-v{DATA_VERSION}"
    if stamp.exists():
        return {"full": full, "quick": quick}
    t0 = time.perf_counter()
    log(f"generating benchmark volumes into {data_dir} (once) ...")
    for p in (full, quick):
        if p.exists():
            shutil.rmtree(p)
    rng = np.random.default_rng(1234)
    task = full / "ct" / "Task09_Spleen"
    for k in range(N_FULL["ct"]):
        vol, lab, aff = _make_ct(rng, k)
        _nifti(vol, aff, task / "imagesTr" / f"spleen_{k:03d}.nii.gz")
        _nifti(lab, aff, task / "labelsTr" / f"spleen_{k:03d}.nii.gz")
    info = {
        "name": "Spleen (synthetic, benchmark)",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
    }
    (task / "dataset.json").write_text(json.dumps(info, indent=1))
    for k in range(N_FULL["mr"]):
        vol, lab, aff = _make_mr(rng, k)
        _nifti(vol, aff, full / "mr" / "images" / f"mr_{k:03d}.nii.gz")
        _nifti(lab, aff, full / "mr" / "labels" / f"mr_{k:03d}.nii.gz")
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    _nifti(np.asarray(tpl.dataobj), tpl.affine, full / "mni" / "images" / "mni152_t1_1mm.nii.gz")
    _nifti(np.asarray(mask.dataobj).astype(np.uint8), mask.affine, full / "mni" / "labels" / "mni152_t1_1mm.nii.gz")
    # quick set: the first volume of each kind (hard links; a copy where links fail)
    for src in sorted(full.rglob("*")):
        if not src.is_file():
            continue
        rel = src.relative_to(full)
        if src.name.endswith(".nii.gz") and not src.name.startswith(("spleen_000", "mr_000", "mni152")):
            continue
        dst = quick / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    stamp.write_text(json.dumps({"version": DATA_VERSION}))
    log(f"generated in {time.perf_counter() - t0:.1f} s")
    return {"full": full, "quick": quick}


def ensure_uneven(data_dir: Path, log=print) -> Path:
    """Generate the uneven set once (about a minute): ``uneven/Task01_BrainMR`` (12 MR-like
    256x256x24) and ``uneven/Task03_Liver`` (4 CT-like 512x512 with 120..360 slices), MSD
    task folders with their dataset.json; return its root."""
    import numpy as np

    root = data_dir / "uneven"
    stamp = data_dir / f".complete-uneven-v{UNEVEN_VERSION}"
    if stamp.exists():
        return root
    t0 = time.perf_counter()
    log(f"generating the uneven benchmark set into {root} (once) ...")
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(4321)
    tasks = (("Task01_BrainMR", "MR", "mr", {"1": "brain", "2": "ventricles"}),
             ("Task03_Liver", "CT", "liver", {"1": "spleen"}))
    for task, modality, stem, labels in tasks:
        folder = root / task
        n = UNEVEN_MR if modality == "MR" else len(UNEVEN_CT_SLICES)
        for k in range(n):
            vol, lab, aff = _make_mr(rng, k) if modality == "MR" else _make_ct(rng, k, UNEVEN_CT_SLICES[k])
            _nifti(vol, aff, folder / "imagesTr" / f"{stem}_{k:03d}.nii.gz")
            _nifti(lab, aff, folder / "labelsTr" / f"{stem}_{k:03d}.nii.gz")
        info = {"name": f"{task} (synthetic, benchmark)", "modality": {"0": modality},
                "labels": {"0": "background", **labels}}
        (folder / "dataset.json").write_text(json.dumps(info, indent=1))
    stamp.write_text(json.dumps({"version": UNEVEN_VERSION}))
    log(f"generated in {time.perf_counter() - t0:.1f} s")
    return root


def volume_pairs(set_root: Path) -> list[dict]:
    """(image, label, kind, modality) for every volume of a set, in a fixed order: the MSD task
    folders (sorted; kind from their dataset.json), then the ``mr`` and ``mni`` folders."""
    out = []
    for info in sorted(set_root.glob("*/dataset.json")) + sorted(set_root.glob("ct/*/dataset.json")):
        task = info.parent
        modality = json.loads(info.read_text())["modality"]["0"]
        for img in sorted((task / "imagesTr").glob("*.nii.gz")):
            out.append({"kind": modality.lower(), "modality": modality, "image": str(img),
                        "label": str(task / "labelsTr" / img.name)})
    for kind in ("mr", "mni"):
        for img in sorted((set_root / kind / "images").glob("*.nii.gz")):
            out.append({"kind": kind, "modality": "MR", "image": str(img), "label": str(set_root / kind / "labels" / img.name)})
    return out


def describe(pairs: list[dict]) -> list[dict]:
    import nibabel as nib

    rows = []
    for p in pairs:
        img = nib.load(p["image"])
        rows.append(
            {
                "kind": p["kind"],
                "file": Path(p["image"]).name,
                "shape": list(img.shape),
                "spacing": [round(float(v), 3) for v in img.header.get_zooms()[:3]],
                "dtype": str(img.get_data_dtype()),
                "axcodes": "".join(nib.aff2axcodes(img.affine)),
                "mb_gz": round(os.path.getsize(p["image"]) / 1e6, 1),
            }
        )
    return rows
