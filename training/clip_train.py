"""`train clip`: fine-tune an open_clip model on the manifest's (slice PNG, caption) pairs.

Symmetric contrastive loss (open_clip's ClipLoss, learnable logit scale), AdamW with linear
warmup + cosine decay, optional tower locking and gradient accumulation done the open_clip way
(features of the whole accumulated batch take part in every chunk's loss). Validation
retrieval recall is measured for the base model before the first step and after every epoch.

Checkpoints under ``<workdir>/checkpoints/clip/``: ``epoch_N.pt`` and ``final.pt`` are portable
(weights + plain metadata), ``latest.pt`` also holds optimizer, scaler and RNG state for
``--resume latest``. Metrics go to ``metrics.jsonl`` (one JSON object per evaluation).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch.utils.data import DataLoader

from training.clip_data import ClipPairs, EpochSampler, read_pairs
from training.clip_models import (
    HF_HUB_PREFIX,
    checkpoint_dict,
    create_clip,
    read_checkpoint_meta,
    save_checkpoint,
    unwrap,
    write_config_sidecar,
)
from training.retrieval import evaluate

PRECISIONS = ("amp", "bf16", "fp32")


@dataclass
class ClipTrainConfig:
    """Options of `train clip` (flag names follow open_clip's trainer)."""

    workdir: Path = Path(".")
    manifest: Path = Path("manifests/v1.parquet")
    model: str = "ViT-B-16"  # open_clip name, config JSON, or hf-hub: id
    pretrained: str | None = None  # open_clip tag, hf-hub: id, or checkpoint path; None = random init
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-5
    wd: float = 0.1
    warmup: int = 100  # optimizer steps
    workers: int = 4
    precision: str | None = None  # amp | bf16 | fp32; None: amp on CUDA, fp32 on CPU
    resume: str | None = None  # "latest" or a checkpoint path
    seed: int = 0
    lock_image: bool = False
    lock_text: bool = False
    accum_freq: int = 1
    device: str | None = None  # None: cuda when available
    max_steps: int | None = None  # stop early (the schedule still spans all epochs)
    grad_clip_norm: float | None = None


@dataclass
class ClipTrainResult:
    model: str
    step: int
    total_steps: int
    completed: bool  # the whole schedule ran (final.pt written)
    latest_checkpoint: Path
    final_checkpoint: Path | None
    fingerprint: str
    base_metrics: dict[str, float]
    val_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)  # this run's metrics.jsonl lines
    seconds: float = 0.0


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip's schedule: linear warmup to ``base_lr``, then half-cosine to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base_lr


def _resolve_precision(precision: str | None, device: torch.device) -> tuple[str, torch.dtype | None]:
    precision = precision or ("amp" if device.type == "cuda" else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "amp" and device.type != "cuda":
        warnings.warn("--precision amp needs CUDA; using fp32 on CPU")
        precision = "fp32"
    dtype = {"amp": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
    return precision, dtype


def _param_groups(model: torch.nn.Module, wd: float) -> list[dict[str, Any]]:
    # As open_clip: no weight decay on gains, biases, norms, embeddings' scale and logit scale.
    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd},
    ]


def _plain_config(cfg: ClipTrainConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _find_resume(cfg: ClipTrainConfig, out_dir: Path, log: Callable[[str], None]) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        path = out_dir / "latest.pt"
        if not path.exists():
            log(f"--resume latest: no {path}, starting fresh")
            return None
        return path
    path = Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint")
    return path


def _check_resume_config(saved: dict[str, Any], cfg: ClipTrainConfig, log: Callable[[str], None]) -> None:
    current = _plain_config(cfg)
    for key in ("manifest", "epochs", "batch_size", "lr", "wd", "warmup", "accum_freq", "lock_image", "lock_text", "seed"):
        if key in saved and saved[key] != current[key]:
            log(f"warning: resuming with {key}={current[key]!r}, checkpoint was trained with {saved[key]!r}")


def _log_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def _fmt(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if "_R@" in k and not k.startswith("mean")]
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys)


