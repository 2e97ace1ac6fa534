"""`curate report` on a tiny sliced phantom workdir: pages, links, escaping, highlights, browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from conftest import phantom_ras, ras_affine, save_nifti, write_msd_task

from curation.report.html import build_report, page_name
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.manifest import SLICES_SCHEMA, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
EVIL = "<script>alert(1)</script> & stuff"
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base", "embed", "track"}


class _Page(HTMLParser):
    """Collects <img src>, <a href> and figure classes, and checks that tags nest."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.figures: dict[str, str] = {}
        self.figure_img: dict[str, str] = {}
        self._figure: str | None = None
        self.text: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
            if self._figure is not None:
                self.figure_img[self._figure] = a["src"]
            assert a.get("alt"), "every image needs alt text"
        if tag == "a":
            self.links.append(a["href"])
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "figure" and "data-slice-id" in a:  # slice figures (charts are figures too)
            self.figures[a["data-slice-id"]] = a.get("class") or ""
            self._figure = a["data-slice-id"]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Page:
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>\n<html lang=\"en\">")
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    p = _Page()
    p.feed(html)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    for src in p.imgs:  # relative, and resolving to a real PNG next to the page
        assert not src.startswith(("/", "file:")), src
        assert (path.parent / unquote(src)).resolve().is_file(), src
    for href in p.links:
        if href.startswith("#"):  # in-page navigation: the target exists
            assert href[1:] in p.ids, href
            continue
        assert (path.parent / unquote(href)).resolve().is_file(), href
    return p


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    """Two ok phantom volumes and one error volume (non-integer label), sliced at grid 32."""
    base = tmp_path_factory.mktemp("report")
    cases = {f"a_{k}": (np.roll(d, k, 0), ras_affine(), np.roll(lb, k, 0))
             for k, (d, lb) in enumerate(phantom_ras(seed=k) for k in range(3))}
    task = write_msd_task(base / "d", "Task05_Report", cases)
    save_nifti(task / "labelsTr" / "a_2.nii.gz", np.full(cases["a_2"][0].shape, 1.5, np.float32), ras_affine())
    cfg = SliceConfig(workdir=base / "w", pre=PreprocessConfig(grid_size=32))
    summary = run_slice("msd", task, cfg, log=lambda *a, **k: None)
    assert summary.processed == 2 and summary.errors == 1
    return base / "w"


def _copy(sliced: Path, dst: Path) -> Path:
    shutil.copytree(sliced, dst)
    return dst


def _rank(workdir: Path) -> pd.DataFrame:
    """Fill vote_score/vote_rank/selection_order as `curate rank` would (by foreground)."""
    path = workdir / "manifests" / "slices.parquet"
    s = read_manifest(path)
    s["vote_score"] = s["foreground_fraction"].astype(float)
    s["vote_rank"] = (s.groupby(["volume_id", "plane"])["vote_score"]
                      .rank(method="first", ascending=False).astype(int) - 1)
    order = s.sort_values(["vote_rank", "volume_id", "plane_index"], kind="stable").index
    s.loc[order, "selection_order"] = np.arange(len(s))
    s["selection_order"] = s["selection_order"].astype("int64")
    write_manifest(s, path, SLICES_SCHEMA)
    return s


@pytest.fixture(scope="module")
def full(sliced, tmp_path_factory) -> tuple[Path, pd.DataFrame, dict[str, str]]:
    """Ranked, captioned workdir with an evaluation table; the report is built once."""
    w = _copy(sliced, tmp_path_factory.mktemp("full") / "w")
    s = _rank(w)
    vid = sorted(s["volume_id"].unique())[0]
    mine = s[(s["volume_id"] == vid) & (s["plane"] == "axial")]
    top = mine[mine["vote_rank"] == 0]["slice_id"].iloc[0]
    low = mine.sort_values("vote_rank")["slice_id"].iloc[-1]  # worst-ranked: shown only via its caption
    refused = mine[mine["vote_rank"] == 1]["slice_id"].iloc[0]
    caps = {top: EVIL, low: "A plain caption.", refused: "I can't help with that."}
    rel = pd.DataFrame({"slice_id": list(caps), "caption": list(caps.values()),
                        "caption_model": "offline-v1", "refused": [False, False, True],
                        "split": ["train", "val", "test"]})
    write_manifest(rel, w / "manifests" / "v1.parquet")
    (w / "reports").mkdir()
    (w / "reports" / "rank_eval.json").write_text(json.dumps({"table": "k  voter  random\n1  0.9 < 1.0"}))
    build_report(w, size=64)
    return w, s, caps


