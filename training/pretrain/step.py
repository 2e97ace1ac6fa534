"""One optimizer step of `train pretrain`, and the objects it updates.

Public so that the benchmark times exactly what the loop runs (``benchmarks/bench_pretrain.py``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from training.loop.errors import TrainingError
from training.loop.optim import adamw
from training.loop.precision import Precision
from training.models.align_model import AlignModel, build_model
from training.models.losses import AlignmentLoss
from training.pretrain.config import PretrainConfig
from training.pretrain.data import VolumeSliceDataset


@dataclass
class TrainState:
    """Model, loss (with its learnable temperature), optimizer and grad scaler of a run;
    ``ddp`` is the model's DistributedDataParallel wrapper when there are several ranks."""

    model: AlignModel
    loss_fn: AlignmentLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    ddp: nn.Module | None = None

    @classmethod
    def create(cls, cfg: PretrainConfig, grid: int, clip_dim: int, device: torch.device,
               precision: Precision) -> TrainState:
        """Fresh model and loss on ``device`` (seed first for a reproducible init), AdamW over both."""
        model = build_model(cfg.align_spec(), grid, clip_dim).to(device)
        loss_fn = AlignmentLoss(cfg.image_weight, cfg.text_weight, cfg.init_temperature).to(device)
        optimizer = adamw({"model": model, "loss": loss_fn}, cfg.lr, cfg.wd)
        return cls(model, loss_fn, optimizer, precision.grad_scaler(), precision, device)


OnNonfinite = Callable[[dict[str, torch.Tensor], float], Exception]


def _to(batch: dict[str, torch.Tensor], cfg: PretrainConfig, device: torch.device) -> dict[str, torch.Tensor | None]:
    return {"volume": batch["volume"].to(device, non_blocking=True), "plane": batch["plane"].to(device),
            "index": batch["index"].to(device),
            "image": batch["image"].to(device) if cfg.image_weight else None,
            "text": batch["text"].to(device) if cfg.text_weight else None}


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)


def train_step(state: TrainState, cfg: PretrainConfig, batches: Iterator[dict[str, torch.Tensor]], step: int,
               on_nonfinite: OnNonfinite | None = None) -> dict[str, float]:
    """One optimizer step over ``cfg.accum_freq`` micro-batches drawn from ``batches``.

    ``--accum-freq`` enlarges the contrastive batch (as open_clip's): the projections of every
    micro-batch are first computed without gradient, then each micro-batch is recomputed with
    gradient and spliced in, so every sample is contrasted with all ``accum_freq * batch_size``
    (times ranks) samples and the summed gradient is that of one batch of that size. The
    learning rate is whatever the optimizer holds (set it first). A non-finite loss raises
    ``on_nonfinite(batch, value)`` (default: a TrainingError naming ``step``) before its backward.

    Returns:
        loss, image_loss, text_loss (of the whole accumulated batch), logit_scale, grad_norm.
    """
    net = state.ddp or state.model
    opt, scaler, device = state.optimizer, state.scaler, state.device
    opt.zero_grad(set_to_none=True)
    raw = [next(batches) for _ in range(cfg.accum_freq)]
    micro = [_to(b, cfg, device) for b in raw]
    image, text = _cat([m["image"] for m in micro]), _cat([m["text"] for m in micro])
    cached: list[torch.Tensor] = []
    if cfg.accum_freq > 1:
        with torch.no_grad(), state.precision.autocast():
            cached = [state.model(m["volume"], m["plane"], m["index"]) for m in micro]
    out: dict[str, torch.Tensor] = {}
    for j, m in enumerate(micro):
        # Only the last micro-batch all-reduces gradients.
        sync = state.ddp.no_sync() if state.ddp is not None and j < cfg.accum_freq - 1 else nullcontext()
        with sync:
            with state.precision.autocast():
                proj = net(m["volume"], m["plane"], m["index"])
            if cached:
                proj = torch.cat([*cached[:j], proj, *cached[j + 1:]])
            # The logit scale's gradient is counted once (chunk 0), not once per micro-batch.
            out = state.loss_fn(proj, image=image, text=text, scale_grad=j == 0)
            loss = out["loss"]
            # Every rank holds the same (gathered) loss, so every rank raises together.
            if not torch.isfinite(loss):
                value = loss.item()
                bad = raw[j] if len(raw) == 1 else {k: torch.cat([b[k] for b in raw]) for k in raw[0]}
                raise (on_nonfinite(bad, value) if on_nonfinite else
                       TrainingError(f"non-finite loss ({value}) at step {step}", step=step))
            scaler.scale(loss).backward()
    sums = {k: out[k].item() for k in ("loss", "image_loss", "text_loss") if k in out}
    sums["logit_scale"] = out["logit_scale"].item()
    scaler.unscale_(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm if cfg.grad_clip_norm > 0 else float("inf"))
    if not torch.isfinite(norm) and not scaler.is_enabled():
        raise TrainingError(f"non-finite gradient norm at step {step}; lower --lr or use --precision fp32", step=step)
    scaler.step(opt)  # skipped by the scaler on inf/nan gradients under fp16
    scaler.update()
    state.loss_fn.clamp_()  # after the step, as open_clip: a clamp in forward would kill its gradient
    sums["grad_norm"] = norm.item()
    return sums


def nonfinite_error(step: int, batch: dict[str, torch.Tensor], data: VolumeSliceDataset, value: float,
                    last_ckpt: Path | None) -> TrainingError:
    """The error for a non-finite loss: which inputs were not finite (by slice id), or else that
    training diverged and what to change; and the checkpoint to go back to."""
    bad = []
    for key, what in (("volume", "volume voxels"), ("image", "CLIP image embeddings"), ("text", "CLIP text embeddings")):
        finite = torch.isfinite(batch[key].flatten(1)).all(1)
        if not finite.all():
            ids = [data.rows["slice_id"].iloc[int(r)] for r in batch["row"][~finite]]
            bad.append(f"{what} of {ids}")
    cause = ("non-finite inputs: " + "; ".join(bad)) if bad else (
        "inputs are finite, so training diverged: lower --lr, raise --warmup or lower --grad-clip-norm, or use --precision bf16/fp32")
    resume = f"; the last checkpoint is {last_ckpt}" if last_ckpt else ""
    return TrainingError(f"non-finite loss ({value}) at step {step}: {cause}{resume}", step=step)
