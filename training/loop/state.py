"""The one restore / save / schedule path of the three trainers: what a resumable checkpoint
holds besides the weights, how it is put back, the learning rate of a step, and how a step's
checkpoint is written (``step_N.pt`` plus the ``latest.pt`` pointer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.loop.checkpoint import point_latest, save
from training.loop.errors import TrainingError
from training.loop.optim import set_hparams, warmup_cosine


def optimizer_state(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """The optimizer and grad-scaler entries of a resumable checkpoint."""
    return {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None}


def restore_optimizer(ckpt: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      lr: float, wd: float, path: Path | str) -> None:
    """Load ``ckpt``'s optimizer (and scaler) state; this run's ``lr`` and ``wd`` then win over
    the saved ones. An optimizer state that does not fit the model is one TrainingError."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise TrainingError(f"{path}: its optimizer state does not fit this model ({e})") from e
    set_hparams(optimizer, lr, wd)
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])


def scheduled_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, warmup: int, total: int) -> float:
    """Set and return the learning rate of 0-based ``step``: warm-up, then cosine to 0 at ``total``."""
    lr = base_lr * warmup_cosine(step, warmup, total)
    set_hparams(optimizer, lr)
    return lr


def save_step(ckpt: dict[str, Any], directory: Path, step: int) -> Path:
    """Write ``directory/step_<step>.pt`` atomically and point ``latest.pt`` at it."""
    path = save(ckpt, directory / f"step_{step}.pt")
    point_latest(path)
    return path
