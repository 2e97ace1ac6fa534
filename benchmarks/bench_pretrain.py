"""`train pretrain` cost: one training step at paper shapes, and CLIP-per-step vs the embedding cache.

Rows, all from one run in one process (so the ratios come from one machine at one time):

- ``step``   : one optimizer step of `train pretrain`, run by the trainer's own ``train_step``:
               encoder (default MONAI ViT as UNETR's, 128^3, patch 16, hidden 768, 12 layers) ->
               PSAT (Q=300, width 512, 2 layers) -> AlignmentLoss (image + text InfoNCE) ->
               backward -> grad clip -> AdamW at the warmup + cosine lr, batch 2. Inputs are
               random tensors (no disk), so this is compute only.
               Time per step (after ``--warmup`` untimed steps) and peak memory (CPU: the rise of
               the process's resident high-water mark over the steps; CUDA: max allocated).
- ``volume`` : the data side that stays: np.load (mmap) + float32 of the batch's 128^3 float16
               volumes from disk (page cache warm).
- ``clip``   : what the released code pays per step for its targets: an open_clip ViT-B-16
               (random init, ``pretrained=None``, nothing downloaded) encoding the batch's slices
               at 224 px and its captions, no grad (PNG decoding and resizing not counted).
- ``cache``  : what `train pretrain` pays instead: gathering the batch's rows from the in-memory
               float16 embedding table (load_embeddings runs once at start-up; its one-off cost for
               ``--store-rows`` rows is reported as ``store_load_s``).

Usage::

    python benchmarks/bench_pretrain.py                        # paper shapes, 3 timed steps
    python benchmarks/bench_pretrain.py --steps 2 --warmup 1   # quicker
    python benchmarks/bench_pretrain.py --encoder swin --img-size 128
    python benchmarks/bench_pretrain.py --skip-step            # only the data-side rows
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from proc_stats import hwm_mb, rss_mb  # noqa: E402


def _hwm_mb() -> float:
    """Resident high-water mark (VmHWM) of this process, MB (ru_maxrss where /proc has none)."""
    return hwm_mb() or rss_mb()


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _timed(fn, n: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def bench_step(args, device: torch.device) -> dict:
    from training.loop.optim import set_hparams, warmup_cosine
    from training.loop.precision import resolve_precision
    from training.pretrain.step import TrainState, train_step
    from training.pretrain.train import PretrainConfig

    cfg = PretrainConfig(workdir=Path("."), encoder=args.encoder, img_size=args.img_size,
                         num_queries=args.num_queries, psat_width=args.width, precision=args.precision,
                         warmup=10, steps=1000)
    torch.manual_seed(0)
    state = TrainState.create(cfg, grid=args.img_size, clip_dim=args.clip_dim, device=device,
                              precision=resolve_precision(cfg.precision, device))
    model = state.model
    b, s = args.batch, args.img_size
    batch = {
        "volume": torch.rand(b, 1, s, s, s, device=device),
        "plane": torch.randint(0, 3, (b,), device=device),
        "index": torch.randint(0, s, (b,), device=device),
        "image": torch.randn(b, args.clip_dim, device=device),
        "text": torch.randn(b, args.clip_dim, device=device),
    }
    done = 0

    def step():
        nonlocal done
        set_hparams(state.optimizer, cfg.lr * warmup_cosine(done, cfg.warmup, cfg.steps))
        train_step(state, cfg, iter([batch]), done + 1)
        done += 1

    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_head = sum(p.numel() for p in model.head.parameters())
    _timed(step, args.warmup, device)  # first steps allocate optimizer state and caches
    gc.collect()
    base = _rss_mb()
    reset = _reset_hwm()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = _timed(step, args.steps, device)
    row = {
        "row": "step", "encoder": args.encoder, "img_size": s, "batch": b, "precision": args.precision,
        "num_queries": args.num_queries, "width": args.width, "tokens": model.encoder.num_tokens,
        "encoder_params_m": n_enc / 1e6, "head_params_m": n_head / 1e6,
        "step_s_mean": float(np.mean(times)), "step_s_min": float(np.min(times)), "steps_timed": len(times),
        "samples_per_s": b / float(np.mean(times)),
    }
    if device.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["rss_before_mb"] = base
        row["peak_rss_mb"] = _hwm_mb()
        row["peak_rise_mb"] = row["peak_rss_mb"] - base if reset else None
    return row  # the model and optimizer go with this frame; main() collects before the next row


def bench_volume(args, tmp: Path) -> dict:
    from training.pretrain.data import load_volume

    rng = np.random.default_rng(0)
    for i in range(args.batch):
        np.save(tmp / f"v{i}.npy", rng.random((args.img_size,) * 3, dtype=np.float32).astype(np.float16))

    def load():
        torch.stack([load_volume(tmp, f"v{i}.npy") for i in range(args.batch)])

    load()  # page cache warm, as in an epoch after the first
    times = _timed(load, args.data_repeats, torch.device("cpu"))
    return {"row": "volume", "batch": args.batch, "per_step_s": float(np.median(times))}


def bench_clip(args, device: torch.device) -> dict:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(args.clip_model, pretrained=None).to(device).eval()
    tokenizer = open_clip.get_tokenizer(args.clip_model)
    b = args.batch
    images = torch.rand(b, 3, 224, 224, device=device)
    captions = [f"Axial CT slice {i} of the upper abdomen showing the liver, spleen and stomach; "
                "the kidneys are partly visible and the vertebral body is at the midline." for i in range(b)]

    def forward():
        with torch.no_grad():
            model.encode_image(images)
            model.encode_text(tokenizer(captions).to(device))

    forward()
    times = _timed(forward, args.clip_steps, device)
    return {"row": "clip", "model": args.clip_model, "batch": b, "per_step_s": float(np.median(times))}


def bench_cache(args, tmp: Path) -> dict:
    from curation.store.embed_store import load_embeddings, text_key, write_meta, write_table

    n, dim = args.store_rows, args.clip_dim
    rng = np.random.default_rng(0)
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    captions = [f"caption {i}" for i in range(n)]
    emb = rng.standard_normal((n, dim)).astype(np.float16)
    write_table(tmp, "bench", "image", shas, emb)
    write_table(tmp, "bench", "text", [text_key(c) for c in captions], emb)
    write_meta(tmp, "bench", model=args.clip_model, checkpoint="none", dim=dim)
    manifest = pd.DataFrame({"image_sha256": shas, "caption": captions})
    t0 = time.perf_counter()
    image, text, _ = load_embeddings(tmp, manifest, "bench")
    load_s = time.perf_counter() - t0
    rows = rng.integers(0, n, size=(args.data_repeats, args.batch))

    def gather(r):
        torch.stack([torch.from_numpy(image[i].astype(np.float32)) for i in r])
        torch.stack([torch.from_numpy(text[i].astype(np.float32)) for i in r])

    times = []
    for r in rows:
        t0 = time.perf_counter()
        gather(r)
        times.append(time.perf_counter() - t0)
    return {"row": "cache", "batch": args.batch, "per_step_s": float(np.median(times)),
            "store_rows": n, "store_load_s": load_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="vit", choices=("vit", "swin", "cnn"))
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--num-queries", type=int, default=300)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--clip-dim", type=int, default=512)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "amp", "bf16"))
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    ap.add_argument("--skip-step", action="store_true", help="only the data-side rows")
    ap.add_argument("--clip-model", default="ViT-B-16")
    ap.add_argument("--clip-steps", type=int, default=3)
    ap.add_argument("--store-rows", type=int, default=20000, help="rows in the synthetic embedding store")
    ap.add_argument("--data-repeats", type=int, default=50)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    meta = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        benches = [] if args.skip_step else [lambda: bench_step(args, device)]
        benches += [lambda: bench_volume(args, Path(tmp)), lambda: bench_clip(args, device),
                    lambda: bench_cache(args, Path(tmp))]
        for fn in benches:
            rows.append(fn())
            gc.collect()  # free the last row's model before the next one is measured
            print(json.dumps(rows[-1]), flush=True)
    by = {r["row"]: r for r in rows}
    ratio = by["clip"]["per_step_s"] / max(by["cache"]["per_step_s"], 1e-9)
    summary = {"clip_over_cache": ratio}
    if "step" in by:
        summary["clip_share_of_step"] = by["clip"]["per_step_s"] / (by["clip"]["per_step_s"] + by["step"]["step_s_mean"])
    print(json.dumps({"meta": meta, "summary": summary}), flush=True)
    print(f"\nCLIP per step {by['clip']['per_step_s'] * 1e3:.1f} ms vs cached lookup "
          f"{by['cache']['per_step_s'] * 1e3:.3f} ms: {ratio:,.0f}x"
          + (f"; training step {by['step']['step_s_mean']:.2f} s" if "step" in by else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
