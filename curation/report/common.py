"""What every report page shares: escaping, formatting, the page frame, CSS and the load script.

Pages open from the file system with no server and no network: image paths are relative
(into ``cache/png/<size>/``), CSS is inline, charts are inline SVG, and the only script is a
small inline one that records in ``<body data-images-loaded data-images-total>`` how many
images loaded, and in ``data-svgs-drawn data-svgs-total`` how many inline SVGs (charts, label
outlines) have a size on the page (read by ``scripts/check_report.py``).
"""

from __future__ import annotations

import hashlib
import os
import re
from html import escape
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

import pandas as pd

from curation.store.fsutil import atomic_write_text

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa;max-width:1500px}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th{background:#eee}pre{background:#f0f0f0;padding:.6em;overflow-x:auto}
nav a{margin-right:1em}
.strip{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0;width:112px;border:3px solid transparent;background:#fff;font-size:11px}
.pic{position:relative;line-height:0}.pic img{width:100%;display:block;background:#000}
.pic svg{position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none}
figure.chosen{outline:3px solid #e67e00;outline-offset:2px}
figure.captioned{border-color:#1565c0;width:240px}
.badge{display:inline-block;background:#555;color:#fff;padding:0 4px;border-radius:3px;margin:2px 0}
.chosen .badge{background:#e67e00}.caption{font-size:12px;margin:2px 0;white-space:pre-wrap}
.refused{color:#b00020}.err{color:#b00020}.thumb{width:64px;height:64px;display:block}
.legend{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:.4em 0 1em;font-size:13px}
.box{display:inline-block;width:22px;height:16px;background:#333;border:3px solid transparent;margin:0 8px 0 4px;vertical-align:middle}
.sw-chosen{outline:3px solid #e67e00;outline-offset:2px}.sw-captioned{border-color:#1565c0}.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
.charts{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure.chart{width:auto;border:1px solid #ddd;padding:4px;background:#fff}
figure.chart figcaption{font-size:11px;color:#555;max-width:360px}
.flag{display:inline-block;background:#b00020;color:#fff;padding:0 5px;border-radius:3px;margin:1px 2px;font-size:11px}
td.cov{text-align:right;min-width:3em}.note{color:#555;font-size:13px}
"""

LOAD_SCRIPT = (
    '<script>window.addEventListener("load",function(){var im=document.images,n=0;'
    "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)n++;}"
    "var sv=document.getElementsByTagName(\"svg\"),m=0;"
    "for(var j=0;j<sv.length;j++){var r=sv[j].getBoundingClientRect();if(r.width>0&&r.height>0)m++;}"
    "document.body.dataset.imagesLoaded=String(n);"
    "document.body.dataset.imagesTotal=String(im.length);"
    "document.body.dataset.svgsDrawn=String(m);"
    "document.body.dataset.svgsTotal=String(sv.length);});</script>"
)


def esc(value: Any) -> str:
    return escape("" if missing(value) else str(value), quote=True)


def missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists/arrays
        return False


def fmt(value: Any, spec: str = "") -> str:
    return "–" if missing(value) else format(value, spec)


def page_name(volume_id: str) -> str:
    """A file-name-safe page name; a hash suffix keeps sanitised ids distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(volume_id)).lstrip(".") or "volume"
    if safe != volume_id:
        safe += "-" + hashlib.sha256(str(volume_id).encode()).hexdigest()[:8]
    return safe + ".html"


def src(image_path: str, up: str) -> str:
    return esc(up + quote(str(image_path).replace(os.sep, "/")))


def page(title: str, body: Iterable[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + f"\n{LOAD_SCRIPT}\n</body>\n</html>\n"
    )


def table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p>(none)</p>"
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False)]
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def flags_of(value: Any) -> list[str]:
    """A volume's quality flags as a list (manifests written before the column have none)."""
    if value is None or isinstance(value, (float, str)):
        return []
    try:
        return [str(v) for v in value]
    except TypeError:
        return []


def flag_badges(value: Any) -> str:
    return "".join(f'<span class="flag">{esc(f)}</span>' for f in flags_of(value))
