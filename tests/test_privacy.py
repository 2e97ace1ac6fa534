"""Privacy by design: pseudonymous DICOM (and --pseudonymize) runs leave no patient identifier in
any manifest, record.json, report, log or progress line; a patient is one subject."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import phantom_ras, ras_affine, reorient, save_nifti

from curation.privacy.private_map import PrivateMap
from curation.privacy.scrub import Scrubber
from curation.sample.dicom_write import write_series
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.manifest import read_manifest, read_metadata
from curation.store.splits import case_splits

G = 24
# every spelling of the two patients' identifiers that must never come out
TOKENS = ["doe", "john", "roe", "jane", "19450102", "1945-01-02", "19501212", "mrn445566", "445566",
          "mrn112233", "112233", "acc55501", "55501", "st_mercy", "mercy"]


def cfg_for(workdir: Path, **kw) -> SliceConfig:
    return SliceConfig(workdir=workdir, pre=PreprocessConfig(grid_size=G), **kw)


def _dicom_patient(folder: Path, seed: int, name: str, pid: str, birth: str, accession: str, **kw) -> list[Path]:
    data, _ = phantom_ras(seed=seed)
    lps, aff = reorient(data, ras_affine(spacing=(1.0, 1.0, 2.0)), "LPS")
    paths = write_series(lps, aff, folder, modality="CT", patient_name=name, patient_id=pid, seed=seed, **kw)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PatientBirthDate, ds.AccessionNumber = birth, accession
        ds.InstitutionName = "St_Mercy Hospital"
        ds.SeriesDescription = f"CT {name.replace('^', ' ')} {birth[:4]}-{birth[4:6]}-{birth[6:]}"
        ds.save_as(p)
    return paths


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A hospital-style export: folders named after patients, dates, MRNs and accessions."""
    root = tmp_path_factory.mktemp("export") / "hospital"
    john = dict(name="Doe^John", pid="MRN445566", birth="19450102", accession="ACC55501")
    jane = dict(name="Roe^Jane", pid="MRN112233", birth="19501212", accession="ACC77701")
    _dicom_patient(root / "ACC55501_19450102" / "ser1", 0, **john)
    _dicom_patient(root / "doe_john" / "birth_19450102", 1, **john)
    _dicom_patient(root / "Roe Jane 19501212" / "MRN112233", 2, **jane)
    bad = _dicom_patient(root / "Roe Jane 19501212" / "MRN112233_b", 3, **jane)
    bad[len(bad) // 2].unlink()  # a missing slice: an error row that would name the folder
    junk = root / "JANE_ROE_19501212"
    junk.mkdir()
    (junk / "ROE^JANE.dcm").write_bytes(b"garbage, not DICOM")  # a folder of unreadable files only
    return root


def _lookup_app():
    """`curate lookup` on its own (med3dinsight/curate.py registers it as `curate lookup`)."""
    import typer

    from med3dinsight.lookup import lookup_cmd

    app = typer.Typer()
    app.command("lookup")(lookup_cmd)
    app.command("noop")(lambda: None)  # two commands: typer keeps the subcommand name
    return app


def _texts(workdir: Path) -> dict[str, str]:
    """Everything a user could share: manifests (values + metadata), records, HTML."""
    out = {}
    for p in workdir.rglob("*"):
        if not p.is_file() or "private" in p.relative_to(workdir).parts:
            continue
        if p.suffix == ".parquet":
            out[str(p)] = read_manifest(p).to_csv() + json.dumps(read_metadata(p))
        elif p.suffix in (".json", ".html", ".jsonl", ".txt"):
            out[str(p)] = p.read_text()
    return out


def _leaks(text: str) -> list[str]:
    low = text.lower()
    return [t for t in TOKENS if t in low]


def test_scrubber_any_case_order_and_separator() -> None:
    s = Scrubber([("name", "Doe^John"), ("id", "MRN112233"), ("date", "19450102"), ("id", "ACC55501")])
    for text in ["ACC55501_19450102/ser1", "doe_john/birth_19450102", "JOHN DOE", "JohnDoe", "Doe, John",
                 "john-doe mrn-112233 112233", "1945-01-02", "02.01.1945", "MRN112233"]:
        assert not _leaks(s(text)), (text, s(text))
    assert s("Liver CT, does not apply") == "Liver CT, does not apply"  # words merely containing a name stay


def test_dicom_run_is_pseudonymous_everywhere(export: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from med3dinsight.curate import app

    w = tmp_path / "w"
    res = CliRunner().invoke(app, ["slice", "--dataset", "dicom", "--root", str(export), "--workdir", str(w),
                                   "--grid-size", str(G)])
    assert res.exit_code == 0, res.output
    assert not _leaks(res.output), res.output  # progress bar, skip and error lines
    assert "input-" in res.output  # the unreadable file has a line, by id
    skipped = re.search(r"input-[0-9a-f]{12}", res.output).group(0)
    res = CliRunner().invoke(app, ["report", "--workdir", str(w), "--size", "64"])
    assert res.exit_code == 0, res.output
    for name, text in _texts(w).items():
        assert not _leaks(text), (name, _leaks(text))
    vols = read_manifest(w / "manifests/volumes.parquet")
    ok = vols[vols["status"] == "ok"]
    assert len(ok) == 3 and (vols["status"] == "error").sum() == 1
    # a patient is one subject: John's two series share a case, Jane's differ from it
    assert vols["case_id"].nunique() == 2
    # the one private file maps ids back to real paths, and `curate lookup` reads it
    pmap = PrivateMap(w)
    assert oct(pmap.path.stat().st_mode & 0o777) == "0o600"
    err = vols[vols["status"] == "error"].iloc[0]
    entry = pmap.lookup(err["volume_id"])[0]
    assert "MRN112233_b" in entry["source"]
    res = CliRunner().invoke(_lookup_app(), ["lookup", err["volume_id"], "--workdir", str(w)])
    assert res.exit_code == 0 and "MRN112233_b" in res.output, res.output
    # and the skipped input's id leads back to its file too (privately)
    res = CliRunner().invoke(_lookup_app(), ["lookup", skipped, "--workdir", str(w)])
    assert res.exit_code == 0 and str(export) in res.output.replace("\n", ""), res.output
    # rerun: everything resumes from the records (fingerprints from the sources on disk)
    again = run_slice("dicom", export, cfg_for(w), log=lambda *_: None)
    assert again.skipped == 3 and again.processed == 0


def test_pseudonymize_flag_hides_nifti_folder_names(tmp_path: Path) -> None:
    root = tmp_path / "export"
    data, label = phantom_ras(seed=4)
    save_nifti(root / "Roe Jane 19501212" / "MRN112233" / "img.nii.gz", data, ras_affine())
    save_nifti(root / "doe_john" / "birth_19450102" / "scan.nii.gz", data[::-1].copy(), ras_affine())
    (root / "doe_john" / "birth_19450102" / "broken.nii.gz").write_bytes(b"not gzip")
    lines: list[str] = []
    s = run_slice("nifti", root, cfg_for(tmp_path / "w", pseudonymize=True), log=lines.append,
                  on_progress=lambda d, t, name: lines.append(name))
    assert s.processed == 2 and s.errors == 1
    assert not _leaks("\n".join(lines)), lines
    for name, text in _texts(tmp_path / "w").items():
        assert not _leaks(text), (name, _leaks(text))
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet")
    assert set(vols["subset"]) == {"nifti"}
    assert all(PrivateMap(tmp_path / "w").lookup(v) for v in vols["volume_id"])


def test_identical_scans_under_two_cases_are_flagged_and_share_a_split(tmp_path: Path) -> None:
    root = tmp_path / "d"
    data, _ = phantom_ras(seed=5)
    save_nifti(root / "case_a" / "ct.nii.gz", data, ras_affine())
    (root / "case_b").mkdir()
    (root / "case_b" / "ct.nii.gz").write_bytes((root / "case_a" / "ct.nii.gz").read_bytes())
    save_nifti(root / "case_c" / "ct.nii.gz", data[::-1].copy(), ras_affine())
    run_slice("nifti", root, cfg_for(tmp_path / "w"), log=lambda *_: None)
    vols = read_manifest(tmp_path / "w/manifests/volumes.parquet").sort_values("volume_id")
    assert vols["case_id"].nunique() == 3
    dup = vols[vols["duplicate_of"].notna()]
    assert len(dup) == 1 and dup["duplicate_of"].iloc[0] in set(vols["volume_id"])
    splits = case_splits(vols)
    case_of = dict(zip(vols["source_path"], vols["case_id"].astype(str)))
    assert splits[case_of["case_a/ct.nii.gz"]] == splits[case_of["case_b/ct.nii.gz"]]


def test_ids_do_not_depend_on_how_root_is_spelled(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data"
    data, _ = phantom_ras(seed=6)
    save_nifti(root / "a.nii.gz", data, ras_affine())
    link = tmp_path / "link"
    os.symlink(root, link)
    first = run_slice("nifti", root, cfg_for(tmp_path / "w"), log=lambda *_: None)
    ids = list(read_manifest(tmp_path / "w/manifests/volumes.parquet")["volume_id"])
    monkeypatch.chdir(tmp_path)
    for spelling in (Path("data"), link, Path("./link/")):
        again = run_slice("nifti", spelling, cfg_for(tmp_path / "w"), log=lambda *_: None)
        assert (again.processed, again.skipped) == (0, first.processed), spelling
        assert list(read_manifest(tmp_path / "w/manifests/volumes.parquet")["volume_id"]) == ids
    assert pd.notna(ids[0])
    assert np.isfinite(first.seconds)
