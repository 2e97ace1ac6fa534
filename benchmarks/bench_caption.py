"""`curate caption` throughput against a rate-limited 200 ms server, vs a naive loop; cached reruns.

One run, side by side, against ``captions.fake_server`` (a real HTTP server on 127.0.0.1 speaking
the OpenAI API; every chat answer takes ``--latency`` s and the server itself answers 429 past
``--rpm`` requests in any sliding 60 s window):

- ``ours``     : ``captions.engine.run_captions(requests, CaptionOptions(base_url=<fake>,
                 concurrency=C, rpm=R))`` over N tiny distinct PNGs into a fresh ``CaptionCache`` (what
                 ``curate caption --concurrency C --rpm R`` does after choosing the slices);
- ``naive``    : the plain ``openai.OpenAI`` client (its defaults: max_retries=2) calling
                 ``chat.completions.create`` one request at a time over the same N requests (same
                 messages, built by ``captions.prompts.build_messages``), answers into a dict;
- ``cached``   : ``run_captions`` again over the same N requests and cache (must send nothing);
- ``cached-50k``: ``run_captions`` over 50,000 requests whose keys are all in a cache filled with
                 50,000 rows (``put_many``, rows made by ``captions.jobs``' ``caption_job`` and
                 ``cache_row``, as the engine makes them);
                 the requests share 50 PNG files but carry distinct made-up ``image_sha256``
                 values (the key is made from the sha, not from the file). File opens under the
                 PNG folder are counted with an audit hook: planning must not read images for
                 cached keys.

Each live method gets its own fresh server, so one method's requests never use up another's
rate-limit window. Target (DESIGN.md "Performance targets"): ``ours`` at least 90% of the
configured rate limit against a 200 ms server; a rerun over 50,000 cached rows in seconds with
zero requests.

    .venv/bin/python benchmarks/bench_caption.py                 # N=300 (~30 s + ~60 s naive)
    .venv/bin/python benchmarks/bench_caption.py --quick         # smoke run (N=30, 5,000 cached)
    .venv/bin/python benchmarks/bench_caption.py --n 1000        # longer than 60 s: window effects
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai
from PIL import Image

from captions.cache import CaptionCache
from captions.client import Answer
from captions.engine import run_captions
from captions.fake_server import FakeConfig, FakeOpenAI
from captions.jobs import CaptionRequest, cache_row, caption_job
from captions.options import CaptionOptions
from captions.prompts import build_messages

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-bench"
DEFAULTS = CaptionOptions()  # the model and generation settings `curate caption` uses
PLANES = ("axial", "coronal", "sagittal")
LABELS = (["liver", "right_kidney"], ["spleen"], [], ["brain", "ventricles"], ["lung"])

# ----------------------------------------------------------------------------------- inputs


def write_pngs(folder: Path, n: int) -> list[tuple[Path, str]]:
    """n tiny (16x16 grey) PNGs with distinct bytes: the index is written into the pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        pixels = bytearray((i * 37 + j) % 256 for j in range(256))
        pixels[:4] = i.to_bytes(4, "big")
        path = folder / f"img{i:05d}.png"
        Image.frombytes("L", (16, 16), bytes(pixels)).save(path)
        out.append((path, hashlib.sha256(path.read_bytes()).hexdigest()))
    return out


def context(i: int) -> dict[str, Any]:
    return {"modality": "CT" if i % 2 else "MR", "plane": PLANES[i % 3], "position": (i % 10) / 9,
            "body_region": "abdomen" if i % 2 else "head", "labels_present": LABELS[i % len(LABELS)],
            "dataset": "bench"}


def live_requests(pngs: list[tuple[Path, str]]) -> list[CaptionRequest]:
    return [CaptionRequest(f"bench{i:05d}:{PLANES[i % 3]}:{i}", path, sha, context(i))
            for i, (path, sha) in enumerate(pngs)]


# ----------------------------------------------------------------------------------- server


