"""Image<->text retrieval recall@k, with duplicate images and captions handled.

Slices often share a caption (and blank slices share an image), so pairs are first reduced to
unique images and unique captions with a positives matrix: an image's hit is any of its
captions in the top k, a caption's hit is any of its images in the top k. With unique pairs
this is the usual COCO/Flickr recall.

Metric names, the one scheme of both trainers (metrics.jsonl, log lines, `train` summaries):
``{query}2{target}_R@{k}`` -- ``i2t_R@1`` / ``t2i_R@1`` here, ``v2t_R@1`` / ``v2i_R@1`` for 3D
volume -> caption / slice image (``training.pretrain.retrieval``, which adds same-position
candidates and ``_blank`` / ``_shuffled`` controls) -- plus ``mean_R@1`` and the counts
``n_images``, ``n_texts``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.clip.data import ImageFiles

KS: tuple[int, ...] = (1, 5, 10)


def dedupe_pairs(image_keys: Sequence[str], captions: Sequence[str]) -> tuple[list[int], list[str], np.ndarray]:
    """Reduce pairs to unique images and captions.

    Returns:
        (index of the first pair of each unique image, unique captions, positives[n_img, n_txt]).
    """
    img_index: dict[str, int] = {}
    txt_index: dict[str, int] = {}
    first_pair: list[int] = []
    edges: list[tuple[int, int]] = []
    for pair, (key, cap) in enumerate(zip(image_keys, captions)):
        if key not in img_index:
            img_index[key] = len(img_index)
            first_pair.append(pair)
        txt_index.setdefault(cap, len(txt_index))
        edges.append((img_index[key], txt_index[cap]))
    positives = np.zeros((len(img_index), len(txt_index)), dtype=bool)
    for i, t in edges:
        positives[i, t] = True
    return first_pair, list(txt_index), positives


def hit_probability(greater: torch.Tensor, tied_neg: torch.Tensor, tied_pos: torch.Tensor, k: int) -> torch.Tensor:
    """P(a positive ranks in the top ``k``) when ties are broken at random, per query.

    ``greater``: negatives scored above the best positive; ``tied_neg`` / ``tied_pos``:
    negatives / positives scored equal to it (``tied_pos`` >= 1). Ties are not counted in the
    model's favour: a constant score gives exactly chance (k / candidates), not 1.0.
    """
    slots = (k - greater).clamp(min=0)  # places left in the top k for the tied group
    miss = torch.ones_like(greater, dtype=torch.float64)
    t, m = tied_neg.double(), tied_pos.double()
    for i in range(k):  # P(the first `slots` of the tied group are all negatives)
        step = torch.where(t - i > 0, (t - i) / (t + m - i).clamp(min=1), torch.zeros_like(t))
        miss = torch.where(slots > i, miss * step, miss)
    return (1 - miss).float()


def recall_at_k(
    image_emb: torch.Tensor, text_emb: torch.Tensor, positives: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, float]:
    """``i2t_R@k`` and ``t2i_R@k`` for L2-normalised embeddings and a positives matrix; ties are
    broken at random (``hit_probability``), so a constant model scores chance."""
    sim = (image_emb.float() @ text_emb.float().T).cpu()
    pos = torch.from_numpy(positives)
    out: dict[str, float] = {}
    for direction, s, p in (("i2t", sim, pos), ("t2i", sim.T, pos.T)):
        has = p.any(1)
        best = torch.where(p, s, torch.full_like(s, -torch.inf)).max(1).values[:, None] if len(s) else s[:, :1]
        greater = ((s > best) & ~p).sum(1)
        tied_neg = ((s == best) & ~p).sum(1)
        tied_pos = ((s == best) & p).sum(1).clamp(min=1)
        for k in ks:
            hit = hit_probability(greater, tied_neg, tied_pos, k) * has
            out[f"{direction}_R@{k}"] = float(hit.mean()) if len(hit) else float("nan")
    out["mean_R@1"] = (out["i2t_R@1"] + out["t2i_R@1"]) / 2
    return out


@torch.no_grad()
def embed_images(
    model: torch.nn.Module, paths: list[str], transform: Callable, device: torch.device,
    batch_size: int = 64, workers: int = 0, autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """L2-normalised float32 image embeddings (on CPU) in ``paths`` order."""
    loader = DataLoader(ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers)
    out = []
    for pixels in loader:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            emb = model.encode_image(pixels.to(device, non_blocking=True), normalize=True)
        out.append(emb.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module, texts: list[str], tokenizer: Callable, device: torch.device,
    batch_size: int = 256, autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """L2-normalised float32 text embeddings (on CPU) in ``texts`` order."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            emb = model.encode_text(tokens, normalize=True)
        out.append(emb.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate(
    model: torch.nn.Module, image_paths: list[str], image_keys: list[str], captions: list[str],
    transform: Callable, tokenizer: Callable, device: torch.device, batch_size: int = 64,
    workers: int = 0, autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Retrieval recall@1/5/10 both ways over the given (image, caption) pairs."""
    was_training = model.training
    model.eval()
    try:
        first, texts, positives = dedupe_pairs(image_keys, captions)
        img = embed_images(model, [image_paths[i] for i in first], transform, device, batch_size, workers, autocast_dtype)
        txt = embed_texts(model, texts, tokenizer, device, autocast_dtype=autocast_dtype)
        metrics = recall_at_k(img, txt, positives)
        metrics.update(n_images=len(first), n_texts=len(texts))
        return metrics
    finally:
        model.train(was_training)
