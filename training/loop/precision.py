"""`--precision`: which autocast dtype a run uses and whether it needs a gradient scaler."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from training.loop.errors import TrainingError

log = logging.getLogger(__name__)

PRECISIONS = ("amp", "bf16", "fp32")
_DTYPES = {"amp": torch.float16, "bf16": torch.bfloat16, "fp32": None}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` is amp (fp16 + grad scaler, CUDA only), bf16 or fp32."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for fp32."""
        return _DTYPES[self.name]

    def autocast(self) -> torch.autocast:
        """A fresh autocast context (disabled for fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling; for bf16 and fp32 the scaler is a disabled pass-through."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "amp")


def resolve_precision(requested: str | None, device: torch.device, warn: bool = True) -> Precision:
    """The precision a run on ``device`` uses.

    Args:
        requested: amp | bf16 | fp32, or None for amp on CUDA and fp32 elsewhere.
        device: the training device.
        warn: log a warning when amp falls back to fp32 (only rank 0 should).
    """
    name = requested or ("amp" if device.type == "cuda" else "fp32")
    if name not in PRECISIONS:
        raise TrainingError(f"--precision {name}: choose one of {', '.join(PRECISIONS)}")
    if name == "amp" and device.type != "cuda":
        if warn:
            log.warning("--precision amp needs CUDA; training in fp32 on CPU")
        name = "fp32"
    # CPU autocast supports bf16 too (slower than fp32 on most CPUs, but it is what was asked).
    return Precision(name, device.type)
