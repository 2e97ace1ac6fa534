"""The cases `benchmarks/gpu_check.py` measures, run in a child process it supervises.

    python benchmarks/gpu_cases.py --plan PLAN.json --events EVENTS.jsonl

PLAN.json: ``{"device": "cuda"|"cpu", "dry_run": bool, "scratch": DIR, "cases": [{"id", "part",
"kind", "params"}, ...]}``. For every case, in order, one JSON line goes to EVENTS.jsonl when it
starts (``{"id", "event": "start"}``) and one when it ends (``{"id", "event": "done", "result"}``
or ``{"id", "event": "error", "error"}``); the parent enforces the time caps by killing this
process and starting a new one for the cases left. A CUDA error that can poison the context ends
this process (exit 3) after its line, so the next case starts on a fresh context.

Every case calls the project's public functions, as `train pretrain` / `train finetune` run them:
``TrainState.create`` + ``train_step`` (pretrain), ``load_split`` + ``StepBatchSampler`` +
``DataLoader`` (the data side), ``net_spec`` + ``build_net`` + ``seg_loss`` (finetune) and
``bench_downstream.run`` (the downstream sequence).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_check import too_late  # noqa: E402

FATAL_CUDA = (
    "illegal memory access",
    "device-side assert",
    "CUDA error: unspecified launch failure",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "an illegal instruction",
    "misaligned address",
)


class Fatal(Exception):
    """A failure after which this process should not run another case."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> dict[str, float | None]:
    if device.type == "cuda":
        return {
            "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    return {"peak_gpu_mib": None, "peak_reserved_mib": None}


def _rss_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _timed_steps(
    step: Callable[[], Any], device: torch.device, warmup: int, steps: int, max_s: float
) -> tuple[list[float], list[float]]:
    """(warm-up step times, timed step times); the timed loop stops after ``max_s`` seconds (at least 2 steps)."""
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        step()
        _sync(device)
        warm.append(time.perf_counter() - t0)
    gc.collect()
    _reset_peak(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < steps and (len(times) < 2 or time.perf_counter() - start < max_s):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return warm, times


def _stats(times: list[float], batch: int) -> dict[str, Any]:
    mean = float(np.mean(times))
    return {
        "step_ms": mean * 1e3,
        "step_ms_median": float(np.median(times)) * 1e3,
        "step_ms_min": float(np.min(times)) * 1e3,
        "steps_timed": len(times),
        "samples_per_s": batch / mean,
    }


# --------------------------------------------------------------------------- env


def case_env(p: dict, device: torch.device, plan: dict) -> dict:
    import importlib.metadata

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        out.update(
            gpu=prop.name,
            gpu_mem_gib=prop.total_memory / 2**30,
            sm_count=prop.multi_processor_count,
            capability=f"{prop.major}.{prop.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            out["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            out["nvidia_smi"] = f"unavailable ({e})"
    else:
        out["gpu"] = None
    versions = {}
    for dist in (
        "monai",
        "numpy",
        "pandas",
        "pyarrow",
        "open_clip_torch",
        "nibabel",
        "duckdb",
        "triton",
        "torchvision",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "missing"
    out["packages"] = versions
    try:
        out["git"] = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


# --------------------------------------------------------------------------- pretrain


def _pretrain_state(p: dict, device: torch.device):
    from training.loop.precision import resolve_precision
    from training.pretrain.config import PretrainConfig
    from training.pretrain.step import TrainState

    fields = dict(
        workdir=Path("."),
        encoder=p.get("encoder", "vit"),
        encoder_kwargs=dict(p.get("encoder_kwargs", {})),
        img_size=p["img_size"],
        num_queries=p["num_queries"],
        psat_width=p["width"],
        precision=p["precision"],
        batch_size=p["batch"],
        warmup=10,
        steps=1000,
        workers=0,
        progress=False,
        report_to="",
    )
    known = {f.name for f in dataclasses.fields(PretrainConfig)}  # the config is still moving: pass what it has
    cfg = PretrainConfig(**{k: v for k, v in fields.items() if k in known})
    torch.manual_seed(0)
    precision = resolve_precision(cfg.precision, device, warn=False)
    # the PSAT position table has the manifest grid's rows (the loader cases' grid; else the input side)
    state = TrainState.create(
        cfg, grid=p.get("grid", p["img_size"]), clip_dim=p["clip_dim"], device=device, precision=precision
    )
    return cfg, state, precision


def _synthetic_pretrain_batch(p: dict, device: torch.device) -> dict[str, torch.Tensor]:
    b, s, d = p["batch"], p["img_size"], p["clip_dim"]
    g = torch.Generator().manual_seed(0)
    # matched sampling (the default): the whole batch at one plane and slice position
    return {
        "volume": torch.rand(b, 1, s, s, s, generator=g).to(device),
        "plane": torch.zeros(b, dtype=torch.long, device=device),
        "index": torch.full((b,), s // 2, dtype=torch.long, device=device),
        "image": torch.randn(b, d, generator=g).to(device),
        "text": torch.randn(b, d, generator=g).to(device),
        "row": torch.arange(b, device=device),
    }


def case_pretrain(p: dict, device: torch.device, plan: dict) -> dict:
    """One optimizer step of `train pretrain` (``train_step``) on random inputs already on the device."""
    from training.loop.optim import set_hparams, warmup_cosine
    from training.pretrain.step import train_step

    if p.get("tf32"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    cfg, state, precision = _pretrain_state(p, device)
    compile_s = None
    if p.get("compile"):
        backend = p.get("backend", "inductor")
        if hasattr(state.model, "compile"):
            state.model.compile(backend=backend)  # in place: same module, same state_dict keys
        else:  # pragma: no cover - torch < 2.2
            state.model = torch.compile(state.model, backend=backend)
    build_s = time.perf_counter() - t0
    batch = _synthetic_pretrain_batch(p, device)
    done = 0
    losses: list[float] = []

    def step() -> None:
        nonlocal done
        set_hparams(state.optimizer, cfg.lr * warmup_cosine(done, cfg.warmup, cfg.steps))
        out = train_step(state, cfg, iter([batch]), done + 1)
        losses.append(float(out["loss"]))
        done += 1

    if p.get("compile"):
        t0 = time.perf_counter()
        step()  # compiles
        _sync(device)
        compile_s = time.perf_counter() - t0
    warm, times = _timed_steps(step, device, p["warmup"], p["steps"], p.get("max_timed_s", 20.0))
    model = state.model
    row = {
        "precision": precision.name,
        "batch": p["batch"],
        "img_size": p["img_size"],
        "compile": bool(p.get("compile")),
        "backend": p.get("backend") if p.get("compile") else None,
        "tf32": bool(p.get("tf32")),
        "tokens": getattr(model.encoder, "num_tokens", None),
        "encoder_params_m": sum(q.numel() for q in model.encoder.parameters()) / 1e6,
        "head_params_m": sum(q.numel() for q in model.head.parameters()) / 1e6,
        "build_s": build_s,
        "compile_s": compile_s,
        "first_step_s": warm[0] if warm else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        **_stats(times, p["batch"]),
        **_peak(device),
    }
    if device.type != "cuda":
        row["peak_rss_mib"] = _rss_hwm_mib()
    if p.get("tf32"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return row


# --------------------------------------------------------------------------- data side


def _loader_root(plan: dict) -> Path:
    return Path(plan["scratch"]) / "loader-work"


def case_loader_data(p: dict, device: torch.device, plan: dict) -> dict:
    """A synthetic release workdir written with the project's store functions: ``volumes/<id>/volume.npy``
    (grid^3 float16, as `curate slice` writes), a release manifest with captioned slices at the same
    positions in every volume (so matched sampling fills whole batches), and an embedding store."""
    import pandas as pd

    from curation.store.embed_store import text_key, write_meta, write_table
    from curation.store.manifest import write_manifest

    t0 = time.perf_counter()
    root = _loader_root(plan)
    n, g, d = p["volumes"], p["grid"], p["clip_dim"]
    rng = np.random.default_rng(0)
    rows = []
    positions = [
        (plane, g * k // (p["positions_per_plane"] + 1))
        for plane in range(3)
        for k in range(1, p["positions_per_plane"] + 1)
    ]
    for i in range(n):
        vid = f"gpucheck-{i:04d}"
        vdir = root / "volumes" / vid
        vdir.mkdir(parents=True, exist_ok=True)
        np.save(vdir / "volume.npy", rng.random((g, g, g), dtype=np.float32).astype(np.float16))
        for plane, idx in positions:
            sid = f"{vid}-{plane}-{idx:03d}"
            rows.append(
                {
                    "slice_id": sid,
                    "volume_id": vid,
                    "plane_index": plane,
                    "index": idx,
                    "image_path": f"cache/png/512/{vid}/{plane}_{idx}.png",
                    "image_sha256": hashlib.sha256(sid.encode()).hexdigest(),
                    "caption": f"synthetic slice {plane}-{idx} of volume {i}",
                    "refused": False,
                    "split": "train",
                    "volume_path": f"volumes/{vid}/volume.npy",
                    "grid_size": g,
                }
            )
    df = pd.DataFrame(rows)
    manifest = write_manifest(df, root / "manifests" / "v1.parquet")
    emb = rng.standard_normal((len(df), d)).astype(np.float16)
    write_table(root, "gpucheck", "image", list(df["image_sha256"]), emb)
    write_table(root, "gpucheck", "text", [text_key(c) for c in df["caption"]], emb)
    write_meta(root, "gpucheck", model="synthetic", checkpoint="none", dim=d)
    os.sync()
    (root / "READY").write_text(str(manifest))
    return {
        "volumes": n,
        "grid": g,
        "rows": len(df),
        "volume_mib": g**3 * 2 / 2**20,
        "build_s": time.perf_counter() - t0,
    }


def _loader(plan: dict, p: dict, device: torch.device, workers: int):
    from torch.utils.data import DataLoader

    from training.pretrain import data as pdata

    root = _loader_root(plan)
    if not (root / "READY").exists():
        raise RuntimeError("the loader workdir was not built (the loader-data case failed or was cut)")
    # img_size as `train pretrain` passes it: volumes resized to the encoder's input side when it differs
    loaded = pdata.load_split(root, Path((root / "READY").read_text()), "train", "gpucheck", 0, p.get("img_size"))
    if loaded is None:
        raise RuntimeError("the synthetic manifest has no usable rows")
    ds = loaded[0]
    pin = device.type == "cuda"
    if hasattr(pdata, "StepBatchSampler"):
        sampler = pdata.StepBatchSampler(ds, p["batch"], 1, 0, 1, seed=0, mode="matched")
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=pin)
        how = "StepBatchSampler(matched)"
    else:  # an older/newer data API: a plain shuffled loader over the dataset
        loader = DataLoader(
            ds, batch_size=p["batch"], shuffle=True, drop_last=True, num_workers=workers, pin_memory=pin
        )
        how = "DataLoader(shuffle)"
    return ds, loader, how


def _drop_page_cache(root: Path) -> bool:
    """Evict the volumes from the page cache (posix_fadvise DONTNEED; no root needed)."""
    ok = True
    for f in (root / "volumes").rglob("volume.npy"):
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return ok


def case_loader(p: dict, device: torch.device, plan: dict) -> dict:
    """Samples/s the real dataset + sampler + DataLoader of `train pretrain` delivers onto the device."""
    workers = p["workers"]
    ds, loader, how = _loader(plan, p, device, workers)
    cold = bool(p.get("cold"))
    dropped = _drop_page_cache(_loader_root(plan)) if cold else None
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    first["volume"].to(device, non_blocking=True)
    _sync(device)
    first_s = time.perf_counter() - t0
    times, n_samples = [], 0
    start = time.perf_counter()
    while len(times) < p["batches"] and (len(times) < 2 or time.perf_counter() - start < p.get("max_timed_s", 20.0)):
        t1 = time.perf_counter()
        b = next(it)
        b["volume"].to(device, non_blocking=True)
        b["image"].to(device, non_blocking=True)
        _sync(device)
        times.append(time.perf_counter() - t1)
        n_samples += len(b["volume"])
    wall = time.perf_counter() - start
    del it
    return {
        "workers": workers,
        "batch": p["batch"],
        "grid": p["grid"],
        "sampler": how,
        "cold_cache": cold,
        "page_cache_dropped": dropped,
        "first_batch_s": first_s,
        "batches_timed": len(times),
        "batch_ms": wall / len(times) * 1e3,
        "samples_per_s": n_samples / wall,
        "mib_per_s": n_samples * p["grid"] ** 3 * 4 / 2**20 / wall,
        "train_volumes": len(ds),
    }


def case_loader_step(p: dict, device: torch.device, plan: dict) -> dict:
    """The loader feeding ``train_step``, as `train pretrain`'s loop runs them: end-to-end samples/s."""
    from training.loop.optim import set_hparams, warmup_cosine
    from training.pretrain.step import train_step

    cfg, state, precision = _pretrain_state(p, device)
    _, loader, how = _loader(plan, p, device, p["workers"])
    it = iter(loader)
    done = 0

    def step() -> None:
        nonlocal done
        set_hparams(state.optimizer, cfg.lr * warmup_cosine(done, cfg.warmup, cfg.steps))
        train_step(state, cfg, it, done + 1)
        done += 1

    warm, times = _timed_steps(step, device, p["warmup"], p["steps"], p.get("max_timed_s", 20.0))
    return {
        "precision": precision.name,
        "batch": p["batch"],
        "workers": p["workers"],
        "sampler": how,
        "first_step_s": warm[0] if warm else None,
        **_stats(times, p["batch"]),
        **_peak(device),
    }


# --------------------------------------------------------------------------- finetune


def case_finetune(p: dict, device: torch.device, plan: dict) -> dict:
    """One `train finetune --task seg` step (as ``Finetuner._train_step``): forward under autocast,
    DiceCE, backward, grad clip, AdamW, on random inputs on the device."""
    from training.finetune.evaluate import seg_loss
    from training.finetune.nets import build_net, net_spec
    from training.loop.optim import adamw
    from training.loop.precision import resolve_precision
    from training.models.encoders import encoder_config

    s, b, k = p["img_size"], p["batch"], p["num_classes"]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    enc = encoder_config(p["encoder"], img_size=s, **p.get("encoder_kwargs", {}))
    spec = net_spec("seg", p["encoder"], enc, num_classes=k, feature_size=p.get("feature_size", 16))
    net = build_net(spec).to(device)
    precision = resolve_precision(p["precision"], device, warn=False)
    scaler = precision.grad_scaler()
    optimizer = adamw(net, 1e-4, 1e-5)
    loss_fn = seg_loss()
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    shape = tuple(p.get("input_shape") or (s, s, s))  # the dry run feeds SwinUNETR a smaller, non-cubic input
    x = torch.rand(b, 1, *shape, generator=g).to(device)
    y = torch.randint(0, k, (b, 1, *shape), generator=g).to(device)
    losses: list[float] = []

    def step() -> None:
        net.train()
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            out = net(x)
        loss = loss_fn(out.float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # the finetune default --grad-clip-norm
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))

    warm, times = _timed_steps(step, device, p["warmup"], p["steps"], p.get("max_timed_s", 20.0))
    return {
        "net": spec["class"].rsplit(".", 1)[1],
        "precision": precision.name,
        "batch": b,
        "img_size": s,
        "input_shape": list(shape),
        "num_classes": k,
        "params_m": sum(q.numel() for q in net.parameters()) / 1e6,
        "build_s": build_s,
        "first_step_s": warm[0] if warm else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        **_stats(times, b),
        **_peak(device),
    }


# --------------------------------------------------------------------------- downstream


def case_downstream(p: dict, device: torch.device, plan: dict) -> dict:
    """`benchmarks/bench_downstream.py --size <base>`, shortened: its own command line (``main``) with
    the size's fields overridden (fewer subjects, steps, seeds and arms) to fit the case's cap.
    Overrides that its ``Size`` does not have are ignored and reported (the benchmark is still moving)."""
    import contextlib
    import io

    import bench_downstream as bd

    base = bd.SIZES[p["base"]]
    known = {f.name for f in dataclasses.fields(base)}
    override = {k: tuple(v) if isinstance(v, list) else v for k, v in p["override"].items() if k in known}
    ignored = sorted(set(p["override"]) - known)
    bd.SIZES[p["base"]] = dataclasses.replace(base, **override)
    root = Path(plan["scratch"]) / "downstream"
    root.mkdir(parents=True, exist_ok=True)
    out_json = root / "bench_downstream.json"
    argv = ["--size", p["base"], *p.get("argv", []), "--out", str(out_json), "--keep", str(root / "work")]
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            bd.main(argv)
    finally:
        bd.SIZES[p["base"]] = base
        print(buf.getvalue(), flush=True)  # into the child's log (the parent keeps its tail on a timeout)
    seconds = time.perf_counter() - t0
    out = json.loads(out_json.read_text())
    # the numbers: every evaluation's arm-minus-scratch differences (or per-arm Dice of older versions)
    numbers: dict[str, float] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, bool):
            return
        if isinstance(obj, (int, float)) and np.isfinite(obj):
            numbers[prefix] = float(obj)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)

    walk("", out.get("summary") or out.get("results") or {})
    return {
        "base": p["base"],
        "argv": argv[:-4],
        "override": {k: (list(v) if isinstance(v, tuple) else v) for k, v in override.items()},
        "ignored_overrides": ignored,
        "seconds": seconds,
        "bench_seconds": out.get("seconds"),
        "summary": numbers,
        "table": out.get("table"),
        "log_tail": buf.getvalue()[-1500:],
    }


CASES: dict[str, Callable[[dict, torch.device, dict], dict]] = {
    "env": case_env,
    "pretrain": case_pretrain,
    "loader_data": case_loader_data,
    "loader": case_loader,
    "loader_step": case_loader_step,
    "finetune": case_finetune,
    "downstream": case_downstream,
}


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, required=True)
    ap.add_argument("--events", type=Path, required=True)
    args = ap.parse_args(argv)
    plan = json.loads(args.plan.read_text())
    device = torch.device(plan["device"])
    if plan.get("threads"):
        torch.set_num_threads(int(plan["threads"]))
    with args.events.open("a") as ev:

        def emit(obj: dict) -> None:
            ev.write(json.dumps(obj, default=str) + "\n")
            ev.flush()

        for case in plan["cases"]:
            if plan.get("deadline") and too_late(case, plan["deadline"], time.time()):
                emit({"id": case["id"], "event": "skipped", "error": "out of time: the later cases keep their share"})
                continue
            emit({"id": case["id"], "event": "start", "t": time.time()})
            t0 = time.perf_counter()
            try:
                result = CASES[case["kind"]](case["params"], device, plan)
                emit({"id": case["id"], "event": "done", "seconds": time.perf_counter() - t0, "result": result})
            except Exception as e:  # noqa: BLE001 - every failure is recorded, the next case goes on
                msg = f"{type(e).__name__}: {e}".strip()
                oom = isinstance(e, getattr(torch, "OutOfMemoryError", MemoryError)) or "out of memory" in msg.lower()
                emit(
                    {
                        "id": case["id"],
                        "event": "error",
                        "seconds": time.perf_counter() - t0,
                        "error": ("OOM: " if oom else "") + msg[:2000],
                        "traceback": traceback.format_exc()[-3000:],
                    }
                )
                if any(s in msg for s in FATAL_CUDA):
                    return 3
            _cleanup(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
