"""AdamW with the weight-decay groups and the warmup + cosine schedule both trainers use.

The learning rate is a pure function of the step (set on the optimizer before every step), so a
resumed run needs no scheduler state and a changed ``--lr`` simply applies from the next step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# Exempt from weight decay besides every parameter with fewer than 2 dims (biases, norm gains):
# the CLIP logit scale, position embeddings and the PSAT queries (decay pulls them toward zero
# for no gain).
NO_DECAY_KEYS = ("logit_scale", "pspe", "queries", "position_embeddings")
BETAS = (0.9, 0.98)
EPS = 1e-6


def param_groups(modules: nn.Module | dict[str, nn.Module], wd: float) -> list[dict[str, Any]]:
    """Two AdamW groups, in this order: ``[decayed matrices, exempt parameters]``.

    Args:
        modules: one module, or several by name (e.g. the model and the loss with its temperature).
        wd: weight decay of the first group.
    """
    if isinstance(modules, nn.Module):
        modules = {"": modules}
    decay, no_decay = [], []
    for module in modules.values():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            exempt = p.ndim < 2 or any(k in name for k in NO_DECAY_KEYS)
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(modules: nn.Module | dict[str, nn.Module], lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW over ``param_groups(modules, wd)`` with CLIP's betas and eps."""
    return torch.optim.AdamW(param_groups(modules, wd), lr=lr, betas=BETAS, eps=EPS)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier of 0-based ``step``: linear from 1/warmup to 1 over ``warmup`` steps, then a
    half cosine to 0 at ``total`` (open_clip's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_hparams(optimizer: torch.optim.Optimizer, lr: float, wd: float | None = None) -> None:
    """Set ``lr`` on every group and, when given, ``wd`` on the decayed group (``param_groups``
    order). After loading an optimizer state, this makes the current config win over the saved one."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if wd is not None:
            group["weight_decay"] = wd if i == 0 else 0.0
