#!/usr/bin/env python3
"""Open a built report in headless Chromium (file://, no server, no network) and check images.

Usage: check_report.py WORKDIR [--screenshot PNG] [--chromium PATH] [--pages N]

Each report page carries a tiny inline script that, on window ``load``, writes the number of
loaded images (complete and naturalWidth > 0) and of all images into
``<body data-images-loaded data-images-total>``, and the number of inline SVGs (charts, label
outlines) with a size on the page and of all of them into ``data-svgs-drawn data-svgs-total``.
This script dumps the DOM of index.html and of the first N volume pages and requires
loaded == total > 0 and drawn == total on each, and no console error (Chromium's log of the
page's console), then takes a screenshot of the index and of the first volume page. Exit
status 0 only when every page passes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # any attempt at the network fails, loudly
    "--virtual-time-budget=5000",
]
BODY = re.compile(r"<body\b[^>]*>", re.IGNORECASE)


def _attr(tag: str, name: str) -> int | None:
    m = re.search(rf'\b{name}="(\d+)"', tag)
    return int(m.group(1)) if m else None


def chromium(binary: str, args: list[str], timeout: float = 90.0) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="check-report-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


CONSOLE = re.compile(r"CONSOLE.*?(Uncaught|Error|error|Failed)|Failed to load resource|Not allowed to load")


def console_errors(stderr: str) -> list[str]:
    """Console errors and failed loads from Chromium's log (``--enable-logging=stderr``)."""
    return [ln.strip() for ln in stderr.splitlines() if CONSOLE.search(ln)]


def check_page(binary: str, page: Path) -> tuple[int, int]:
    """(images loaded, images total) of one page, as the page's inline script counted them;
    RuntimeError when an inline SVG has no size or the console logged an error."""
    res = chromium(binary, ["--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()])
    m = BODY.search(res.stdout)
    if res.returncode != 0 or not m:
        raise RuntimeError(f"{page}: chromium exit {res.returncode}, no <body> in the DOM; {res.stderr[-500:]}")
    loaded, total = _attr(m.group(0), "data-images-loaded"), _attr(m.group(0), "data-images-total")
    if loaded is None or total is None:
        raise RuntimeError(f"{page}: the load script did not run (no data-images-* on <body>)")
    drawn, svgs = _attr(m.group(0), "data-svgs-drawn"), _attr(m.group(0), "data-svgs-total")
    if drawn is not None and svgs is not None and drawn != svgs:
        raise RuntimeError(f"{page}: {svgs - drawn} of {svgs} inline SVGs have no size on the page")
    errors = console_errors(res.stderr)
    if errors:
        raise RuntimeError(f"{page}: console error: {errors[0][:300]}")
    return loaded, total


def screenshot(binary: str, page: Path, out: Path, width: int = 1280, height: int = 1600) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    res = chromium(binary, [f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
                            "--hide-scrollbars", page.resolve().as_uri()])
    if res.returncode != 0 or not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(f"{page}: screenshot failed (exit {res.returncode}); {res.stderr[-500:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--screenshot", type=Path, default=None,
                    help="PNG path (default: WORKDIR/reports/check_screenshot.png)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--pages", type=int, default=1, help="volume pages to check (default 1)")
    args = ap.parse_args(argv)
    if not args.chromium:
        print("error: chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2
    reports = args.workdir / "reports"
    index = reports / "index.html"
    if not index.exists():
        print(f"error: {index} does not exist (run curate report first)", file=sys.stderr)
        return 2
    volume_pages = sorted((reports / "volumes").glob("*.html"))[: max(args.pages, 0)]
    ok = True
    for page in [index, *volume_pages]:
        try:
            loaded, total = check_page(args.chromium, page)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"FAIL {page}: {exc}")
            ok = False
            continue
        good = total > 0 and loaded == total
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {page.relative_to(args.workdir)}: {loaded}/{total} images loaded")
    if volume_pages:
        shot = args.screenshot or reports / "check_screenshot.png"
        try:
            screenshot(args.chromium, volume_pages[0], shot)
            print(f"screenshot: {shot}")
            index_shot = shot.with_name(shot.stem + "_index" + shot.suffix)
            screenshot(args.chromium, index, index_shot, height=4000)
            print(f"screenshot: {index_shot}")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"FAIL screenshot: {exc}")
            ok = False
    else:
        print("FAIL no volume pages")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