def train_clip(cfg: ClipTrainConfig, log: Callable[[str], None] = print) -> ClipTrainResult:
    """Fine-tune CLIP on the manifest's train split, evaluating on its val split each epoch."""
    t0 = time.time()
    workdir = Path(cfg.workdir)
    out_dir = workdir / "checkpoints" / "clip"
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision, autocast_dtype = _resolve_precision(cfg.precision, device)
    if cfg.accum_freq < 1:
        raise ValueError("--accum-freq must be >= 1")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    resume_path = _find_resume(cfg, out_dir, log)
    if resume_path is not None:
        # As nanoGPT: the checkpoint's architecture wins; other differences are only warned about.
        saved = read_checkpoint_meta(resume_path)
        if not saved.get("model"):
            raise ValueError(f"--resume {resume_path}: not a `train clip` checkpoint")
        _check_resume_config(saved.get("config", {}), cfg, log)
        clip = create_clip(saved["model"], str(resume_path), device)
        clip.model_cfg = saved.get("model_cfg") or clip.model_cfg
    else:
        hub = (cfg.pretrained or "").startswith(HF_HUB_PREFIX)
        clip = create_clip(cfg.pretrained if hub else cfg.model, None if hub else cfg.pretrained, device)
    name = clip.name
    model = clip.model
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)

    train_df = read_pairs(workdir, cfg.manifest, "train")
    val_df = read_pairs(workdir, cfg.manifest, "val")
    train_ds = ClipPairs(workdir, train_df, clip.preprocess_train, clip.tokenizer, seed=cfg.seed)
    batches_per_epoch = len(train_ds) // cfg.batch_size
    steps_per_epoch = batches_per_epoch // cfg.accum_freq
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(train_ds)} training pairs make no optimizer step with --batch-size {cfg.batch_size} "
            f"and --accum-freq {cfg.accum_freq}"
        )
    total_steps = cfg.epochs * steps_per_epoch
    stop_at = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)

    optimizer = torch.optim.AdamW(_param_groups(model, cfg.wd), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp")
    loss_fn = open_clip.ClipLoss()

    step = 0
    base_metrics: dict[str, float] = {}
    val_metrics: dict[str, float] = {}
    if resume_path is not None:
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        step = int(state.get("step", 0))
        base_metrics = state.get("base_metrics", {})
        val_metrics = state.get("metrics", {})
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"], device)
        else:
            log(f"warning: {resume_path} holds no optimizer state; the optimizer starts fresh")
        log(f"resumed {resume_path} at step {step}/{total_steps}")
    else:
        metrics_path.unlink(missing_ok=True)

    def run_eval() -> dict[str, float]:
        if val_df.empty:
            return {}
        return evaluate(
            model, [str(workdir / p) for p in val_df["image_path"]], list(val_df["image_sha256"]),
            list(val_df["caption"]), clip.preprocess_val, clip.tokenizer, device,
            batch_size=cfg.batch_size, workers=cfg.workers, autocast_dtype=autocast_dtype,
        )

    history: list[dict[str, Any]] = []

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        _log_metrics(metrics_path, entry)

    if resume_path is None:
        base_metrics = run_eval()
        record({"epoch": 0, "step": 0, "kind": "base", "val": base_metrics})
        log(f"base model ({name}, pretrained={cfg.pretrained}): val {_fmt(base_metrics) or '(no val split)'}")

    meta = {"pretrained": cfg.pretrained, "config": _plain_config(cfg), "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "base_metrics": base_metrics}

    def save(path: Path, full: bool, epoch: int) -> dict[str, Any]:
        extra: dict[str, Any] = {**meta, "step": step, "epoch": epoch, "metrics": val_metrics}
        if full:
            extra.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=_rng_state(device))
        ckpt = checkpoint_dict(model, name, clip.model_cfg, **extra)
        save_checkpoint(ckpt, path)
        return ckpt

    model.train()
    pin = device.type == "cuda"
    while step < stop_at:
        epoch = step // steps_per_epoch
        done_batches = (step % steps_per_epoch) * cfg.accum_freq
        sampler = EpochSampler(len(train_ds), cfg.seed, epoch, skip=done_batches * cfg.batch_size)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                            drop_last=True, pin_memory=pin)
        batches = itertools.islice(iter(loader), steps_per_epoch * cfg.accum_freq - done_batches)
        t_epoch, losses = time.time(), []
        while step < stop_at and step // steps_per_epoch == epoch:
            chunk = list(itertools.islice(batches, cfg.accum_freq))
            lr = cosine_lr(step, cfg.lr, cfg.warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _train_step(model, chunk, loss_fn, optimizer, scaler, device, autocast_dtype, cfg.grad_clip_norm)
            step += 1
            if math.isfinite(loss):
                losses.append(loss)
            else:
                log(f"warning: non-finite loss at step {step}; update skipped")
        del batches, loader
        if step % steps_per_epoch == 0:  # epoch finished: evaluate and checkpoint
            val_metrics = run_eval()
            n_epoch = step // steps_per_epoch
            train_loss = sum(losses) / len(losses) if losses else float("nan")
            entry = {"epoch": n_epoch, "step": step, "kind": "epoch", "train_loss": train_loss, "lr": lr,
                     "logit_scale": float(unwrap(model).logit_scale.detach().exp()), "seconds": round(time.time() - t_epoch, 2),
                     "val": val_metrics}
            record(entry)
            log(f"epoch {n_epoch}/{cfg.epochs} step {step}/{total_steps} loss {train_loss:.4f} lr {lr:.2e} "
                f"val {_fmt(val_metrics)}")
            save(out_dir / f"epoch_{n_epoch}.pt", full=False, epoch=n_epoch)
            if step < stop_at:
                save(out_dir / "latest.pt", full=True, epoch=n_epoch)

    ckpt = save(out_dir / "latest.pt", full=True, epoch=step // steps_per_epoch)
    final = None
    if step >= total_steps:
        final = out_dir / "final.pt"
        save(final, full=False, epoch=cfg.epochs)
        sidecar = write_config_sidecar(name, clip.model_cfg, out_dir)
        log(f"final checkpoint {final}" + (f" (register {sidecar} with open_clip.add_model_config to load it)" if sidecar else ""))
    return ClipTrainResult(
        model=name, step=step, total_steps=total_steps, completed=final is not None,
        latest_checkpoint=out_dir / "latest.pt", final_checkpoint=final, fingerprint=ckpt["fingerprint"],
        base_metrics=base_metrics, val_metrics=val_metrics, history=history, seconds=time.time() - t0,
    )


def _train_step(
    model: torch.nn.Module,
    chunk: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    grad_clip_norm: float | None,
) -> float:
    """One optimizer step over ``len(chunk)`` batches; returns the loss of the whole batch."""
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    chunk = [(i.to(device, non_blocking=True), t.to(device, non_blocking=True)) for i, t in chunk]
    optimizer.zero_grad(set_to_none=True)
    if len(chunk) == 1:
        with amp:
            img, txt, scale = model(*chunk[0])[:3]
            loss = loss_fn(img, txt, scale)
        scaler.scale(loss).backward()
    else:
        # Gradient accumulation for a contrastive loss: every sample must see the negatives of
        # the whole accumulated batch, so first embed all chunks without grad, then recompute
        # one chunk at a time with grad and splice it in (as open_clip's --accum-freq).
        with torch.no_grad(), amp:
            feats = [model(*b)[:2] for b in chunk]
        for j, batch in enumerate(chunk):
            with amp:
                img_j, txt_j, scale = model(*batch)[:3]
                img = torch.cat([f[0] for f in feats[:j]] + [img_j] + [f[0] for f in feats[j + 1:]])
                txt = torch.cat([f[1] for f in feats[:j]] + [txt_j] + [f[1] for f in feats[j + 1:]])
                # The logit scale's gradient must be counted once, not once per chunk.
                loss = loss_fn(img, txt, scale if j == 0 else scale.detach())
            scaler.scale(loss).backward()
    if not torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    if grad_clip_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():  # as open_clip: keep exp(logit_scale) <= 100
        unwrap(model).logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())
