"""Held-out 3D retrieval for `train pretrain`: does a volume's projection at a slice position find
that slice's caption (``v2t``) and image (``v2i``), and does it need the volume to?

Two candidate sets, with the names of ``training.clip.retrieval`` (``{query}2{target}_R@{k}``):

- ``v2t_R@k`` / ``v2i_R@k``: candidates are the distinct captions (images) of the split's slices
  at the query's own (plane, index) position. The position is then no help: only the volume's
  content can pick the right one. Queries whose position has fewer than 2 candidates are left
  out (``v2t_n_queries`` counts the rest); ``v2t_chance@k`` is the mean of k / candidates, and
  ``v2t_prior@k`` the best a volume-blind guess can do (the k most frequent targets at each
  position): above chance when a position's captions are imbalanced (mostly "no finding").
- ``v2t_all_R@k`` / ``v2i_all_R@k``: candidates are all distinct captions (images) of the split;
  the plane-slice embedding alone can score high here (chance ``v2t_all_chance@k``).

Every measured key (``..._R@k``, ``..._median_rank``) comes again with two controls: ``_blank``
(an all-zero volume in place of the query's) and ``_shuffled`` (another held-out subject's volume,
a fixed derangement), e.g. ``v2t_R@1_blank``, ``v2t_all_R@1_shuffled``. When a same-position R@1
does not differ from a control (the 95% bootstrap interval of the difference over volumes covers
0), one log line says that retrieval does not depend on the volume. Counts: ``n_queries``,
``n_volumes``, ``n_texts``, ``n_images``.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from training.clip.retrieval import hit_probability
from training.models.align_model import AlignModel
from training.pretrain.data import VolumeSliceDataset, load_volume

log = logging.getLogger(__name__)

KS: tuple[int, ...] = (1, 5)
CONTROLS = ("blank", "shuffled")


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A permutation of range(n) without fixed points (one random cycle); identity for n < 2."""
    if n < 2:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def _queries(model: AlignModel, data: VolumeSliceDataset, device: torch.device, seed: int,
             autocast: Callable[[], AbstractContextManager] | None) -> dict[str, torch.Tensor]:
    """Normalised projections of every captioned slice of ``data`` (rows in ``concat(data.slices)``
    order) from the true volume, an all-zero one and another subject's."""
    ctx = autocast or nullcontext
    tokens = []
    for vi in range(len(data)):
        vol = load_volume(data.workdir, data.volume_paths[vi], data.img_size).unsqueeze(0).to(device)
        with ctx():
            tokens.append(model.encoder(vol).cpu())
    with ctx():
        blank = model.encoder(torch.zeros_like(vol)).cpu()
    perm = derangement(len(data), seed)
    sources = {"": lambda vi: tokens[vi], "blank": lambda vi: blank, "shuffled": lambda vi: tokens[perm[vi]]}
    if len(data) < 2:
        del sources["shuffled"]
    planes = data.rows["plane_index"].to_numpy().astype(np.int64)
    indices = data.rows["index"].to_numpy().astype(np.int64)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in sources}
    for vi in range(len(data)):
        rows = data.slices[vi]
        plane = torch.as_tensor(planes[rows], device=device)
        index = torch.as_tensor(indices[rows], device=device)
        for name, source in sources.items():
            tok = source(vi).to(device)
            for s in range(0, len(rows), 64):
                with ctx():
                    proj = model.head(tok.expand(len(rows[s:s + 64]), -1, -1), plane[s:s + 64], index[s:s + 64])
                out[name].append(F.normalize(proj.float(), dim=-1))
    return {name: torch.cat(q) for name, q in out.items()}


