"""Privacy under attack (issue 22): identifiers hidden in DICOM free text, other spellings of a
known identity, paths in the provenance command, a planted private map, SQL that would read or
write files."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from conftest import phantom_ras, ras_affine, reorient

from curation.privacy.scrub import Scrubber
from curation.sample.dicom_write import write_series

G = 24

# --------------------------------------------------------------------------- the scrubber

JANE = [("name", "Roe^Jane"), ("id", "MRN778899"), ("date", "19620315"), ("id", "ACC123987")]
JANE_SPELLINGS = ["J. R.", "J.R.", "R. J.", "jroe", "JRoe", "roej", "Roe, Jane", "JANE ROE", "jane_roe",
                  "778-899", "778 899", "MRN 778-899", "M R N 778899", "acc-123-987", "3/15/62", "03/15/1962",
                  "15.3.1962", "15.03.1962", "1962-03-15", "19620315", "March 15, 1962", "15 Mar 1962"]


@pytest.mark.parametrize("text", JANE_SPELLINGS)
def test_known_identity_in_other_spellings_is_scrubbed(text: str) -> None:
    out = Scrubber(JANE)(f"see {text} here")
    assert out == "see <redacted> here", (text, out)


def test_scrubber_keeps_ordinary_words_and_numbers() -> None:
    s = Scrubber(JANE)
    for text in ["Jaw MR, Roentgen", "T1 3.5 mm 512x512", "series 7 of 12", "Liver CT, does not apply"]:
        assert s(text) == text


@pytest.mark.parametrize("text,kept", [
    ("CT DOE^JOHN DOB 01/02/1970 MRN: 4455667", "CT"),
    ("Head 1970-01-02 acc# A998877 t1", "Head"),
    ("Name: John Doe | abdomen", "abdomen"),
    ("chest 02.01.1970 id: 123456", "chest"),
    ("Patient ID 4455667 ax", "ax"),
    ("Jan 2, 1970 brain 19700102", "brain"),
])
def test_free_text_without_known_identity_loses_what_looks_like_one(text: str, kept: str) -> None:
    from curation.privacy.scrub import generic_scrub

    out = Scrubber([], generic=True)(text)
    assert kept in out
    for token in ("doe", "john", "1970", "4455667", "998877", "123456", "01/02", "02.01"):
        assert token not in out.lower(), (text, out)
    assert generic_scrub("T1 MPRAGE sag 1.0 mm, 3 echoes") == "T1 MPRAGE sag 1.0 mm, 3 echoes"


# --------------------------------------------------------------------------- DICOM free text end to end

LEAKS = re.compile(r"(?i)\bdoe\b|\bjohn\b|1970|4455667|445-5667|\bjroe\b|\broe\b|\bjane\b|778899|778-899|1962|"
                   r"01/02|15\.3\.|\bj\.\s?[dr]\.")


def _series(folder: Path, seed: int, name: str, pid: str, texts: dict[str, str], birth: str = "",
            drop_middle: bool = False, localizer: bool = False) -> None:
    data, _ = phantom_ras(seed=seed)
    lps, aff = reorient(data, ras_affine(spacing=(1.0, 1.0, 2.0)), "LPS")
    paths = write_series(lps, aff, folder, modality="CT", patient_name=name, patient_id=pid, seed=seed)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
        for keyword, value in texts.items():
            setattr(ds, keyword, value)
        if localizer:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(p)
    if drop_middle:
        paths[len(paths) // 2].unlink()


@pytest.fixture(scope="module")
def free_text_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("free") / "export"
    anon = {"SeriesDescription": "DOE^JOHN DOB 01/02/1970 MRN: 4455667",
            "StudyDescription": "John Doe 1970-01-02 mrn 445-5667", "ProtocolName": "doe^john 4455667",
            "ImageComments": "pt John Doe born 1/2/70"}
    _series(root / "a", 0, "", "", anon, drop_middle=True)  # an error row naming the series
    _series(root / "b", 1, "", "", anon, localizer=True)  # a set-aside line naming the series
    jane = {"SeriesDescription": "J.R. jroe 3/15/62 MRN 778-899", "StudyDescription": "Roe, Jane 15.3.1962"}
    _series(root / "c", 2, "Roe^Jane", "MRN778899", jane, birth="19620315", drop_middle=True)
    _series(root / "d", 3, "", "", {"SeriesDescription": "plain CT"})
    return root


def test_identifiers_in_dicom_free_text_reach_no_output(free_text_export: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from curation.store.manifest import read_manifest
    from med3dinsight.curate import app

    w = tmp_path / "w"
    runner = CliRunner()
    res = runner.invoke(app, ["slice", "--dataset", "dicom", "--root", str(free_text_export), "--workdir", str(w),
                              "--grid-size", str(G)])
    assert res.exit_code == 0, res.output
    assert "series" in res.output and "redacted" in res.output, res.output  # the lines are there, scrubbed
    assert not LEAKS.search(res.output), LEAKS.search(res.output)
    vols = read_manifest(w / "manifests/volumes.parquet")
    assert (vols["status"] == "error").sum() == 2 and (vols["status"] == "ok").sum() == 1
    for err in vols["error"].dropna():
        assert not LEAKS.search(err), err
    res_report = runner.invoke(app, ["report", "--workdir", str(w), "--size", "32"])
    assert res_report.exit_code == 0, res_report.output
    for p in (w / "reports").rglob("*.html"):
        assert not LEAKS.search(p.read_text()), p
    res_stats = runner.invoke(app, ["stats", "--workdir", str(w)])
    assert res_stats.exit_code == 0 and "error" in res_stats.output.lower()
    assert not LEAKS.search(res_stats.output), res_stats.output


# --------------------------------------------------------------------------- provenance command


@pytest.mark.parametrize("argv", [
    ["slice", "--dataset=dicom", "--root=/data/Doe_John/scans", "--workdir", "/home/jdoe/w"],
    ["slice", "--root", "/data/Doe_John/scans", "--dataset", "nifti", "--label-root=/data/Doe_John/labels"],
    ["caption", "--prompt-file=/data/Doe_John/p.txt", "--out", "/data/Doe_John/v1.parquet", "--budget", "5"],
    ["slice", "--workdir=/data/Doe_John/w", "--dataset", "3dseg8", "--root", "relative/Doe_John"],
    ["finetune", "--labels", "/data/Doe_John/labels.csv", "--split-file=/data/Doe_John/s.json"],
])
def test_provenance_command_hides_every_path(tmp_path: Path, monkeypatch, argv: list[str]) -> None:
    from curation.store.manifest import read_metadata, write_manifest

    monkeypatch.setattr(sys, "argv", ["/usr/bin/curate", *argv])
    path = write_manifest(pd.DataFrame({"a": [1]}), tmp_path / "m.parquet")
    command = read_metadata(path)["command"]
    assert "Doe_John" not in command and "jdoe" not in command, command
    assert command.startswith("curate ") and "<path>" in command
    assert "--budget 5" in command or "--budget" not in argv


# --------------------------------------------------------------------------- planted private map


def _key(w: Path) -> bytes:
    from curation.privacy.private_map import PrivateMap

    return PrivateMap(w).key()


def test_private_map_is_created_owner_only(tmp_path: Path) -> None:
    _key(tmp_path)
    assert oct((tmp_path / "private").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "private/source_map.jsonl").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("case", ["world_writable_folder", "group_writable_file", "world_readable_file",
                                  "link_to_elsewhere", "foreign_owner"])
def test_planted_private_map_is_refused(tmp_path: Path, case: str) -> None:
    from curation.privacy.private_map import PrivateMapError
    from curation.slicing.preprocess import PreprocessConfig
    from curation.slicing.stage import SliceConfig, run_slice

    w = tmp_path / "w"
    private = w / "private"
    private.mkdir(parents=True)
    planted = '{"key": "' + "00" * 32 + '"}\n'
    if case == "world_writable_folder":
        os.chmod(private, 0o777)
    elif case == "link_to_elsewhere":
        os.chmod(private, 0o700)
        (tmp_path / "elsewhere.jsonl").write_text(planted)
        os.symlink(tmp_path / "elsewhere.jsonl", private / "source_map.jsonl")
    else:
        os.chmod(private, 0o700)
        (private / "source_map.jsonl").write_text(planted)
        os.chmod(private / "source_map.jsonl", {"group_writable_file": 0o620, "world_readable_file": 0o604}.get(case, 0o600))
        if case == "foreign_owner":
            if os.getuid() != 0:
                pytest.skip("needs root to give the file away")
            os.chown(private / "source_map.jsonl", 4321, 4321)
    with pytest.raises(PrivateMapError) as info:
        _key(w)
    assert "refusing" in str(info.value) and "\n" not in str(info.value)
    root = tmp_path / "d"
    root.mkdir()
    with pytest.raises(PrivateMapError):
        run_slice("dicom", root, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=G)), log=lambda *_: None)


# --------------------------------------------------------------------------- SQL


@pytest.fixture()
def query_workdir(tmp_path: Path) -> Path:
    from curation.store.manifest import VOLUMES_SCHEMA, write_manifest

    w = tmp_path / "w"
    df = pd.DataFrame({"volume_id": ["a", "b", "c"], "status": ["ok", "ok", "error"], "case_id": ["1", "2", "3"],
                       "subset": ["x", "y", "x"], "dataset": "nifti"})
    write_manifest(df, w / "manifests/volumes.parquet", VOLUMES_SCHEMA)
    (tmp_path / "outside.csv").write_text("secret\nSECRET-VALUE\n")
    return w


@pytest.mark.parametrize("sql", [
    "COPY (SELECT * FROM volumes) TO '{tmp}/stolen.csv'",
    "SELECT * FROM read_csv('{tmp}/outside.csv')",
    "SELECT * FROM read_text('{tmp}/outside.csv')",
    "SELECT * FROM glob('{tmp}/*')",
    "SELECT * FROM '{tmp}/outside.csv'",
    "ATTACH '{tmp}/x.duckdb' AS x",
    "INSTALL httpfs",
    "LOAD json",
    "PRAGMA version",
    "SET enable_external_access = true",
    "SELECT 1; COPY (SELECT 1) TO '{tmp}/stolen.csv'",
    "CREATE TABLE t AS SELECT 1",
    "EXPORT DATABASE '{tmp}/exported'",
])
def test_curate_query_is_read_only(query_workdir: Path, sql: str) -> None:
    import duckdb

    from curation.store.query import run_query

    tmp = query_workdir.parent
    with pytest.raises((ValueError, duckdb.Error)):
        run_query(query_workdir, sql.format(tmp=tmp))
    assert not (tmp / "stolen.csv").exists() and not (tmp / "exported").exists() and not (tmp / "x.duckdb").exists()


def test_curate_query_reads_the_manifests(query_workdir: Path) -> None:
    from curation.store.query import run_query

    assert run_query(query_workdir, "SELECT count(*) AS n FROM volumes")["n"].iloc[0] == 3
    assert len(run_query(query_workdir, "WITH v AS (SELECT * FROM volumes) SELECT * FROM v WHERE status='ok'")) == 2
    assert len(run_query(query_workdir, "DESCRIBE volumes")) > 3


def test_curate_query_cli_refusal_is_one_line(query_workdir: Path) -> None:
    from typer.testing import CliRunner

    from med3dinsight.curate import app

    res = CliRunner().invoke(app, ["query", f"COPY volumes TO '{query_workdir.parent}/stolen.csv'",
                                   "--workdir", str(query_workdir)])
    assert res.exit_code == 2 and "read-only" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("where", ["1=1); COPY (SELECT 1) TO '/tmp/stolen_by_where.csv'", "TRUE) OR (TRUE",
                                   "status = 'error') OR (1=1", "1=1; SELECT 1", "TRUE --",
                                   "read_text('/etc/hostname') IS NOT NULL"])
def test_finetune_where_takes_one_boolean_expression(query_workdir: Path, where: str) -> None:
    from training.finetune.data import select_volumes
    from training.loop.errors import TrainingError

    if where == "TRUE --":  # a comment is dropped by the parser: still one expression, still only ok rows
        assert set(select_volumes(query_workdir, where)["status"]) == {"ok"}
        return
    with pytest.raises(TrainingError) as info:
        select_volumes(query_workdir, where)
    assert "--where" in str(info.value) and "\n" not in str(info.value)
    assert not Path("/tmp/stolen_by_where.csv").exists()


def test_finetune_where_still_filters(query_workdir: Path) -> None:
    from training.finetune.data import select_volumes

    assert list(select_volumes(query_workdir, "subset = 'x'")["volume_id"]) == ["a"]
    assert list(select_volumes(query_workdir, "(subset = 'y') OR (subset = 'x')")["volume_id"]) == ["a", "b"]
    assert len(select_volumes(query_workdir, None)) == 2
