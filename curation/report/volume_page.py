"""One report page per volume: its facts, quality flags, and a strip of slices per plane with
the top picks, captions and the label outlines drawn over each thumbnail."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from curation.report.common import esc, flag_badges, flags_of, fmt, missing, page, src
from curation.report.overlay import contour_svg
from curation.store.manifest import PLANES

STRIP_PER_PLANE = 16  # ~this many evenly spaced slices per plane, plus every chosen slice
TOP_K = 5  # the best vote_rank values per plane that count as chosen


def shown_rows(group: pd.DataFrame) -> pd.DataFrame:
    """Every k-th slice of one plane (~STRIP_PER_PLANE) plus every chosen slice, by index."""
    # keep the caller's (unique) row labels: render_slices writes back by label
    group = group.sort_values("index", kind="stable")
    step = max(1, math.ceil(len(group) / STRIP_PER_PLANE))
    keep = (np.arange(len(group)) % step == 0) | group["chosen"].to_numpy() | group["has_caption"].to_numpy()
    return group[keep]


def figure(row: dict[str, Any], up: str, overlay: str = "") -> str:
    classes = ["chosen"] * bool(row["chosen"]) + ["captioned"] * bool(row["has_caption"])
    parts = [f'<div class="pic"><img src="{src(row["image_path"], up)}" alt="{esc(row["slice_id"])}">{overlay}</div>',
             f"<figcaption>index {esc(int(row['index']))}"]
    if classes:
        parts.append(
            f'<br><span class="badge">rank {fmt(row["vote_rank"], ".0f")} · '
            f'score {fmt(row["vote_score"], ".3f")} · order {fmt(row["selection_order"], ".0f")}</span>'
        )
    if row["has_caption"]:
        refused = bool(row["refused"]) if not missing(row["refused"]) else False
        tag = ' <span class="refused">(refused)</span>' if refused else ""
        parts.append(
            f'<p class="caption{" refused" * refused}">{esc(row["caption"])}</p>'
            f"<small>{esc(row['caption_model'])} · {esc(row['split'])}{tag}</small>"
        )
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return f'<figure{cls} data-slice-id="{esc(row["slice_id"])}">' + "".join(parts) + "</figcaption></figure>"


def label_names_text(value: Any) -> str:
    if missing(value) or not value:
        return "–"
    try:
        names = json.loads(value)
    except (TypeError, ValueError):
        return esc(value)
    items = sorted(names.items(), key=lambda kv: (len(kv[0]), kv[0]))
    return ", ".join(f"{esc(k)}: {esc(v)}" for k, v in items)


def list_text(value: Any, spec: str = "") -> str:
    if value is None or (not isinstance(value, (list, tuple)) and missing(value)):
        return "–"
    return " × ".join(esc(format(v, spec)) for v in value)


LEGEND = (
    '<div class="legend">'
    '<span><span class="box sw-chosen"></span>orange outline: one of the top-'
    f"{TOP_K} slices of its plane by vote_rank (rank 0 = best)</span>"
    '<span><span class="box sw-captioned"></span>blue border: captioned in the release</span>'
    '<span><span class="box sw-chosen sw-captioned"></span>both: a captioned top pick</span>'
    '<span><span class="badge">rank · score · order</span> on picks and captioned slices: vote_rank, '
    "vote_score, global selection order</span></div>"
)


def volume_page(vol: dict[str, Any], shown: pd.DataFrame, n_total: pd.Series, label: np.ndarray | None = None,
                classes: dict[int, tuple[str, str]] | None = None) -> str:
    vid = vol["volume_id"]
    flags = flags_of(vol.get("quality_flags"))
    info = [
        ("dataset", esc(vol.get("dataset"))), ("subset", esc(vol.get("subset"))),
        ("case", esc(vol.get("case_id"))), ("channel", esc(vol.get("channel_name"))),
        ("modality", esc(vol.get("modality"))), ("body region", esc(vol.get("body_region"))),
        ("source", esc(vol.get("source_path"))), ("source shape", list_text(vol.get("source_shape"))),
        ("source spacing (mm)", list_text(vol.get("source_spacing"), ".3g")),
        ("source axcodes", esc(vol.get("source_axcodes"))), ("grid", esc(vol.get("grid_size"))),
        ("cube (mm)", esc(fmt(vol.get("cube_mm"), ".1f"))), ("label classes", label_names_text(vol.get("label_names"))),
        ("quality flags", flag_badges(flags) if flags else "none"), ("notes", esc(vol.get("notes"))),
    ]
    body = [
        '<p><a href="../index.html">← all volumes</a></p>', f"<h1>{esc(vid)}</h1>",
        "<table>" + "".join(f"<tr><th>{k}</th><td>{v or '–'}</td></tr>" for k, v in info) + "</table>",
    ]
    if flags:
        body.append('<p class="err">This volume has quality flags: <code>curate rank</code> leaves it out of the '
                    "selection (and so out of captioning) unless <code>--include-flagged</code>.</p>")
    body.append(LEGEND)
    if classes:
        body.append('<div class="legend">Label outlines: ' + "".join(
            f'<span><span class="swatch" style="background:{color}"></span>{esc(name)}</span>'
            for _, (name, color) in sorted(classes.items())) + "</div>")
    for plane in PLANES:
        rows = shown[shown["plane"] == plane]
        present = sorted({lab for labs in rows["labels_present"] if isinstance(labs, list) for lab in labs})
        body.append(f"<h2>{plane}</h2><p>{len(rows)} of {int(n_total.get(plane, 0))} slices shown; "
                    f"labels in shown slices: {esc(', '.join(present)) or '–'}</p>")
        figs = []
        for r in rows.to_dict("records"):
            overlay = contour_svg(label, plane, int(r["index"]), classes) if label is not None and classes else ""
            figs.append(figure(r, "../../", overlay))
        body.append('<div class="strip">' + "".join(figs) + "</div>" if figs else "<p>(no slices)</p>")
    return page(f"{vid} · med3dinsight report", body)
