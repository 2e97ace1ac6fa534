"""Caption requests for the tests: tiny PNGs, requests over them, and a driver the kill tests run
as a subprocess and ``kill -9`` mid-run (the key comes from OPENAI_API_KEY).

    python tests/caption_driver.py --base-url http://127.0.0.1:8123/v1 --images DIR --cache DB
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from PIL import Image

from captions.engine import run_captions
from captions.jobs import CaptionRequest
from captions.options import CaptionOptions, RetryPolicy

PLANES = ("axial", "coronal", "sagittal")


def write_pngs(folder: Path, n: int) -> Path:
    """n tiny PNGs with distinct bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("L", (16 + i // 200, 16), (i * 37) % 256).save(folder / f"img{i:03d}.png")
    return folder


def make_requests(images: Path) -> list[CaptionRequest]:
    """One request per PNG, in name order, with a coarse context derived from the name."""
    requests = []
    for i, path in enumerate(sorted(images.glob("*.png"))):
        requests.append(CaptionRequest(
            slice_id=f"vol{i // 6}:{PLANES[i % 3]}:{i}",
            image_path=path,
            image_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            context={"modality": "CT", "plane": PLANES[i % 3], "position": (i % 10) / 10,
                     "body_region": "abdomen", "labels_present": ["liver"] if i % 2 else [],
                     "dataset": "phantom"},
        ))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--mode", default="sync", choices=("sync", "batch"))
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch-dir", type=Path, default=None)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    args = parser.parse_args()
    options = CaptionOptions(
        provider="openai", model="gpt-4o", base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY"),
        concurrency=args.concurrency, mode=args.mode, poll_interval=args.poll_interval,
        retry=RetryPolicy(initial_s=0.01, max_wait_s=0.2),
    )
    summary = run_captions(make_requests(args.images), options, cache=args.cache, batch_dir=args.batch_dir)
    print(json.dumps(summary.as_dict()), flush=True)


if __name__ == "__main__":
    main()