def server(latency: float, rpm: float) -> FakeOpenAI:
    return FakeOpenAI(FakeConfig(api_key=API_KEY, latency=latency, rpm_limit=rpm)).start()


def live_options(fake: FakeOpenAI, args: argparse.Namespace) -> CaptionOptions:
    """What ``curate caption --base-url <fake> --concurrency C --rpm R`` passes to the engine."""
    return CaptionOptions(provider="openai", base_url=fake.base_url, api_key=API_KEY,
                          concurrency=args.concurrency, rpm=args.rpm)


def server_stats(fake: FakeOpenAI, started: float, rpm: float) -> dict[str, Any]:
    """What the server saw: statuses, timeline (relative to ``started``), sliding-window peak."""
    log = fake.chat_log()
    t0 = sorted(r["t0"] for r in log)
    ok_t0 = sorted(r["t0"] for r in log if r["status"] == 200)
    peak_60 = 0
    lo = 0
    for hi, t in enumerate(t0):  # most requests arriving within any 60 s
        while t - t0[lo] >= 60.0:
            lo += 1
        peak_60 = max(peak_60, hi - lo + 1)
    burst = sum(1 for t in t0 if t0 and t - t0[0] < 1.0)
    after = [t for t in t0 if t - t0[0] >= 1.0]
    steady = (len(after) - 1) / (after[-1] - after[0]) if len(after) > 1 and after[-1] > after[0] else None
    return {
        "http_requests": len(log),
        "status_200": len(ok_t0),
        "status_429": sum(1 for r in log if r["status"] == 429),
        "other_status": sum(1 for r in log if r["status"] not in (200, 429)),
        "max_in_flight": fake.max_in_flight,
        "first_request_s": (t0[0] - started) if t0 else None,
        "last_answer_s": (max(r.get("t1", r["t0"]) for r in log) - started) if log else None,
        "arrivals_first_1s": burst,
        "arrival_rate_after_1s": steady,
        "peak_arrivals_any_60s": peak_60,
        "server_limit_per_60s": rpm,
    }


# ----------------------------------------------------------------------------------- methods


