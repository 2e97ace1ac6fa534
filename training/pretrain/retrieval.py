"""Held-out 3D retrieval for `train pretrain`: does a volume's projection find its slice's caption
(``v2t``) and its slice image (``v2i``) among all of the split's?

Metric names follow ``training.clip.retrieval`` (``{query}2{target}_R@{k}``), with ``v`` for the
volume-plus-slice query: ``v2t_R@1``, ``v2t_chance@1`` (k / candidates), ``v2t_median_rank``,
and the counts ``n_queries``, ``n_volumes``, ``n_texts``, ``n_images``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from training.clip.retrieval import hit_probability
from training.models.align_model import AlignModel
from training.pretrain.data import VolumeSliceDataset, load_volume

KS: tuple[int, ...] = (1, 5)


@torch.no_grad()
def evaluate_volumes(model: AlignModel, data: VolumeSliceDataset, device: torch.device, ks: tuple[int, ...] = KS,
                     autocast: Callable[[], AbstractContextManager] | None = None) -> dict[str, float]:
    """3D -> caption and 3D -> slice image retrieval over every captioned slice of ``data``.

    Each (volume, plane, index) query is ranked against all distinct captions (images) of the
    split; recall@k is the share of queries whose own caption ranks in the top k, next to the
    chance level k / candidates. The encoder runs once per volume; the head once per slice.
    """
    was_training = model.training
    model.eval()
    queries = []
    for vi in range(len(data)):
        rows = data.slices[vi]
        vol = load_volume(data.workdir, data.volume_paths[vi], data.img_size).unsqueeze(0).to(device)
        plane = torch.as_tensor(data.rows["plane_index"].to_numpy()[rows].astype(np.int64), device=device)
        index = torch.as_tensor(data.rows["index"].to_numpy()[rows].astype(np.int64), device=device)
        with autocast() if autocast else nullcontext():
            tokens = model.encoder(vol)
            for s in range(0, len(rows), 64):
                proj = model.head(tokens.expand(len(rows[s:s + 64]), -1, -1), plane[s:s + 64], index[s:s + 64])
                queries.append(F.normalize(proj.float(), dim=-1))
    model.train(was_training)
    q = torch.cat(queries)
    order = np.concatenate(data.slices)  # query i is row order[i]
    out: dict[str, float] = {"n_queries": float(len(q)), "n_volumes": float(len(data))}
    for direction, count, emb, keys in (("v2t", "n_texts", data.text_emb, data.rows["caption"]),
                                        ("v2i", "n_images", data.image_emb, data.rows["image_sha256"])):
        uniq, first, inverse = np.unique(keys.to_numpy().astype(str), return_index=True, return_inverse=True)
        cand = F.normalize(torch.from_numpy(emb[first].astype(np.float32)).to(device), dim=-1)
        sims = q @ cand.t()
        target = torch.as_tensor(inverse[order], device=device)
        correct = sims.gather(1, target[:, None])
        greater = (sims > correct).sum(1)
        tied = (sims == correct).sum(1) - 1  # other candidates scored exactly as the right one
        n = len(uniq)
        out[count] = float(n)
        # Ties broken at random, never in the model's favour: a constant model scores chance.
        out[f"{direction}_median_rank"] = float((greater.float() + tied.float() / 2).median().item() + 1)
        ones = torch.ones_like(greater)
        for k in ks:
            out[f"{direction}_R@{k}"] = float(hit_probability(greater, tied, ones, k).mean().item())
            out[f"{direction}_chance@{k}"] = min(k, n) / n
    return out
