"""Loss and test metrics of `train finetune`: DiceCE and Dice per class (MONAI) for seg, accuracy
and AUC for cls. A class absent from every test volume has no Dice (``None`` in metrics.json);
``dice_mean`` averages the classes that have one.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from sklearn.metrics import roc_auc_score
from torch import nn

from training.finetune.data import VolumeSet
from training.loop.precision import Precision


def seg_loss() -> nn.Module:
    """Mean of Dice and cross-entropy on softmax outputs against integer label volumes (paper §4)."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


@torch.no_grad()
def evaluate_seg(net: nn.Module, data: VolumeSet, classes: list[str], device: torch.device,
                 precision: Precision) -> dict[str, Any]:
    """``{"dice_mean", "dice": {class: x}, "n_volumes"}`` over ``data`` (background excluded)."""
    was = net.training
    net.eval()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True, num_classes=len(classes))
    rows = []
    for i in range(len(data)):
        x, y = data.load(i)
        with precision.autocast():
            logits = net(x[None].to(device))
        pred = logits.float().argmax(1, keepdim=True)
        rows.append(metric(y_pred=pred, y=y[None].to(device)).cpu().numpy())
    net.train(was)
    per = np.concatenate(rows) if rows else np.full((0, len(classes) - 1), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = np.nanmean(per, axis=0) if len(per) else np.full(len(classes) - 1, np.nan)
    dice = {name: _num(v) for name, v in zip(classes[1:], per_class)}
    present = [v for v in dice.values() if v is not None]
    return {"dice_mean": float(np.mean(present)) if present else None, "dice": dice, "n_volumes": len(data)}


@torch.no_grad()
def evaluate_cls(net: nn.Module, data: VolumeSet, classes: list[str], device: torch.device,
                 precision: Precision) -> dict[str, Any]:
    """``{"accuracy", "auc", "n_volumes"}``; AUC is one-vs-rest macro for more than two classes and
    ``None`` when the test split lacks a class."""
    was = net.training
    net.eval()
    probs, ys = [], []
    for i in range(len(data)):
        x, y = data.load(i)
        with precision.autocast():
            logits = net(x[None].to(device))
        probs.append(torch.softmax(logits.float(), 1).cpu().numpy()[0])
        ys.append(int(y))
    net.train(was)
    p, y = np.stack(probs), np.asarray(ys)
    auc = None
    if len(set(ys)) == len(classes):
        score = p[:, 1] if len(classes) == 2 else p
        auc = float(roc_auc_score(y, score, multi_class="ovr", labels=list(range(len(classes)))))
    return {"accuracy": float((p.argmax(1) == y).mean()), "auc": auc, "n_volumes": len(data)}

