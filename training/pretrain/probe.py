"""What did the encoder learn? The between-volume share of its token variance, beside a fresh init's.

For volumes v with tokens x[v, n] (N tokens of C channels each), the share is

    sum_c var_v(mean_n x[v, n, c])  /  sum_c var_{v,n}(x[v, n, c])

the variance of the per-volume mean token over the total token variance (population variances;
the rest is within-volume variance, so the share is in [0, 1]). An encoder whose tokens no longer
depend on the volume (it collapsed: the head solves the objective without it) has a share near 0.
Beside it, ``between_volume_share_per_token``: the same with the variance across volumes taken
at each token position (``sum_c mean_n var_v(x[v, n, c])`` over the total), which also counts
volume differences that average out over the tokens.
The fresh init is built with the run's seed and encoder config, so it is the run's step-0 encoder.
A share under half the init's counts as collapsed and is logged as a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from training.models.encoders import EncoderConfig, build_encoder_from_config
from training.pretrain.data import load_volume

log = logging.getLogger(__name__)

MAX_VOLUMES = 32  # the probe's volumes (the first ones, in a stable order)


@torch.no_grad()
def token_variance_shares(encoder: nn.Module, workdir: str | Path, volume_paths: Sequence[str],
                          img_size: int | None, device: torch.device) -> tuple[float, float]:
    """(between-volume share, per-token-position share) of ``encoder``'s token variance over
    ``volume_paths`` (eval mode); NaN for fewer than 2 volumes."""
    was = encoder.training
    encoder.eval()
    means, pos_sum, pos_sq = [], 0.0, 0.0
    try:
        for path in volume_paths:
            vol = load_volume(workdir, path, img_size).unsqueeze(0).to(device)
            tok = encoder(vol)[0].double().cpu()  # (N, C)
            means.append(tok.mean(0))
            pos_sum = pos_sum + tok
            pos_sq = pos_sq + tok ** 2
    finally:
        encoder.train(was)
    if len(means) < 2:
        return float("nan"), float("nan")
    v = len(means)
    per_pos = (pos_sq / v - (pos_sum / v) ** 2).clamp(min=0)  # (N, C): variance across volumes
    mu = pos_sum.mean(0) / v
    total = (pos_sq.mean(0) / v - mu ** 2).clamp(min=0).sum()
    if not total > 0:
        return float("nan"), float("nan")
    between = torch.stack(means).var(0, unbiased=False).sum()
    return float(between / total), float(per_pos.mean(0).sum() / total)


def token_variance_share(encoder: nn.Module, workdir: str | Path, volume_paths: Sequence[str],
                         img_size: int | None, device: torch.device) -> float:
    """The between-volume share of ``encoder``'s token variance over ``volume_paths`` (eval mode)."""
    return token_variance_shares(encoder, workdir, volume_paths, img_size, device)[0]


def probe_encoder(encoder: nn.Module, config: EncoderConfig, seed: int, workdir: str | Path,
                  volume_paths: Sequence[str], device: torch.device, split: str = "") -> dict[str, Any]:
    """The trained ``encoder``'s share and a fresh init's (seed ``seed``, same ``config``) over up
    to ``MAX_VOLUMES`` of ``volume_paths``; logs both and warns when the encoder collapsed.

    Returns ``between_volume_share``, ``between_volume_share_init``, ``collapsed`` (share under
    half the init's), ``n_volumes``, ``split``.
    """
    paths = list(dict.fromkeys(volume_paths))[:MAX_VOLUMES]
    size = getattr(config, "img_size", None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        fresh = build_encoder_from_config(config).to(device)
    init, init_tok = token_variance_shares(fresh, workdir, paths, size, device)
    del fresh
    share, share_tok = token_variance_shares(encoder, workdir, paths, size, device)
    collapsed = bool(np.isfinite(share) and np.isfinite(init) and share < 0.5 * init)
    where = f" over {len(paths)} {split + ' ' if split else ''}volumes"
    # Three significant digits: a CNN's share can be 1e-4 and still halve.
    line = (f"between-volume share of token variance{where}: {share:.3g} (fresh init {init:.3g}; per token "
            f"position {share_tok:.3g}, init {init_tok:.3g})")
    if collapsed:
        log.warning("encoder collapsed: %s, under half the init's: its tokens hardly depend on the volume", line)
    else:
        log.info("%s", line)
    return {"between_volume_share": share, "between_volume_share_init": init, "collapsed": collapsed,
            "between_volume_share_per_token": share_tok, "between_volume_share_per_token_init": init_tok,
            "n_volumes": len(paths), "split": split}
