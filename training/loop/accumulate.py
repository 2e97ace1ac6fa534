"""One optimizer step of a contrastive trainer, over one or several micro-batches: the step every
trainer shares, with its one non-finite policy.

Contrastive gradient accumulation (as open_clip's ``--accum-freq``): the features of every
micro-batch are first computed without gradient; then each micro-batch is recomputed with
gradient and spliced in place of its cached features, the loss of the whole (spliced) batch is
taken and backpropagated. Every sample is thus contrasted with all of the step's samples, and the
summed gradient is that of one batch of that size (for networks whose forward treats samples
independently: no BatchNorm in train mode, see ``has_batchnorm``).

Policy, the same for every trainer: a non-finite loss raises (the caller's ``on_nonfinite``
builds the exception, naming the step and diagnosing the inputs; by default a TrainingError naming
the step) before its backward; a non-finite gradient norm raises unless a fp16 grad scaler is
active (which then skips the step and lowers its scale, as it is meant to). Nothing is skipped
silently.

    forward(mb) -> Tensor | tuple[Tensor, ...]   # the first ``concat`` outputs are per-sample
    loss_fn(spliced, rest, first) -> {"loss": Tensor, ...}
      spliced: the first ``concat`` outputs, concatenated over all micro-batches in order
      rest:    the other outputs of this micro-batch's gradient forward (e.g. a logit scale)
      first:   True for micro-batch 0 only: count shared terms (a learnable temperature) once

For `train clip`, ``forward`` returns ``(image_features, text_features, logit_scale)`` with
``concat=2`` and the loss detaches ``rest[0]`` unless ``first``; for `train pretrain`, ``forward``
returns the projections and the loss closes over the frozen targets of the whole step.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from training.loop.errors import TrainingError
from training.loop.precision import Precision

Forward = Callable[[Any], "torch.Tensor | tuple[torch.Tensor, ...]"]
LossFn = Callable[[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], bool], dict[str, torch.Tensor]]
# (loss value, the step's micro-batches) -> the exception to raise
OnNonfinite = Callable[[float, Sequence[Any]], Exception]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (its train-mode output mixes the samples of a
    batch, so micro-batches cannot reproduce one big batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Running statistics of normalisation layers restored on exit: the cached no-grad pass of
    accumulation must not update them (the gradient pass does, once per sample)."""
    saved = [(b, b.detach().clone()) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _as_tuple(x: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def accumulate_gradients(
    micro_batches: Sequence[Any],
    forward: Forward,
    loss_fn: LossFn,
    *,
    step: int,
    precision: Precision,
    scaler: torch.amp.GradScaler,
    model: nn.Module,
    ddp: nn.Module | None = None,
    concat: int = 1,
    on_nonfinite: OnNonfinite | None = None,
) -> dict[str, torch.Tensor]:
    """Backpropagate the loss of the whole step through every micro-batch (gradients summed in
    ``.grad``; zero them before). ``model`` is the unwrapped network (its norm statistics are kept
    out of the cached pass); ``ddp`` its DistributedDataParallel wrapper, if any: only the last
    micro-batch all-reduces. Returns the loss dict of the last micro-batch (the whole step's loss)."""
    n = len(micro_batches)
    if n == 0:
        raise ValueError("accumulate_gradients needs at least one micro-batch")
    cached: list[tuple[torch.Tensor, ...]] = []
    if n > 1:
        with torch.no_grad(), precision.autocast(), frozen_norm_stats(model):
            cached = [_as_tuple(forward(mb))[:concat] for mb in micro_batches]
    out: dict[str, torch.Tensor] = {}
    for j, mb in enumerate(micro_batches):
        sync = ddp.no_sync() if ddp is not None and j < n - 1 else nullcontext()
        with sync:
            with precision.autocast():
                outputs = _as_tuple(forward(mb))
            feats, rest = outputs[:concat], outputs[concat:]
            if cached:
                feats = tuple(torch.cat([*(c[i] for c in cached[:j]), f, *(c[i] for c in cached[j + 1:])])
                              for i, f in enumerate(feats))
            out = loss_fn(feats, rest, j == 0)
            loss = out["loss"]
            # Under DDP every rank holds the same (gathered) loss, so every rank raises together.
            if not torch.isfinite(loss):
                value = loss.item()
                raise (on_nonfinite(value, micro_batches) if on_nonfinite is not None
                       else TrainingError(f"non-finite loss ({value}) at step {step}", step=step))
            scaler.scale(loss).backward()
    return out


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_norm: float,
                   step: int) -> float:
    """Unscale, clip the global gradient norm (``clip_norm`` <= 0: no clipping), step and update
    the scaler; returns the norm. A non-finite norm without an active fp16 scaler raises."""
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else float("inf"))
    if not torch.isfinite(norm) and not scaler.is_enabled():
        raise TrainingError(f"non-finite gradient norm at step {step}; lower --lr or use --precision fp32", step=step)
    scaler.step(optimizer)  # skipped by the scaler on inf/nan gradients under fp16
    scaler.update()
    return float(norm.item())
