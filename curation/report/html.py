"""`curate report`: a static HTML gallery of volumes, slices, votes and captions.

Pages open from the file system with no server and no network: image paths are relative
(into ``cache/png/<size>/``), CSS is inline, and the only script is a small inline one that
records in ``<body data-images-loaded data-images-total>`` how many images loaded (read by
``scripts/check_report.py``). Every string from a manifest is HTML-escaped; output is sorted
so that two builds over the same manifests are byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from html import escape
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

import numpy as np
import pandas as pd

from curation.slicing.render import render_slices
from curation.store.fsutil import atomic_write_text
from curation.store.layout import Workdir
from curation.store.manifest import PLANES, read_manifest, release_manifests

STRIP_PER_PLANE = 16  # ~this many evenly spaced slices per plane, plus every chosen slice
TOP_K = 5  # the best vote_rank values per plane that count as chosen

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th{background:#eee}pre{background:#f0f0f0;padding:.6em;overflow-x:auto}
.strip{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}
figure{margin:0;width:112px;border:3px solid transparent;background:#fff;font-size:11px}
figure img{width:100%;display:block;background:#000}
figure.chosen{border-color:#e67e00}figure.captioned{border-color:#1565c0;width:240px}
.badge{display:inline-block;background:#e67e00;color:#fff;padding:0 4px;border-radius:3px;margin:2px 0}
.captioned .badge{background:#1565c0}.caption{font-size:12px;margin:2px 0;white-space:pre-wrap}
.refused{color:#b00020}.err{color:#b00020}.thumb{width:64px;height:64px;display:block}
"""

LOAD_SCRIPT = (
    '<script>window.addEventListener("load",function(){var im=document.images,n=0;'
    "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)n++;}"
    "document.body.dataset.imagesLoaded=String(n);"
    "document.body.dataset.imagesTotal=String(im.length);});</script>"
)


def _e(value: Any) -> str:
    return escape("" if _missing(value) else str(value), quote=True)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists/arrays
        return False


def _fmt(value: Any, spec: str = "") -> str:
    return "–" if _missing(value) else format(value, spec)