def _ranks(q: torch.Tensor, cand: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
           ks: tuple[int, ...]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per query: P(hit in top k) for each k (ties broken at random) and the rank (half the ties)."""
    sims = q @ cand.t()
    correct = sims.gather(1, target[:, None])
    above, same = sims > correct, sims == correct
    if mask is not None:
        above, same = above & mask, same & mask
    greater, tied = above.sum(1), same.sum(1) - 1
    ones = torch.ones_like(greater)
    hits = {k: hit_probability(greater, tied, ones, k).double() for k in ks}
    return hits, greater.double() + tied.double() / 2 + 1


def _position_prior(pos: np.ndarray, target: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    """Recall@k of the volume-blind guess: at each position, its k most frequent targets."""
    hits = {k: 0 for k in ks}
    for p in np.unique(pos):
        counts = np.sort(np.bincount(target[pos == p]))[::-1]
        for k in ks:
            hits[k] += int(counts[:k].sum())
    return {k: hits[k] / len(pos) if len(pos) else float("nan") for k in ks}


def _diff_interval(a: np.ndarray, b: np.ndarray, volume: np.ndarray, reps: int = 1000,
                   seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (resampling volumes) of mean(a) - mean(b) over paired queries."""
    vols, inv = np.unique(volume, return_inverse=True)
    sums = np.bincount(inv, weights=a - b, minlength=len(vols))
    counts = np.bincount(inv, minlength=len(vols)).astype(np.float64)
    pick = np.random.default_rng(seed).integers(len(vols), size=(reps, len(vols)))
    means = sums[pick].sum(1) / np.maximum(counts[pick].sum(1), 1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@torch.no_grad()
def evaluate_volumes(model: AlignModel, data: VolumeSliceDataset, device: torch.device, ks: tuple[int, ...] = KS,
                     autocast: Callable[[], AbstractContextManager] | None = None, seed: int = 0,
                     report: bool = True) -> dict[str, float]:
    """Same-position and all-slices 3D -> caption / slice image retrieval over every captioned
    slice of ``data``, each with the ``_blank`` and ``_shuffled`` controls (module docstring).
    The encoder runs once per volume; the head once per slice and source. ``report``: log the
    summary (chance levels, and whether the volume matters)."""
    was_training = model.training
    model.eval()
    try:
        queries = _queries(model, data, device, seed, autocast)
    finally:
        model.train(was_training)
    order = np.concatenate(data.slices)  # query i is row order[i]
    rows = data.rows.iloc[order]
    position = torch.as_tensor(rows["plane_index"].to_numpy().astype(np.int64) * 100_000 + rows["index"].to_numpy(),
                               device=device)
    out: dict[str, float] = {"n_queries": float(len(order)), "n_volumes": float(len(data))}
    hits_of: dict[str, dict[int, torch.Tensor]] = {}
    for direction, count, emb, keys in (("v2t", "n_texts", data.text_emb, data.rows["caption"]),
                                        ("v2i", "n_images", data.image_emb, data.rows["image_sha256"])):
        uniq, first, inverse = np.unique(keys.to_numpy().astype(str), return_index=True, return_inverse=True)
        cand = F.normalize(torch.from_numpy(emb[first].astype(np.float32)).to(device), dim=-1)
        target = torch.as_tensor(inverse[order], device=device)
        # Candidate c is at the query's position when some row at that position has key c.
        _, pos_id = torch.unique(position, return_inverse=True)
        at = torch.zeros(int(pos_id.max()) + 1, len(uniq), dtype=torch.bool, device=device)
        at[pos_id, target] = True
        mask = at[pos_id]
        n_cand = mask.sum(1)
        keep = n_cand >= 2
        out[count] = float(len(uniq))
        out[f"{direction}_n_queries"] = float(keep.sum().item())
        prior = _position_prior(pos_id[keep].cpu().numpy(), target[keep].cpu().numpy(), ks)
        for k in ks:
            out[f"{direction}_prior@{k}"] = prior[k]
            out[f"{direction}_chance@{k}"] = float((n_cand[keep].clamp(max=k) / n_cand[keep]).mean().item()) \
                if keep.any() else float("nan")
            out[f"{direction}_all_chance@{k}"] = min(k, len(uniq)) / len(uniq)
        for name, q in queries.items():
            suffix = f"_{name}" if name else ""
            for scope, m, sel in (("", mask, keep), ("_all", None, None)):
                hits, rank = _ranks(q, cand, target, m, ks)
                if sel is not None:
                    hits, rank = {k: h[sel] for k, h in hits.items()}, rank[sel]
                hits_of[f"{direction}{scope}{suffix}"] = hits
                if len(rank) == 0:
                    continue
                out[f"{direction}{scope}_median_rank{suffix}"] = float(rank.median().item())
                for k in ks:
                    out[f"{direction}{scope}_R@{k}{suffix}"] = float(hits[k].mean().item())
        volume = np.repeat(np.arange(len(data)), [len(s) for s in data.slices])
        hits_of[f"{direction}_volume"] = {0: torch.as_tensor(volume, device=device)[keep]}
    if report:
        for line in summary_lines(out, hits_of, ks[0], seed):
            (log.warning if line.startswith("retrieval does not depend") else log.info)("%s", line)
    return out


def summary_lines(out: dict[str, float], hits_of: dict[str, dict[int, torch.Tensor]], k: int,
                  seed: int = 0) -> list[str]:
    """The log lines of a retrieval result: each R@k beside its controls and chance, and one line
    when a same-position figure does not differ from a control (bootstrap over volumes)."""
    lines = []
    for direction in ("v2t", "v2i"):
        for scope, label in (("", "same position"), ("_all", "all slices")):
            key = f"{direction}{scope}_R@{k}"
            if key not in out:
                continue
            ctl = ", ".join(f"{c} {out[f'{key}_{c}']:.3f}" for c in CONTROLS if f"{key}_{c}" in out)
            prior = f", volume-blind prior {out[f'{direction}_prior@{k}']:.3f}" if not scope else ""
            lines.append(f"held-out {key} ({label}) {out[key]:.3f} ({ctl}; chance "
                         f"{out[f'{direction}{scope}_chance@{k}']:.3f}{prior})")
    same = []
    for direction in ("v2t", "v2i"):
        key = f"{direction}_R@{k}"
        if key not in out:
            continue
        volume = hits_of[f"{direction}_volume"][0].cpu().numpy()
        true = hits_of[direction][k].cpu().numpy()
        for c in CONTROLS:
            if f"{direction}_{c}" not in hits_of:
                continue
            lo, hi = _diff_interval(true, hits_of[f"{direction}_{c}"][k].cpu().numpy(), volume, seed=seed)
            if lo <= 0 <= hi:
                same.append(f"{key} {out[key]:.3f} vs {c} {out[f'{key}_{c}']:.3f} (difference 95% CI [{lo:+.3f}, {hi:+.3f}])")
    if same:
        lines.append("retrieval does not depend on the volume: " + "; ".join(same))
    return lines