def test_index_summarises_and_links_every_ok_volume(full):
    w, s, _ = full
    index = w / "reports" / "index.html"
    p = parse(index)
    html = index.read_text()
    vols = read_manifest(w / "manifests" / "volumes.parquet")
    ok = vols[vols["status"] == "ok"]["volume_id"]
    assert sorted({h for h in p.links if not h.startswith("#")}) == sorted(f"volumes/{page_name(v)}" for v in ok)
    err = vols[vols["status"] == "error"]["error"].iloc[0]
    assert "a_2.nii.gz" in err and err.replace("'", "&#x27;").replace('"', "&quot;") in html
    assert "1  0.9 &lt; 1.0" in html  # the evaluation table, escaped, in <pre>
    assert "v1.parquet" in html and "captioned: 2" in html and "refused: 1" in html
    assert sorted(src.split("/")[-2] for src in p.imgs) == sorted(ok)  # one thumbnail per volume, its own


def test_volume_page_strips_highlights_and_escaped_captions(full):
    w, s, caps = full
    vid = sorted(s["volume_id"].unique())[0]
    page = w / "reports" / "volumes" / page_name(vid)
    p = parse(page)
    html = page.read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; stuff" in html
    mine = s[s["volume_id"] == vid]
    for plane, g in mine.groupby("plane"):
        shown = [k for k in p.figures if k.split(":")[1] == plane]
        g = g.sort_values("index")
        step = -(-len(g) // 16)
        sample = set(g["slice_id"].iloc[::step]) | set(g[g["vote_rank"] < 5]["slice_id"])
        sample |= set(caps) & set(g["slice_id"])
        assert step > 1 and set(shown) == sample and len(shown) < len(g)  # every k-th plus chosen, not all
        assert shown == sorted(shown, key=lambda k: int(k.split(":")[2]))  # in slice order
        for sid in g[g["vote_rank"] < 5]["slice_id"]:  # every top-5 slice is shown and marked
            assert "chosen" in p.figures[sid].split()
        for sid in g[g["vote_rank"] >= 5]["slice_id"]:
            assert "chosen" not in p.figures.get(sid, "")
    for sid in caps:
        assert "captioned" in p.figures[sid].split()
    for sid, src in p.figure_img.items():  # each figure shows its own slice's PNG
        v, plane, index = sid.split(":")
        assert src == f"../../cache/png/64/{v}/{plane}_{int(index):03d}.png"
    assert len(p.figure_img) == len(p.figures) == len(p.imgs)
    top = mine[mine["slice_id"] == next(iter(caps))].iloc[0]
    assert f"rank 0 · score {top['vote_score']:.3f} · order {top['selection_order']}" in html
    assert "(refused)" in html and "A plain caption." in html
    assert "blob" in html  # label classes from dataset.json
    assert all(src.startswith("../../cache/png/64/") for src in p.imgs)


def test_report_without_rank_or_captions_and_deterministic(sliced, tmp_path):
    w = _copy(sliced, tmp_path / "w")
    index = build_report(w, size=48)
    first = {f: f.read_bytes() for f in sorted((w / "reports").rglob("*.html"))}
    assert len(first) == 3  # index + two ok volumes
    for f in first:
        p = parse(f)
        assert not any("chosen" in c or "captioned" in c for c in p.figures.values())
    assert "release: none" in index.read_text()
    build_report(w, size=48)
    assert {f: f.read_bytes() for f in sorted((w / "reports").rglob("*.html"))} == first
    build_report(w, size=48, max_volumes=1)  # stale volume pages go away
    assert len(list((w / "reports" / "volumes").glob("*.html"))) == 1
    assert "1 of 2 ok volumes" in index.read_text()


def test_page_names_are_sanitised():
    assert page_name("task01-abc") == "task01-abc.html"
    odd = page_name("../x y/<z>")
    assert "/" not in odd and not odd.startswith(".") and odd != page_name("../x_y/_z_")


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium not installed (apt-get install chromium) - browser check skipped")
def test_pages_load_all_images_in_headless_chromium(full, tmp_path):
    w, _, _ = full
    shot = tmp_path / "shot.png"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report.py"), str(w), "--pages", "2",
                          "--screenshot", str(shot)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ok  ") == 3 and shot.stat().st_size > 1000