def page_name(volume_id: str) -> str:
    """A file-name-safe page name; a hash suffix keeps sanitised ids distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(volume_id)).lstrip(".") or "volume"
    if safe != volume_id:
        safe += "-" + hashlib.sha256(str(volume_id).encode()).hexdigest()[:8]
    return safe + ".html"


def _src(image_path: str, up: str) -> str:
    return _e(up + quote(str(image_path).replace(os.sep, "/")))


def _page(title: str, body: Iterable[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + f"\n{LOAD_SCRIPT}\n</body>\n</html>\n"
    )


def _table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p>(none)</p>"
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    rows = ["<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False)]
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _load_release(workdir: Path) -> tuple[str | None, pd.DataFrame]:
    releases = release_manifests(workdir)
    if not releases:
        return None, pd.DataFrame(columns=["slice_id", "caption", "caption_model", "refused", "split"])
    rel = read_manifest(releases[-1])
    for col in ("caption", "caption_model", "refused", "split"):
        if col not in rel.columns:
            rel[col] = None
    rel = rel.drop_duplicates("slice_id", keep="last")
    return releases[-1].name, rel[["slice_id", "caption", "caption_model", "refused", "split"]]


def _shown(group: pd.DataFrame) -> pd.DataFrame:
    """Every k-th slice of one plane (~STRIP_PER_PLANE) plus every chosen slice, by index."""
    # keep the caller's (unique) row labels: render_slices writes back by label
    group = group.sort_values("index", kind="stable")
    step = max(1, math.ceil(len(group) / STRIP_PER_PLANE))
    keep = (np.arange(len(group)) % step == 0) | group["chosen"].to_numpy() | group["has_caption"].to_numpy()
    return group[keep]


def _figure(row: dict[str, Any], up: str) -> str:
    classes = ["chosen"] * bool(row["chosen"]) + ["captioned"] * bool(row["has_caption"])
    parts = [f'<img src="{_src(row["image_path"], up)}" alt="{_e(row["slice_id"])}">',
             f"<figcaption>index {_e(int(row['index']))}"]
    if classes:
        parts.append(
            f'<br><span class="badge">rank {_fmt(row["vote_rank"], ".0f")} · '
            f'score {_fmt(row["vote_score"], ".3f")} · order {_fmt(row["selection_order"], ".0f")}</span>'
        )
    if row["has_caption"]:
        refused = bool(row["refused"]) if not _missing(row["refused"]) else False
        tag = ' <span class="refused">(refused)</span>' if refused else ""
        parts.append(
            f'<p class="caption{" refused" * refused}">{_e(row["caption"])}</p>'
            f"<small>{_e(row['caption_model'])} · {_e(row['split'])}{tag}</small>"
        )
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return f'<figure{cls} data-slice-id="{_e(row["slice_id"])}">' + "".join(parts) + "</figcaption></figure>"


def _label_names(value: Any) -> str:
    if _missing(value) or not value:
        return "–"
    try:
        names = json.loads(value)
    except (TypeError, ValueError):
        return _e(value)
    items = sorted(names.items(), key=lambda kv: (len(kv[0]), kv[0]))
    return ", ".join(f"{_e(k)}: {_e(v)}" for k, v in items)


def _list(value: Any, spec: str = "") -> str:
    if value is None or (not isinstance(value, (list, tuple)) and _missing(value)):
        return "–"
    return " × ".join(_e(format(v, spec)) for v in value)


def _volume_page(vol: dict[str, Any], shown: pd.DataFrame, n_total: pd.Series) -> str:
    vid = vol["volume_id"]
    info = [
        ("dataset", _e(vol.get("dataset"))), ("subset", _e(vol.get("subset"))),
        ("case", _e(vol.get("case_id"))), ("channel", _e(vol.get("channel_name"))),
        ("modality", _e(vol.get("modality"))), ("body region", _e(vol.get("body_region"))),
        ("source", _e(vol.get("source_path"))), ("source shape", _list(vol.get("source_shape"))),
        ("source spacing (mm)", _list(vol.get("source_spacing"), ".3g")),
        ("source axcodes", _e(vol.get("source_axcodes"))), ("grid", _e(vol.get("grid_size"))),
        ("cube (mm)", _e(_fmt(vol.get("cube_mm"), ".1f"))), ("label classes", _label_names(vol.get("label_names"))),
    ]
    body = [
        '<p><a href="../index.html">← all volumes</a></p>', f"<h1>{_e(vid)}</h1>",
        "<table>" + "".join(f"<tr><th>{k}</th><td>{v or '–'}</td></tr>" for k, v in info) + "</table>",
        '<p>Orange border: top-5 slices by vote_rank in the plane (rank 0 = best); blue: captioned. '
        "Badge: rank · score · global selection order.</p>",
    ]
    for plane in PLANES:
        rows = shown[shown["plane"] == plane]
        present = sorted({lab for labs in rows["labels_present"] if isinstance(labs, list) for lab in labs})
        body.append(f"<h2>{plane}</h2><p>{len(rows)} of {int(n_total.get(plane, 0))} slices shown; "
                    f"labels in shown slices: {_e(', '.join(present)) or '–'}</p>")
        figs = [_figure(r, "../../") for r in rows.to_dict("records")]
        body.append('<div class="strip">' + "".join(figs) + "</div>" if figs else "<p>(no slices)</p>")
    return _page(f"{vid} · med3dinsight report", body)


def _eval_section(workdir: Path) -> str:
    path = Workdir(workdir).rank_eval
    if not path.exists():
        return "<p>No reports/rank_eval.json (run <code>curate rank --evaluate</code>).</p>"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f'<p class="err">Could not read rank_eval.json: {_e(exc)}</p>'
    if isinstance(data, dict) and isinstance(data.get("table"), str):
        return f"<pre>{_e(data['table'])}</pre>"
    return f"<pre>{_e(json.dumps(data, indent=2, sort_keys=True))}</pre>"


def build_report(workdir: Path, size: int = 256, max_volumes: int | None = None) -> Path:
    """Write ``reports/index.html`` and one page per ok volume; returns the index path.

    Args:
        workdir: the workdir holding ``manifests/``.
        size: thumbnail PNG size in px (rendered and cached under ``cache/png/<size>/``).
        max_volumes: at most this many volume pages (the first by volume_id); None for all.
    """
    wd = Workdir(workdir)
    workdir = wd.root
    volumes = read_manifest(wd.volumes_manifest).sort_values("volume_id", kind="stable")
    slices = read_manifest(wd.slices_manifest)
    for col in ("vote_score", "vote_rank", "selection_order"):
        if col not in slices.columns:
            slices[col] = None
    release_name, release = _load_release(workdir)
    slices = slices.merge(release, on="slice_id", how="left")
    slices["has_caption"] = slices["caption"].map(lambda c: not _missing(c) and str(c) != "")
    slices["is_refused"] = slices["refused"].map(lambda r: not _missing(r) and bool(r))
    slices["good_caption"] = slices["has_caption"] & ~slices["is_refused"]
    rank = pd.to_numeric(slices["vote_rank"], errors="coerce")
    slices["chosen"] = rank.notna() & (rank < TOP_K)
    slices = slices.sort_values(["volume_id", "plane_index", "index"], kind="stable").reset_index(drop=True)

    ok = volumes[volumes["status"] == "ok"]
    paged = ok if max_volumes is None else ok.head(max(0, max_volumes))
    shown = pd.concat(
        [_shown(g) for _, g in slices[slices["volume_id"].isin(paged["volume_id"])].groupby(["volume_id", "plane"])]
        or [slices.head(0)]
    )
    shown = render_slices(workdir, shown, paged, size) if len(shown) else shown.assign(image_path=None)
    shown = shown.sort_values(["volume_id", "plane_index", "index"], kind="stable")

    out = wd.reports
    vdir = out / "volumes"
    written = set()
    counts = slices.groupby(["volume_id", "plane"]).size()
    vol_rows = []
    for vol in paged.to_dict("records"):
        vid = vol["volume_id"]
        mine = shown[shown["volume_id"] == vid]
        n_total = counts[vid] if vid in counts.index.get_level_values(0) else pd.Series(dtype=int)
        name = page_name(vid)
        _write(vdir / name, _volume_page(vol, mine, n_total))
        written.add(name)
        mid = mine[mine["plane"] == "axial"]
        thumb = ""
        if len(mid):
            pick = mid[mid["chosen"]] if mid["chosen"].any() else mid.iloc[[len(mid) // 2]]
            pick = pick.sort_values(["vote_rank", "index"], kind="stable").iloc[0]
            thumb = f'<img class="thumb" src="{_src(pick["image_path"], "../")}" alt="{_e(pick["slice_id"])}">'
        allv = slices[slices["volume_id"] == vid]
        vol_rows.append(
            f'<tr><td>{thumb}</td><td><a href="volumes/{_e(quote(name))}">{_e(vid)}</a></td>'
            f"<td>{_e(vol.get('dataset'))}</td><td>{_e(vol.get('modality'))}</td>"
            f"<td>{_e(vol.get('body_region')) or '–'}</td>"
            f"<td>{len(allv)}</td><td>{int(allv['chosen'].sum())}</td><td>{int(allv['good_caption'].sum())}</td></tr>"
        )
    for stale in vdir.glob("*.html") if vdir.exists() else []:
        if stale.name not in written:
            stale.unlink()

    vinfo = volumes[["volume_id", "dataset", "modality"]]
    sl = slices.merge(vinfo, on="volume_id", how="left")
    errors = volumes[volumes["status"] != "ok"]
    n_order = int(pd.to_numeric(slices["selection_order"], errors="coerce").notna().sum())
    body = [
        "<h1>med3dinsight curation report</h1>",
        "<h2>Summary</h2><ul>"
        f"<li>volumes: {len(volumes)} ({len(ok)} ok, {len(errors)} with errors)</li>"
        f"<li>slices: {len(slices)}; ranked: {int(rank.notna().sum())}; in the global selection order: {n_order}; "
        f"top-{TOP_K} per plane (chosen): {int(slices['chosen'].sum())}</li>"
        f"<li>release: {_e(release_name or 'none')}; captioned: {int(slices['good_caption'].sum())}; "
        f"refused: {int(slices['is_refused'].sum())}</li></ul>",
        "<h2>Volumes per dataset and modality</h2>",
        _table(volumes.fillna({"modality": "?"}).groupby(["dataset", "modality", "status"]).size()
               .reset_index(name="volumes")),
        "<h2>Slices per dataset, modality and plane</h2>",
        _table(sl.fillna({"modality": "?"}).groupby(["dataset", "modality", "plane"]).size()
               .reset_index(name="slices")),
    ]
    if len(release):
        split = (slices[slices["has_caption"]].groupby("split")
                 .agg(captions=("good_caption", "sum"), refused=("is_refused", "sum")).reset_index())
        body += ["<h2>Captions per split</h2>", _table(split)]
    body += ["<h2>Volumes with errors</h2>", _table(errors[["volume_id", "source_path", "error"]]),
             "<h2>Selection evaluation</h2>", _eval_section(workdir),
             f"<h2>Volumes</h2><p>{len(paged)} of {len(ok)} ok volumes have pages.</p>",
             "<table><tr><th></th><th>volume</th><th>dataset</th><th>modality</th><th>body region</th>"
             f"<th>slices</th><th>top-{TOP_K} chosen</th><th>captioned</th></tr>" + "".join(vol_rows) + "</table>"]
    index = out / "index.html"
    _write(index, _page("med3dinsight report", body))
    return index
