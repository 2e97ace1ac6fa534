"""`curate report`: a static HTML report of a workdir, the first place a researcher looks.

``reports/index.html``: a summary; the volumes' quality flags; plots of the collection (slices
per plane, body fraction and intensity distributions), of the selection (coverage per plane and
per volume x plane) and of the captions (lengths, distinct texts); the selection evaluation;
every training run under ``checkpoints/`` (curves, held-out metrics with their controls,
fine-tuning results); errors; and the volume list. ``reports/volumes/<id>.html``: one page per
ok volume with slice strips, picks, captions and label outlines.

Pages open from the file system with no server and no network (``curation.report.common``).
Every string from a manifest is HTML-escaped; output is sorted so that two builds over the same
workdir are byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from curation.report.collection import caption_plots, coverage, quality_section, slice_plots
from curation.report.common import esc, flag_badges, missing, page, page_name, src, table, write
from curation.report.overlay import label_classes, load_label
from curation.report.runs import runs_section
from curation.report.volume_page import TOP_K, shown_rows, volume_page
from curation.slicing.render import render_slices
from curation.store.layout import Workdir
from curation.store.manifest import read_manifest, release_manifests

__all__ = ["build_report", "page_name"]

NAV = ('<nav><a href="#summary">summary</a><a href="#quality">quality flags</a><a href="#collection">collection</a>'
       '<a href="#selection">selection</a><a href="#captions">captions</a><a href="#evaluation">evaluation</a>'
       '<a href="#training">training runs</a><a href="#errors">errors</a><a href="#volumes">volumes</a></nav>')


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


def _eval_section(workdir: Path) -> str:
    path = Workdir(workdir).rank_eval
    if not path.exists():
        return "<p>No reports/rank_eval.json (run <code>curate rank --evaluate</code>).</p>"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f'<p class="err">Could not read rank_eval.json: {esc(exc)}</p>'
    if isinstance(data, dict) and isinstance(data.get("table"), str):
        return f"<pre>{esc(data['table'])}</pre>"
    return f"<pre>{esc(json.dumps(data, indent=2, sort_keys=True))}</pre>"


def _slices_with_captions(wd: Workdir) -> tuple[pd.DataFrame, str | None, pd.DataFrame]:
    slices = read_manifest(wd.slices_manifest)
    for col in ("vote_score", "vote_rank", "selection_order"):
        if col not in slices.columns:
            slices[col] = None
    release_name, release = _load_release(wd.root)
    slices = slices.merge(release, on="slice_id", how="left")
    slices["has_caption"] = slices["caption"].map(lambda c: not missing(c) and str(c) != "")
    slices["is_refused"] = slices["refused"].map(lambda r: not missing(r) and bool(r))
    slices["good_caption"] = slices["has_caption"] & ~slices["is_refused"]
    rank = pd.to_numeric(slices["vote_rank"], errors="coerce")
    slices["chosen"] = rank.notna() & (rank < TOP_K)
    slices = slices.sort_values(["volume_id", "plane_index", "index"], kind="stable").reset_index(drop=True)
    return slices, release_name, release


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
    slices, release_name, release = _slices_with_captions(wd)
    rank = pd.to_numeric(slices["vote_rank"], errors="coerce")

    ok = volumes[volumes["status"] == "ok"]
    paged = ok if max_volumes is None else ok.head(max(0, max_volumes))
    shown = pd.concat(
        [shown_rows(g) for _, g in slices[slices["volume_id"].isin(paged["volume_id"])].groupby(["volume_id", "plane"])]
        or [slices.head(0)]
    )
    shown = render_slices(workdir, shown, paged, size) if len(shown) else shown.assign(image_path=None)
    shown = shown.sort_values(["volume_id", "plane_index", "index"], kind="stable")

    out = wd.reports
    vdir = out / "volumes"
    written: set[str] = set()
    page_of: dict[str, str] = {}
    counts = slices.groupby(["volume_id", "plane"]).size()
    vol_rows = []
    for vol in paged.to_dict("records"):
        vid = vol["volume_id"]
        mine = shown[shown["volume_id"] == vid]
        n_total = counts[vid] if vid in counts.index.get_level_values(0) else pd.Series(dtype=int)
        name = page_name(vid)
        label = load_label(workdir, vol)
        try:
            names = json.loads(vol.get("label_names") or "{}")
        except (TypeError, ValueError):
            names = {}
        classes = label_classes(label, names) if label is not None else None
        write(vdir / name, volume_page(vol, mine, n_total, label, classes))
        written.add(name)
        page_of[vid] = name
        mid = mine[mine["plane"] == "axial"]
        thumb = ""
        if len(mid):
            pick = mid[mid["chosen"]] if mid["chosen"].any() else mid.iloc[[len(mid) // 2]]
            pick = pick.sort_values(["vote_rank", "index"], kind="stable").iloc[0]
            thumb = f'<img class="thumb" src="{src(pick["image_path"], "../")}" alt="{esc(pick["slice_id"])}">'
        allv = slices[slices["volume_id"] == vid]
        vol_rows.append(
            f'<tr><td>{thumb}</td><td><a href="volumes/{esc(name)}">{esc(vid)}</a></td>'
            f"<td>{esc(vol.get('dataset'))}</td><td>{esc(vol.get('modality'))}</td>"
            f"<td>{esc(vol.get('body_region')) or '–'}</td>"
            f"<td>{len(allv)}</td><td>{int(allv['chosen'].sum())}</td><td>{int(allv['good_caption'].sum())}</td>"
            f"<td>{flag_badges(vol.get('quality_flags'))}</td></tr>"
        )
    for stale in vdir.glob("*.html") if vdir.exists() else []:
        if stale.name not in written:
            stale.unlink()

    errors = volumes[volumes["status"] != "ok"]
    n_order = int(pd.to_numeric(slices["selection_order"], errors="coerce").notna().sum())
    body = [
        "<h1>med3dinsight curation report</h1>", NAV,
        '<h2 id="summary">Summary</h2><ul>'
        f"<li>volumes: {len(volumes)} ({len(ok)} ok, {len(errors)} with errors)</li>"
        f"<li>slices: {len(slices)}; ranked: {int(rank.notna().sum())}; in the global selection order: {n_order}; "
        f"top-{TOP_K} per plane (chosen): {int(slices['chosen'].sum())}</li>"
        f"<li>release: {esc(release_name or 'none')}; captioned: {int(slices['good_caption'].sum())}; "
        f"refused: {int(slices['is_refused'].sum())}</li></ul>",
        "<h3>Volumes per dataset and modality</h3>",
        table(volumes.fillna({"modality": "?"}).groupby(["dataset", "modality", "status"]).size()
              .reset_index(name="volumes")),
        '<h2 id="quality">Quality flags</h2>', quality_section(volumes),
        '<h2 id="collection">Collection</h2>', slice_plots(slices, volumes),
        '<h2 id="selection">Selection coverage</h2>', coverage(slices, volumes, page_of),
        '<h2 id="captions">Captions</h2>', caption_plots(slices),
    ]
    if len(release):
        split = (slices[slices["has_caption"]].groupby("split")
                 .agg(captions=("good_caption", "sum"), refused=("is_refused", "sum")).reset_index())
        body += ["<h3>Captions per split</h3>", table(split)]
    body += ['<h2 id="evaluation">Selection evaluation</h2>', _eval_section(workdir),
             '<h2 id="training">Training runs</h2>', runs_section(wd.checkpoints),
             '<h2 id="errors">Volumes with errors</h2>', table(errors[["volume_id", "source_path", "error"]]),
             f'<h2 id="volumes">Volumes</h2><p>{len(paged)} of {len(ok)} ok volumes have pages.</p>',
             "<table><tr><th></th><th>volume</th><th>dataset</th><th>modality</th><th>body region</th>"
             f"<th>slices</th><th>top-{TOP_K} chosen</th><th>captioned</th><th>quality flags</th></tr>"
             + "".join(vol_rows) + "</table>"]
    index = out / "index.html"
    write(index, page("med3dinsight report", body))
    return index
