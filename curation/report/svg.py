"""Small static charts as inline SVG (no script, no network, no plotting library).

Every chart is one ``<figure class="chart">`` holding an ``<svg role="img">`` with a
``<title>``, axes with a few round ticks, and a legend when it has several series. Text is
HTML-escaped; numbers are rounded so that two builds over the same data are byte-identical.
"""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

PALETTE = ("#1565c0", "#e67e00", "#2e7d32", "#c62828", "#6a1b9a", "#00838f", "#795548", "#546e7a")
W, H = 360, 200
PAD_L, PAD_R, PAD_T, PAD_B = 48, 12, 40, 40


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _n(x: float) -> str:
    """A coordinate, rounded (deterministic, short)."""
    return f"{x:.1f}".rstrip("0").rstrip(".") if math.isfinite(x) else "0"


def nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(round(t, 12))
        t += step
    return ticks


def tick_label(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 10000:
        return f"{v / 1000:g}k"
    if a >= 1:
        return f"{v:g}"
    return f"{v:.3g}"


class _Frame:
    """Maps data to pixels inside the plot area and draws axes."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float, width: int = W, height: int = H, log_y: bool = False):
        self.log_y = log_y
        self.w, self.h = width, height
        if log_y:
            y0, y1 = math.log10(max(y0, 1e-12)), math.log10(max(y1, 1e-12))
        self.xt = nice_ticks(x0, x1)
        self.yt = nice_ticks(y0, y1) if not log_y else [float(v) for v in range(math.floor(y0), math.ceil(y1) + 1)]
        self.x0, self.x1 = min(x0, self.xt[0]), max(x1, self.xt[-1])
        self.y0, self.y1 = min(y0, self.yt[0]), max(y1, self.yt[-1])
        if self.x1 == self.x0:
            self.x1 = self.x0 + 1
        if self.y1 == self.y0:
            self.y1 = self.y0 + 1

    def px(self, x: float) -> float:
        return PAD_L + (x - self.x0) / (self.x1 - self.x0) * (self.w - PAD_L - PAD_R)

    def py(self, y: float) -> float:
        if self.log_y:
            y = math.log10(max(y, 1e-12))
        return self.h - PAD_B - (y - self.y0) / (self.y1 - self.y0) * (self.h - PAD_T - PAD_B)

    def axes(self, xlabel: str, ylabel: str, x_ticks: bool = True) -> list[str]:
        out = [f'<line x1="{PAD_L}" y1="{self.h - PAD_B}" x2="{self.w - PAD_R}" y2="{self.h - PAD_B}" stroke="#444"/>',
               f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{self.h - PAD_B}" stroke="#444"/>']
        for t in self.yt:
            y = PAD_T + (self.y1 - t) / (self.y1 - self.y0) * (self.h - PAD_T - PAD_B)
            label = tick_label(10 ** t) if self.log_y else tick_label(t)
            out.append(f'<line x1="{PAD_L - 3}" y1="{_n(y)}" x2="{self.w - PAD_R}" y2="{_n(y)}" stroke="#ddd"/>'
                       f'<text x="{PAD_L - 5}" y="{_n(y + 3)}" text-anchor="end">{_e(label)}</text>')
        if x_ticks:
            for t in self.xt:
                x = self.px(t)
                out.append(f'<line x1="{_n(x)}" y1="{self.h - PAD_B}" x2="{_n(x)}" y2="{self.h - PAD_B + 3}" stroke="#444"/>'
                           f'<text x="{_n(x)}" y="{self.h - PAD_B + 14}" text-anchor="middle">{_e(tick_label(t))}</text>')
        out.append(f'<text x="{_n((PAD_L + self.w - PAD_R) / 2)}" y="{self.h - 6}" text-anchor="middle">{_e(xlabel)}</text>')
        out.append(f'<text x="12" y="{_n((PAD_T + self.h - PAD_B) / 2)}" text-anchor="middle" '
                   f'transform="rotate(-90 12 {_n((PAD_T + self.h - PAD_B) / 2)})">{_e(ylabel)}</text>')
        return out


def _svg(title: str, parts: list[str], width: int = W, height: int = H, caption: str = "") -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f'<figure class="chart"><svg role="img" aria-label="{_e(title)}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-size="10" font-family="sans-serif"><title>{_e(title)}</title>'
            f'<text x="{PAD_L}" y="14" font-size="12" font-weight="bold">{_e(title)}</text>'
            + "".join(parts) + f"</svg>{cap}</figure>")


def _legend(names: Sequence[str], width: int = W) -> list[str]:
    out, x = [], PAD_L + 4
    y = 20
    for i, name in enumerate(names[:8]):
        color = PALETTE[i % len(PALETTE)]
        label = str(name)[:28]
        if x + 14 + 6 * len(label) > width - PAD_R and y < 30:
            x, y = PAD_L + 4, y + 10
        out.append(f'<rect x="{x}" y="{y}" width="8" height="8" fill="{color}"/>'
                   f'<text x="{x + 11}" y="{y + 8}">{_e(label)}</text>')
        x += 20 + 6 * len(label)
    return out


def bar_chart(title: str, items: Sequence[tuple[str, float]], ylabel: str = "", caption: str = "",
              series: Sequence[str] | None = None, values: Sequence[Sequence[float]] | None = None) -> str:
    """Vertical bars, one per item (``items``: (label, value)); with ``series`` and ``values``
    (values[i][j]: category i, series j) grouped bars with a legend."""
    if values is None:
        values = [[float(v)] for _, v in items]
    labels = [str(k) for k, _ in items]
    n_series = max((len(v) for v in values), default=1)
    top = max([float(x) for v in values for x in v] + [0.0])
    width = max(W, PAD_L + PAD_R + len(labels) * (12 * n_series + 10))
    fr = _Frame(0, 1, 0, top or 1, width=width)
    parts = fr.axes("", ylabel, x_ticks=False)
    slot = (width - PAD_L - PAD_R) / max(1, len(labels))
    bw = max(2.0, (slot - 6) / n_series)
    for i, (label, vals) in enumerate(zip(labels, values)):
        for j, v in enumerate(vals):
            x = PAD_L + i * slot + 3 + j * bw
            y = fr.py(float(v))
            color = PALETTE[j % len(PALETTE)] if n_series > 1 else PALETTE[0]
            name = f"{label} · {series[j]}" if series and n_series > 1 and j < len(series) else label
            parts.append(f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(bw - 1)}" height="{_n(fr.py(0) - y)}" '
                         f'fill="{color}"><title>{_e(name)}: {_e(tick_label(float(v)))}</title></rect>')
            if n_series == 1:
                parts.append(f'<text x="{_n(x + bw / 2)}" y="{_n(y - 2)}" text-anchor="middle">{_e(tick_label(float(v)))}</text>')
        parts.append(f'<text x="{_n(PAD_L + (i + 0.5) * slot)}" y="{H - PAD_B + 13}" text-anchor="middle">{_e(label[:14])}</text>')
    if series and n_series > 1:
        parts += _legend(series, width)
    return _svg(title, parts, width=width, caption=caption)


def histogram(title: str, groups: dict[str, Sequence[float]], bins: int = 20, xlabel: str = "", caption: str = "",
              lo: float | None = None, hi: float | None = None) -> str:
    """Histograms of one or more groups of values on shared bins, drawn as step lines."""
    allv = [float(v) for vals in groups.values() for v in vals if math.isfinite(float(v))]
    if not allv:
        return _svg(title, ['<text x="60" y="100">no data</text>'], caption=caption)
    lo = min(allv) if lo is None else lo
    hi = max(allv) if hi is None else hi
    if hi <= lo:
        hi = lo + 1.0
    edges = [lo + (hi - lo) * k / bins for k in range(bins + 1)]
    counts = {}
    for name, vals in groups.items():
        c = [0] * bins
        for v in vals:
            v = float(v)
            if math.isfinite(v) and lo <= v <= hi:
                c[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
        counts[name] = c
    fr = _Frame(lo, hi, 0, max(max(c) for c in counts.values()) or 1)
    parts = fr.axes(xlabel, "count")
    for j, (name, c) in enumerate(counts.items()):
        color = PALETTE[j % len(PALETTE)]
        pts = [f"{_n(fr.px(edges[0]))},{_n(fr.py(0))}"]
        for k in range(bins):
            y = fr.py(c[k])
            pts += [f"{_n(fr.px(edges[k]))},{_n(y)}", f"{_n(fr.px(edges[k + 1]))},{_n(y)}"]
        pts.append(f"{_n(fr.px(edges[-1]))},{_n(fr.py(0))}")
        fill = f' fill="{color}" fill-opacity="0.15"' if len(counts) <= 3 else ' fill="none"'
        parts.append(f'<polyline points="{" ".join(pts)}" stroke="{color}" stroke-width="1.5"{fill}>'
                     f"<title>{_e(name)}: {sum(c)} values</title></polyline>")
    if len(counts) > 1:
        parts += _legend(list(counts))
    return _svg(title, parts, caption=caption)


def line_chart(title: str, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str = "step",
               ylabel: str = "", caption: str = "", log_y: bool = False, dashed: Sequence[str] = ()) -> str:
    """One line per series (``series[name] = (xs, ys)``); a single point is drawn as a dot.
    ``dashed``: names drawn dashed (controls, chance levels)."""
    pts_all = [(float(x), float(y)) for xs, ys in series.values() for x, y in zip(xs, ys)
               if math.isfinite(float(x)) and math.isfinite(float(y))]
    if not pts_all:
        return _svg(title, ['<text x="60" y="100">no data</text>'], caption=caption)
    log_y = log_y and all(y > 0 for _, y in pts_all)
    xs_all, ys_all = [p[0] for p in pts_all], [p[1] for p in pts_all]
    y0 = min(ys_all) if log_y else min(0.0, min(ys_all))
    x0, x1 = min(xs_all), max(xs_all)
    if x1 == x0:  # one step: centre it
        x0, x1 = x0 - 1, x1 + 1
    fr = _Frame(x0, x1, y0, max(ys_all), log_y=log_y)
    parts = fr.axes(xlabel, ylabel)
    for j, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[j % len(PALETTE)]
        pts = [(fr.px(float(x)), fr.py(float(y))) for x, y in zip(xs, ys)
               if math.isfinite(float(x)) and math.isfinite(float(y))]
        if not pts:
            continue
        dash = ' stroke-dasharray="4 3"' if name in dashed else ""
        if len(pts) == 1:
            parts.append(f'<circle cx="{_n(pts[0][0])}" cy="{_n(pts[0][1])}" r="3" fill="{color}"><title>{_e(name)}</title></circle>')
        else:
            parts.append(f'<polyline points="{" ".join(f"{_n(x)},{_n(y)}" for x, y in pts)}" fill="none" '
                         f'stroke="{color}" stroke-width="1.5"{dash}><title>{_e(name)}</title></polyline>')
    if len(series) > 1:
        parts += _legend(list(series))
    return _svg(title, parts, caption=caption)
