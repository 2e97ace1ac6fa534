"""`curate report`'s analysis: plots of the collection, selection and captions, the training runs
found in the workdir (curves, retrieval with controls, fine-tuning results), label outlines on
thumbnails, quality flags and a true legend; every inline SVG well-formed."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import phantom_ras, ras_affine, save_nifti, write_msd_task

from captions.offline import context_extras, offline_caption
from captions.release import _context
from curation.ranking.rank import RankConfig, run_rank
from curation.report.html import build_report, page_name
from curation.report.overlay import label_image, outline_path
from curation.report.svg import histogram, line_chart, nice_ticks
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.manifest import read_manifest, write_manifest

SVG = re.compile(r"<svg\b.*?</svg>", re.DOTALL)


def _svgs(html: str) -> list[ET.Element]:
    out = []
    for chunk in SVG.findall(html):
        root = ET.fromstring(chunk)  # well-formed XML, or this raises
        assert root.get("viewBox") and root.get("role") == "img" and root.get("aria-label")
        out.append(root)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Two labelled phantoms and one flagged volume, ranked, captioned offline, with a CLIP run,
    a pretraining run with retrieval controls and two fine-tuning runs."""
    base = tmp_path_factory.mktemp("plots")
    cases = {f"p{k}": (np.roll(d, k, 0), ras_affine(), np.roll(lb, k, 0))
             for k, (d, lb) in enumerate(phantom_ras(seed=k) for k in range(2))}
    task = write_msd_task(base / "d", "Task05_Plots", cases)
    w = base / "w"
    cfg = SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=32))
    run_slice("msd", task, cfg, log=lambda *a: None)
    flagged = base / "stat"
    save_nifti(flagged / "zstat1.nii.gz", phantom_ras(seed=5)[0], ras_affine())
    run_slice("nifti", flagged, cfg, log=lambda *a: None)
    run_rank(RankConfig(workdir=w))
    s = read_manifest(w / "manifests/slices.parquet")
    v = read_manifest(w / "manifests/volumes.parquet")
    df = s.merge(v[["volume_id", "modality", "body_region", "channel_name", "dataset", "subset"]], on="volume_id")
    df = df[df["selection_order"].notna()].sort_values("selection_order").head(60)
    rel = pd.DataFrame({
        "slice_id": df["slice_id"],
        "caption": [offline_caption({**_context(r), **context_extras(r)}) for r in df.to_dict("records")],
        "caption_model": "template", "refused": False, "split": ["train", "val", "test"] * 20,
    })
    write_manifest(rel, w / "manifests/v1.parquet")
    ck = w / "checkpoints"
    (ck / "clip").mkdir(parents=True)
    (ck / "clip/metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "loss": 3.0 / (i + 1), "lr": 1e-4, **({"val/i2t_R@1": 0.1 * i, "val/t2i_R@1": 0.08 * i}
                                                                      if i % 5 == 4 else {})}) + "\n"
        for i in range(20)) + "not json\n")
    (ck / "pretrain/run-a").mkdir(parents=True)
    (ck / "pretrain/run-a/metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "loss": 2.0 - 0.05 * i, **({"val/v2t_R@1": 0.3, "val/v2t_R@1_blank": 0.1,
                                                          "val/v2t_R@1_shuffled": 0.12, "val/v2t_chance@1": 0.05}
                                                         if i == 9 else {})}) + "\n" for i in range(10)))
    for name, test in (("seg-scratch", {"dice_mean": 0.41, "dice": {"blob": 0.5, "cyst": 0.32}}),
                       ("seg-pretrained", {"dice_mean": 0.55, "dice": {"blob": 0.6, "cyst": 0.5}})):
        (ck / "finetune" / name).mkdir(parents=True)
        (ck / "finetune" / name / "metrics.json").write_text(json.dumps(
            {"test": test, "step": 10, "task": "seg", "encoder": "cnn", "init": "scratch", "n_train": 3, "n_test": 1}))
        (ck / "finetune" / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    build_report(w, size=64)
    return w


def test_index_has_every_section_with_valid_svgs(workdir: Path):
    html = (workdir / "reports/index.html").read_text()
    for anchor in ("summary", "quality", "collection", "selection", "captions", "evaluation", "training", "volumes"):
        assert f'id="{anchor}"' in html and f'href="#{anchor}"' in html
    svgs = _svgs(html)
    titles = [s.findtext("title") for s in svgs]
    for want in ("Slices per plane", "Body (foreground) fraction", "Mean intensity per slice", "Caption length",
                 "Distinct captions per plane", "Selection per plane", "Training loss", "Held-out recall@1",
                 "Fine-tuning: test result per run"):
        assert want in titles, (want, titles)
    for s in svgs:  # every chart draws something: bars, lines or dots
        assert s.findall(".//rect") or s.findall(".//polyline") or s.findall(".//circle"), s.findtext("title")
    assert "http://" not in html and "<script src" not in html


def test_training_runs_with_controls_and_finetune_results(workdir: Path):
    html = (workdir / "reports/index.html").read_text()
    assert "clip · (default)" in html and "pretrain · run-a" in html and "1 unreadable line(s) skipped" in html
    row = re.search(r"<tr><td>val/v2t_R@1</td>(.*?)</tr>", html).group(1)
    assert [c for c in re.findall(r"<td>(.*?)</td>", row)] == ["0.3", "0.1", "0.12", "0.05"]  # value, blank, shuffled, chance
    assert "<th>_blank control</th>" in html and "<th>_shuffled control</th>" in html
    assert "seg-pretrained" in html and "0.550" in html and "blob: 0.600" in html
    controls = next(s for s in _svgs(html) if s.findtext("title") == "Retrieval against its controls")
    bars = [r.findtext("title") for r in controls.iter("rect") if r.findtext("title")]
    assert bars == ["v2t_R@1 · value: 0.3", "v2t_R@1 · _blank: 0.1", "v2t_R@1 · _shuffled: 0.12",
                    "v2t_R@1 · chance: 0.05"]
    legend = [t.text for t in controls.iter("text")]
    assert "_blank" in legend and "_shuffled" in legend and "chance" in legend


def test_quality_flags_and_coverage_shown(workdir: Path):
    html = (workdir / "reports/index.html").read_text()
    vols = read_manifest(workdir / "manifests/volumes.parquet")
    bad = vols[[len(f or []) > 0 for f in vols["quality_flags"]]]
    assert len(bad) == 1 and '<span class="flag">statistical_map</span>' in html
    assert "1 of 3 volumes flagged" in html
    page = (workdir / "reports/volumes" / page_name(bad["volume_id"].iloc[0])).read_text()
    assert "statistical_map" in page and "--include-flagged" in page
    assert "captioned / in the selection order / indexed" in html
    assert "distinct captions of 60" in html


def test_volume_pages_have_label_outlines_and_a_true_legend(workdir: Path):
    vols = read_manifest(workdir / "manifests/volumes.parquet")
    labelled = vols[vols["label_volume_path"].notna()]
    page = (workdir / "reports/volumes" / page_name(labelled["volume_id"].iloc[0])).read_text()
    outlines = [s for s in _svgs(page) if s.get("aria-label") == "label outlines"]
    assert outlines and all(p.get("d", "").startswith("M") for s in outlines for p in s.iter("path"))
    assert "Label outlines:" in page and "blob" in page
    # the legend says what the page draws: an orange outline for picks, a blue border for captioned
    assert "orange outline" in page and "blue border" in page and "both: a captioned top pick" in page
    css = (workdir / "reports/index.html").read_text()
    assert "figure.chosen{outline:3px solid #e67e00" in css and "figure.captioned{border-color:#1565c0" in css
    both = re.findall(r'<figure class="chosen captioned"', page)
    assert both  # a captioned pick keeps its orange outline
    unlabelled = vols[vols["label_volume_path"].isna() & (vols["status"] == "ok")]
    plain = (workdir / "reports/volumes" / page_name(unlabelled["volume_id"].iloc[0])).read_text()
    assert "label outlines" not in plain and "Label outlines:" not in plain


def test_outlines_line_up_with_the_png_orientation():
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[6:8, 1:3, 4] = 1  # patient right (x high), posterior (y low), on axial slice z=4
    img = label_image(lab, "axial", 4)
    rows, cols = np.nonzero(img)
    # radiological: patient right on image left, anterior up -> posterior at the bottom
    assert cols.max() < 4 and rows.min() >= 4
    assert outline_path(img == 1).count("M") == 4  # a 2x2 square: two horizontal, two vertical runs


def test_chart_primitives_are_deterministic_and_handle_empty_data():
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    a = line_chart("x", {"a": ([0, 1, 2], [1.0, 0.5, 0.25])}, log_y=True)
    assert a == line_chart("x", {"a": ([0, 1, 2], [1.0, 0.5, 0.25])}, log_y=True)
    assert "no data" in histogram("h", {"g": []}) and "no data" in line_chart("l", {"s": ([], [])})
    ET.fromstring(SVG.search(histogram("<evil & co>", {"a": [0.1, 0.2], "b": [0.5]})).group(0))