def bench_ours(reqs: list[CaptionRequest], cache_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    fake = server(args.latency, args.rpm)
    try:
        started = time.monotonic()
        summary = run_captions(reqs, live_options(fake, args), cache=cache_path)
        seconds = time.monotonic() - started
        stats = server_stats(fake, started, args.rpm)
    finally:
        fake.stop()
    with CaptionCache(cache_path) as db:
        rows = len(db)
    return {"method": f"ours (c={args.concurrency}, rpm={args.rpm:g})", "requests": len(reqs),
            "seconds": seconds, "answered": summary.succeeded + summary.refused, "cache_rows": rows,
            "failed": summary.failed, "client_http_requests": summary.http_requests,
            "engine_elapsed_s": summary.elapsed_s, "server": stats}


def bench_naive(reqs: list[CaptionRequest], args: argparse.Namespace) -> dict[str, Any]:
    fake = server(args.latency, args.rpm)
    answers: dict[str, str | None] = {}
    try:
        client = openai.OpenAI(base_url=fake.base_url, api_key=API_KEY)
        started = time.monotonic()
        for req in reqs:
            messages = build_messages(req, req.image_path.read_bytes(), "low")
            resp = client.chat.completions.create(model=DEFAULTS.model, messages=messages,
                                                  max_tokens=DEFAULTS.max_tokens,
                                                  temperature=DEFAULTS.temperature)
            answers[req.slice_id] = resp.choices[0].message.content
        seconds = time.monotonic() - started
        client.close()
        stats = server_stats(fake, started, args.rpm)
    finally:
        fake.stop()
    return {"method": "naive (sequential openai client)", "requests": len(reqs), "seconds": seconds,
            "answered": sum(1 for a in answers.values() if a), "server": stats}


def bench_cached(reqs: list[CaptionRequest], cache_path: Path, args: argparse.Namespace,
                 label: str) -> dict[str, Any]:
    """run_captions over requests that are all cached: seconds, requests on the wire, file opens."""
    fake = server(args.latency, args.rpm)
    png_dirs = tuple(sorted({str(r.image_path.parent) for r in reqs}))
    try:
        OPENS.update(count=0, prefixes=png_dirs, on=True)
        started = time.monotonic()
        summary = run_captions(reqs, live_options(fake, args), cache=cache_path)
        seconds = time.monotonic() - started
        OPENS["on"] = False
        stats = server_stats(fake, started, args.rpm)
    finally:
        OPENS["on"] = False
        fake.stop()
    return {"method": label, "requests": len(reqs), "seconds": seconds, "cached": summary.cached,
            "to_send": summary.to_send, "sent": summary.sent,
            "client_http_requests": summary.http_requests, "server_http_requests": stats["http_requests"],
            "png_opens": OPENS["count"]}


def fill_synthetic_cache(cache_path: Path, n: int, png_dir: Path) -> tuple[list[CaptionRequest], float]:
    """n requests over 50 shared PNGs with distinct made-up image_sha256, all put in the cache."""
    pngs = write_pngs(png_dir, 50)
    reqs = [CaptionRequest(f"syn{i:06d}:{PLANES[i % 3]}:{i % 200}", pngs[i % 50][0],
                           hashlib.sha256(f"synthetic-image-{i}".encode()).hexdigest(), context(i))
            for i in range(n)]
    rows = []
    for i, req in enumerate(reqs):
        answer = Answer(f"Synthetic cached caption {i}.", "stop", False, 150, 40, f"req_syn{i}", DEFAULTS.model)
        rows.append(cache_row(caption_job(DEFAULTS, req).item, answer, "sync"))
    started = time.monotonic()
    with CaptionCache(cache_path) as db:
        for k in range(0, len(rows), 10_000):
            db.put_many(rows[k : k + 10_000])
        assert len(db) == n, f"expected {n} cached rows, found {len(db)}"
    return reqs, time.monotonic() - started


# File opens under the PNG folders while a cached rerun plans (audit hooks cannot be removed,
# so this one is switched by a flag).
OPENS: dict[str, Any] = {"on": False, "count": 0, "prefixes": ()}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and OPENS["on"] and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.startswith(OPENS["prefixes"]):
            OPENS["count"] += 1


# ----------------------------------------------------------------------------------- report


def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="live requests (default 300; --quick 30)")
    ap.add_argument("--cached-rows", type=int, default=None, help="synthetic cached rerun (default 50000; --quick 5000)")
    ap.add_argument("--rpm", type=float, default=600.0, help="client --rpm and the server's limit per 60 s")
    ap.add_argument("--latency", type=float, default=0.2, help="server seconds per chat answer")
    ap.add_argument("--concurrency", type=int, default=8, help="engine workers (curate caption default 8)")
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument("--no-naive", action="store_true", help="skip the sequential loop (it takes N x latency)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results_caption.json"),
                    help="results JSON ('' for none; benchmarks/results_*.json is git-ignored)")
    args = ap.parse_args()
    n = args.n if args.n is not None else (30 if args.quick else 300)
    n_cached = args.cached_rows if args.cached_rows is not None else (5000 if args.quick else 50_000)
    limit_per_s = args.rpm / 60.0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.addaudithook(_audit)
    print(f"caption benchmark: N={n}, server latency {args.latency * 1000:.0f} ms, rate limit {args.rpm:g}/min "
          f"(client --rpm and server sliding 60 s window), concurrency {args.concurrency}, "
          f"{os.cpu_count()} CPUs, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_caption_") as tmp:
        tmp_path = Path(tmp)
        reqs = live_requests(write_pngs(tmp_path / "png", n))
        cache_path = tmp_path / "cache" / "captions.sqlite"
        ours = bench_ours(reqs, cache_path, args)
        print(f"  ours done: {ours['seconds']:.2f} s", flush=True)
        naive = None if args.no_naive else bench_naive(reqs, args)
        if naive:
            print(f"  naive done: {naive['seconds']:.2f} s", flush=True)
        cached = bench_cached(reqs, cache_path, args, f"cached rerun ({n})")
        syn_cache = tmp_path / "syn" / "captions.sqlite"
        syn_reqs, fill_s = fill_synthetic_cache(syn_cache, n_cached, tmp_path / "syn_png")
        cached_big = bench_cached(syn_reqs, syn_cache, args, f"cached rerun ({n_cached:,})")

    live = [ours] + ([naive] if naive else [])
    for m in live:
        m["captions_per_s"] = m["answered"] / m["seconds"]
        m["pct_rate_limit"] = 100.0 * m["captions_per_s"] / limit_per_s
        m["x_naive"] = m["captions_per_s"] / naive["answered"] * naive["seconds"] if naive else None
    headers = ["method", "requests", "answered", "seconds", "captions/s", "% of rate limit", "x naive",
               "HTTP reqs", "429s", "max in flight"]
    rows = [[m["method"], str(m["requests"]), str(m["answered"]), f"{m['seconds']:.2f}",
             f"{m['captions_per_s']:.2f}", f"{m['pct_rate_limit']:.1f}%",
             f"{m['x_naive']:.2f}" if m["x_naive"] else "-", str(m["server"]["http_requests"]),
             str(m["server"]["status_429"]), str(m["server"]["max_in_flight"])] for m in live]
    print()
    print(fmt_table(headers, rows))
    s = ours["server"]
    steady = s["arrival_rate_after_1s"]
    steady_txt = (f"then {steady:.2f}/s = {100 * steady / limit_per_s:.1f}% of the limit" if steady
                  else "no later arrivals")
    print(f"\nours, as the server saw it: first request +{s['first_request_s']:.3f} s, last answer "
          f"+{s['last_answer_s']:.2f} s (run returned at {ours['seconds']:.2f} s); {s['arrivals_first_1s']} "
          f"requests arrived in the first second (the client bucket starts full), {steady_txt}; at most "
          f"{s['peak_arrivals_any_60s']} arrivals in any 60 s (server allows {args.rpm:g}); "
          f"cache rows {ours['cache_rows']}, failed {ours['failed']}")
    print("\ncached reruns (run_captions over requests whose keys are all cached):")
    headers = ["rerun", "requests", "seconds", "requests/s", "cached", "to send", "HTTP reqs (server)", "PNG opens"]
    rows = [[c["method"], f"{c['requests']:,}", f"{c['seconds']:.3f}", f"{c['requests'] / c['seconds']:,.0f}",
             f"{c['cached']:,}", str(c["to_send"]), str(c["server_http_requests"]), str(c["png_opens"])]
            for c in (cached, cached_big)]
    print(fmt_table(headers, rows))
    print(f"(filling the synthetic cache: {n_cached:,} rows by put_many in {fill_s:.2f} s, not timed above)")

    ok_rate = ours["pct_rate_limit"] >= 90.0 and ours["cache_rows"] == n
    ok_cached = all(c["server_http_requests"] == 0 and c["client_http_requests"] == 0 and c["to_send"] == 0
                    and c["cached"] == c["requests"] for c in (cached, cached_big))
    print(f"\ntarget >= 90% of the rate limit: {'met' if ok_rate else 'MISSED'} ({ours['pct_rate_limit']:.1f}%)")
    print(f"target cached rerun over {n_cached:,} rows in seconds with 0 requests: "
          f"{'met' if ok_cached and cached_big['seconds'] < 10 else 'MISSED'} ({cached_big['seconds']:.2f} s, "
          f"{cached_big['server_http_requests']} requests)")
    result = {"n": n, "cached_rows": n_cached, "rpm": args.rpm, "latency_s": args.latency,
              "concurrency": args.concurrency, "live": live, "cached": [cached, cached_big],
              "synthetic_fill_s": fill_s, "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
              "python": platform.python_version(), "openai": openai.__version__}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
