"""Slice descriptors for the voter: a cheap built-in one (thumbnail + histogram) and its PCA."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    return x / np.maximum(norms, 1e-12)[:, None]


def _block_mean(x: np.ndarray, size: int) -> np.ndarray:
    """Mean over a ``size`` x ``size`` grid of near-equal blocks of a (batch, H, W) array."""
    for axis in (1, 2):
        n = x.shape[axis]
        if n >= size:
            starts = (np.arange(size) * n) // size
            counts = np.diff(np.append(starts, n)).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = size
            x = np.add.reduceat(x, starts, axis=axis) / counts.reshape(shape)
        else:  # smaller than the thumbnail: nearest-neighbour upsampling
            x = np.take(x, (np.arange(size) * n) // size, axis=axis)
    return x


def builtin_features(
    slices: np.ndarray, thumb: int = 16, bins: int = 32, fg_threshold: float = 0.01
) -> np.ndarray:
    """Cheap per-slice descriptor: block-mean thumbnail + foreground intensity histogram.

    Args:
        slices: (batch, H, W) or (H, W) intensities in [0, 1] (float16 is fine).
        thumb: thumbnail side; ``thumb * thumb`` values, divided by ``thumb`` so their norm <= 1.
        bins: histogram bins over [0, 1] of pixels above ``fg_threshold``, normalised to sum 1
            and square-rooted (Hellinger embedding, norm 1; all zeros for an empty slice).

    Returns:
        float32 array (batch, thumb * thumb + bins).
    """
    x = np.asarray(slices)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected (batch, H, W) slices, got shape {x.shape}")
    out = np.empty((len(x), thumb * thumb + bins), dtype=np.float32)
    for s in range(0, len(x), 256):  # bounded temporaries for large batches
        chunk = np.clip(x[s : s + 256].astype(np.float32), 0.0, 1.0)
        b = len(chunk)
        out[s : s + b, : thumb * thumb] = _block_mean(chunk, thumb).reshape(b, -1) / thumb
        fg = chunk > fg_threshold
        bin_of = np.minimum((chunk * bins).astype(np.int32), bins - 1)
        bin_of += (np.arange(b, dtype=np.int32) * bins)[:, None, None]
        hist = np.bincount(bin_of[fg], minlength=b * bins).reshape(b, bins).astype(np.float32)
        hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1.0)
        out[s : s + b, thumb * thumb :] = np.sqrt(hist)
    return out


def reduce_features(
    feats: np.ndarray, dim: int = 32, seed: int = 0, max_fit: int = 50_000, block: int = 65_536
) -> np.ndarray:
    """PCA to ``dim`` dimensions, L2-normalised rows (float32).

    The PCA is fitted on a seeded subsample of at most ``max_fit`` rows, so fitting costs the
    same for 600k slices as for 50k; projecting runs in row blocks. Component signs are fixed
    (largest loading positive) so the output is deterministic.
    """
    feats = np.asarray(feats)
    n, d = feats.shape
    dim = max(1, min(dim, d, n))
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    fit = np.sort(rng.choice(n, size=max_fit, replace=False)) if n > max_fit else slice(None)
    sample = feats[fit].astype(np.float64)
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    comps = vt[:dim]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    comps = (comps * np.where(signs == 0, 1.0, signs)[:, None]).astype(np.float32)
    out = np.zeros((n, dim), dtype=np.float32)
    mean32 = mean.astype(np.float32)
    for s in range(0, n, block):
        chunk = feats[s : s + block].astype(np.float32) - mean32
        out[s : s + block, : len(comps)] = chunk @ comps.T
    return l2_normalize(out)
