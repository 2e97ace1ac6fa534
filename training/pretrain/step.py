"""One optimizer step of `train pretrain`, and the objects it updates.

Public so that the benchmark times exactly what the loop runs (``benchmarks/bench_pretrain.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from training.loop.accumulate import accumulate_gradients, has_batchnorm, optimizer_step
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
        check_accumulation(cfg, model)
        loss_fn = AlignmentLoss(cfg.image_weight, cfg.text_weight, cfg.init_temperature).to(device)
        optimizer = adamw({"model": model, "loss": loss_fn}, cfg.lr, cfg.wd)
        return cls(model, loss_fn, optimizer, precision.grad_scaler(), precision, device)


OnNonfinite = Callable[[dict[str, torch.Tensor], float], Exception]


def check_accumulation(cfg: PretrainConfig, model: nn.Module) -> None:
    """``--accum-freq`` > 1 is exact only for encoders without BatchNorm: refuse the others."""
    if cfg.accum_freq > 1 and has_batchnorm(model):
        raise TrainingError(
            f"--accum-freq {cfg.accum_freq} with --encoder {cfg.encoder}: its BatchNorm normalises each micro-batch "
            "on its own, so the accumulated gradient is not that of one batch; use --accum-freq 1 with a larger "
            "--batch-size, or a LayerNorm encoder (vit, swin)")


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

    ``--accum-freq`` enlarges the contrastive batch (``training.loop.accumulate``): every sample
    is contrasted with all ``accum_freq * batch_size`` (times ranks) samples and the summed
    gradient is that of one batch of that size (refused for BatchNorm encoders, see
    ``check_accumulation``). The learning rate is whatever the optimizer holds (set it first). A
    non-finite loss raises ``on_nonfinite(batch, value)`` (default: a TrainingError naming ``step``)
    before its backward, ``batch`` being the step's micro-batches concatenated.

    Returns:
        loss, image_loss, text_loss (of the whole accumulated batch), logit_scale, grad_norm, batch
        (the contrastive batch on this rank).
    """
    net = state.ddp or state.model
    state.optimizer.zero_grad(set_to_none=True)
    raw = [next(batches) for _ in range(cfg.accum_freq)]
    micro = [_to(b, cfg, state.device) for b in raw]
    image, text = _cat([m["image"] for m in micro]), _cat([m["text"] for m in micro])

    def forward(m: dict[str, torch.Tensor | None]) -> torch.Tensor:
        # The cached no-grad pass bypasses the DDP wrapper (nothing to all-reduce there).
        return (net if torch.is_grad_enabled() else state.model)(m["volume"], m["plane"], m["index"])

    def loss(spliced: tuple[torch.Tensor, ...], rest: tuple[torch.Tensor, ...], first: bool) -> dict[str, torch.Tensor]:
        # The logit scale's gradient is counted once (micro-batch 0), not once per micro-batch.
        return state.loss_fn(spliced[0], image=image, text=text, scale_grad=first)

    def nonfinite(value: float, _micro: object) -> Exception:
        bad = raw[0] if len(raw) == 1 else {k: torch.cat([b[k] for b in raw]) for k in raw[0]}
        return (on_nonfinite(bad, value) if on_nonfinite else
                TrainingError(f"non-finite loss ({value}) at step {step}", step=step))

    out = accumulate_gradients(micro, forward, loss, step=step, precision=state.precision, scaler=state.scaler,
                               model=state.model, ddp=state.ddp, on_nonfinite=nonfinite)
    sums = {k: out[k].item() for k in ("loss", "image_loss", "text_loss") if k in out}
    sums["logit_scale"] = out["logit_scale"].item()
    sums["grad_norm"] = optimizer_step(state.optimizer, state.scaler, cfg.grad_clip_norm, step)
    state.loss_fn.clamp_()  # after the step, as open_clip: a clamp in forward would kill its gradient
    sums["batch"] = float(sum(len(m["volume"]) for m in micro))
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
