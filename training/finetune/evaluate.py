"""Loss and test metrics of `train finetune`: DiceCE for training; for seg, Dice per class and
volume where a class predicted on a volume that lacks it counts as 0 (a miss) and a class absent
from both prediction and ground truth is not counted (excluded from that class's mean, the common
convention); ``dice_mean`` averages the classes that have a value. MONAI's ``ignore_empty`` figure
(a volume lacking the class is skipped whatever is predicted, so false positives there cost
nothing) sits beside it as ``dice_mean_ignore_empty`` / ``dice_ignore_empty``. cls: accuracy, AUC.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from sklearn.metrics import roc_auc_score
from torch import nn

from training.finetune.data import VolumeSet
from training.loop.precision import Precision


def seg_loss(batch_dice: bool = False) -> nn.Module:
    """Mean of Dice and cross-entropy on softmax outputs against integer label volumes (paper §4).

    ``batch_dice``: the Dice term is the Dice of the batch taken as one volume per class (MONAI's
    ``batch=True``, nnU-Net's "batch Dice") instead of the mean of per-volume Dice. For a small
    structure that many volumes lack (lesions), a volume without it gets a foreground Dice loss
    of ~1 whatever it predicts (only the background class's Dice and the cross-entropy speak
    against its false positives) and a volume with a few voxels of it a noisy one; pooled, every
    volume's voxels count in one Dice. Off by default (the paper's per-volume DiceCE); on the
    lesion benchmark it made no measurable difference (benchmarks/README.md, bench_downstream).
    """
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=batch_dice)


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def dice_per_class(pred: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Dice of one volume per foreground class (1..n-1) from integer maps ``pred`` and ``y``:
    ``(counted, ignore_empty)``. ``counted``: 2|P&G| / (|P| + |G|), 0 when the class is predicted
    on a volume that lacks it, NaN when both lack it. ``ignore_empty``: NaN whenever the volume
    lacks the class (MONAI's ``ignore_empty=True``)."""
    p, g = pred.reshape(-1).long(), y.reshape(-1).long()
    counted = np.full(n_classes - 1, np.nan)
    ignore = np.full(n_classes - 1, np.nan)
    for c in range(1, n_classes):
        pc, gc = p == c, g == c
        n_p, n_g = int(pc.sum()), int(gc.sum())
        if n_p + n_g == 0:
            continue
        d = 2.0 * int((pc & gc).sum()) / (n_p + n_g)
        counted[c - 1] = d
        if n_g:
            ignore[c - 1] = d
    return counted, ignore


def summarize_dice(per_volume: list[tuple[np.ndarray, np.ndarray]], classes: list[str]) -> dict[str, Any]:
    """Per-class means over volumes (NaN = not counted) and their mean, for both rules."""
    out: dict[str, Any] = {}
    for i, suffix in enumerate(("", "_ignore_empty")):
        per = np.stack([v[i] for v in per_volume]) if per_volume else np.full((0, len(classes) - 1), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class = np.nanmean(per, axis=0) if len(per) else np.full(len(classes) - 1, np.nan)
        dice = {name: _num(v) for name, v in zip(classes[1:], per_class)}
        present = [v for v in dice.values() if v is not None]
        out[f"dice_mean{suffix}"] = float(np.mean(present)) if present else None
        out[f"dice{suffix}"] = dice
    out["n_volumes_counted"] = {name: int(np.isfinite([v[0][j] for v in per_volume]).sum())
                                for j, name in enumerate(classes[1:])}
    return out


@torch.no_grad()
def evaluate_seg(net: nn.Module, data: VolumeSet, classes: list[str], device: torch.device,
                 precision: Precision) -> dict[str, Any]:
    """``{"dice_mean", "dice": {class: x}, "dice_mean_ignore_empty", "dice_ignore_empty",
    "n_volumes_counted": {class: n}, "n_volumes"}`` over ``data`` (background excluded; the rule
    in the module doc)."""
    was = net.training
    net.eval()
    per_volume = []
    for i in range(len(data)):
        x, y = data.load(i)
        with precision.autocast():
            logits = net(x[None].to(device))
        pred = logits.float().argmax(1)[0].cpu()
        per_volume.append(dice_per_class(pred, y[0], len(classes)))
    net.train(was)
    return {**summarize_dice(per_volume, classes), "n_volumes": len(data)}


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

