"""The index page's analysis of the collection: plots of the slices, their selection and
captions, and the volumes' quality flags (inline SVG from ``curation.report.svg``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pandas as pd

from curation.report.common import esc, flag_badges, flags_of, table
from curation.report.svg import bar_chart, histogram
from curation.store.manifest import PLANES

MAX_COVERAGE_ROWS = 60  # volumes listed one by one in the coverage table; more get a histogram


def _groups(df: pd.DataFrame, by: str, value: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for key, g in df.groupby(df[by].fillna("?").astype(str), sort=True):
        out[key] = pd.to_numeric(g[value], errors="coerce").dropna().tolist()
    return out


def slice_plots(slices: pd.DataFrame, volumes: pd.DataFrame) -> str:
    """Slices per plane (per modality), body fraction per plane, intensity per modality."""
    if slices.empty:
        return "<p>(no slices)</p>"
    sl = slices.merge(volumes[["volume_id", "modality"]], on="volume_id", how="left")
    sl["modality"] = sl["modality"].fillna("?").astype(str)
    mods = sorted(sl["modality"].unique())
    counts = sl.groupby(["plane", "modality"]).size()
    values = [[int(counts.get((p, m), 0)) for m in mods] for p in PLANES]
    charts = [
        bar_chart("Slices per plane", [(p, sum(v)) for p, v in zip(PLANES, values)], ylabel="slices",
                  series=mods if len(mods) > 1 else None, values=values if len(mods) > 1 else None,
                  caption="Indexed slices (body fraction over --min-foreground)"
                          + (", one bar per modality" if len(mods) > 1 else "")),
        histogram("Body (foreground) fraction", _groups(sl, "plane", "foreground_fraction"), lo=0.0, hi=1.0,
                  xlabel="fraction of the slice inside the body mask", caption="per plane"),
        histogram("Mean intensity per slice", _groups(sl, "modality", "mean_intensity"), lo=0.0, hi=1.0,
                  xlabel="mean of the preprocessed slice (0..1)", caption="per modality (after windowing)"),
        histogram("Intensity spread per slice", _groups(sl, "modality", "std_intensity"), lo=0.0,
                  xlabel="standard deviation within the slice", caption="per modality"),
    ]
    return '<div class="charts">' + "".join(charts) + "</div>"


def caption_stats(texts: list[str]) -> dict[str, Any]:
    """Distinct captions (whitespace and case folded), total, the top share and the five most
    common (as first written)."""
    first: dict[str, str] = {}
    norm = []
    for t in texts:
        if isinstance(t, str) and t.strip():
            key = " ".join(t.split()).lower()
            first.setdefault(key, t)
            norm.append(key)
    counts = Counter(norm)
    total = len(norm)
    top = [(first[k], n) for k, n in counts.most_common(5)]
    return {"distinct": len(counts), "total": total, "top_share": (top[0][1] / total) if total else 0.0, "top": top}


def caption_plots(slices: pd.DataFrame) -> str:
    """Caption lengths and how many distinct captions there are (few distinct texts teach a
    contrastive model little and make retrieval recall look better than it is)."""
    caps = slices[slices["good_caption"]]
    if caps.empty:
        return "<p>No captions yet (run <code>curate caption</code>).</p>"
    st = caption_stats(caps["caption"].tolist())
    words = caps["caption"].astype(str).str.split().str.len()
    by_model = {str(k): g.tolist() for k, g in words.groupby(caps["caption_model"].fillna("?").astype(str))}
    distinct_per_plane = [(p, caps[caps["plane"] == p]["caption"].nunique()) for p in PLANES]
    warn = ""
    if st["distinct"] < 20 or st["top_share"] > 0.2:
        warn = ('<p class="err">Few distinct captions: a contrastive model learns little from them, and '
                "retrieval recall over few distinct texts looks better than it is.</p>")
    charts = [
        histogram("Caption length", by_model, bins=20, lo=0, xlabel="words", caption="per caption model"),
        bar_chart("Distinct captions per plane", distinct_per_plane, ylabel="distinct texts",
                  caption=f"{st['distinct']} distinct of {st['total']} captions in all"),
    ]
    top = pd.DataFrame([{"count": n, "share": f"{n / st['total']:.1%}", "caption": t} for t, n in st["top"]])
    return (f"<p>{st['distinct']:,} distinct captions of {st['total']:,}; the most common covers "
            f"{st['top_share']:.1%}.</p>{warn}" + '<div class="charts">' + "".join(charts) + "</div>"
            + "<h3>Most common captions</h3>" + table(top))


def coverage(slices: pd.DataFrame, volumes: pd.DataFrame, page_of: dict[str, str]) -> str:
    """How the selection covers the collection: per plane and per volume x plane, slices in
    the selection order and captioned, of all indexed."""
    if slices.empty:
        return "<p>(no slices)</p>"
    order = pd.to_numeric(slices["selection_order"], errors="coerce").notna()
    per_plane = [[int((slices["plane"] == p).sum()), int((order & (slices["plane"] == p)).sum()),
                  int((slices["good_caption"] & (slices["plane"] == p)).sum())] for p in PLANES]
    charts = [bar_chart("Selection per plane", [(p, v[0]) for p, v in zip(PLANES, per_plane)], ylabel="slices",
                        series=["indexed", "in selection order", "captioned"], values=per_plane,
                        caption="Flagged volumes' slices stay out of the selection order")]
    per_vol = slices.assign(ordered=order).groupby("volume_id").agg(
        n=("slice_id", "size"), cap=("good_caption", "sum"), ordered=("ordered", "sum"))
    frac = (per_vol["cap"] / per_vol["n"]).tolist()
    if len(per_vol) > MAX_COVERAGE_ROWS:
        charts.append(histogram("Captioned fraction per volume", {"volumes": frac}, lo=0.0, hi=1.0,
                                xlabel="captioned slices / indexed slices"))
        return '<div class="charts">' + "".join(charts) + "</div>"
    flags = dict(zip(volumes["volume_id"], volumes.get("quality_flags", pd.Series([None] * len(volumes)))))
    cells = slices.assign(ordered=order).groupby(["volume_id", "plane"]).agg(
        n=("slice_id", "size"), cap=("good_caption", "sum"), ordered=("ordered", "sum"))
    head = "<tr><th>volume</th>" + "".join(f"<th>{p}</th>" for p in PLANES) + "<th>flags</th></tr>"
    rows = []
    for vid in per_vol.index:
        tds = []
        for p in PLANES:
            if (vid, p) not in cells.index:
                tds.append('<td class="cov">–</td>')
                continue
            c = cells.loc[(vid, p)]
            f = float(c["cap"]) / max(1, int(c["n"]))
            shade = f"background:rgba(21,101,192,{0.1 + 0.8 * f:.2f})" if c["cap"] else ""
            tds.append(f'<td class="cov" style="{shade}" title="captioned / in selection order / indexed">'
                       f'{int(c["cap"])} / {int(c["ordered"])} / {int(c["n"])}</td>')
        name = page_of.get(vid)
        label = f'<a href="volumes/{esc(name)}">{esc(vid)}</a>' if name else esc(vid)
        rows.append(f"<tr><td>{label}</td>{''.join(tds)}<td>{flag_badges(flags.get(vid))}</td></tr>")
    return ('<div class="charts">' + "".join(charts) + "</div>"
            + '<p class="note">Per volume and plane: captioned / in the selection order / indexed slices '
              "(shade: captioned fraction).</p><table>" + head + "".join(rows) + "</table>")


def quality_section(volumes: pd.DataFrame) -> str:
    """Counts per flag and the flagged volumes with their notes."""
    if "quality_flags" not in volumes.columns:
        return "<p>This volumes manifest predates quality flags (rerun <code>curate slice</code> to compute them).</p>"
    flagged = volumes[[bool(flags_of(v)) for v in volumes["quality_flags"]]]
    if flagged.empty:
        return "<p>No volume has a quality flag.</p>"
    counts = Counter(f for v in flagged["quality_flags"] for f in flags_of(v))
    rows = "".join(
        f"<tr><td>{esc(r['volume_id'])}</td><td>{esc(r.get('modality'))}</td><td>{flag_badges(r['quality_flags'])}</td>"
        f"<td>{esc(r.get('notes'))}</td></tr>" for r in flagged.to_dict("records"))
    return (f"<p>{len(flagged)} of {len(volumes)} volumes flagged: "
            + ", ".join(f"{esc(k)} {n}" for k, n in sorted(counts.items()))
            + ". <code>curate rank</code> leaves them out of the selection unless <code>--include-flagged</code>.</p>"
            + "<table><tr><th>volume</th><th>modality</th><th>flags</th><th>notes</th></tr>" + rows + "</table>")
