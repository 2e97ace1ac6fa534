"""Release manifest -> (image, caption) pairs for CLIP fine-tuning and embedding.

Images are the slice PNGs named by ``image_path`` (relative to the workdir); captions come
from the ``caption`` column; refused or empty captions are skipped. Augmentation is seeded
per (seed, epoch, sample), so a run resumed mid-epoch, or run with another number of
workers, sees exactly the same crops as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from curation.store.manifest import read_manifest, resolve_manifest, usable_caption_rows


def read_pairs(workdir: str | os.PathLike, manifest: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """Captioned, non-refused rows of the manifest (optionally one split), in manifest order.

    Returns:
        DataFrame with at least slice_id, image_path, image_sha256, caption, split.
    """
    df = read_manifest(resolve_manifest(workdir, manifest))
    missing = {"image_path", "image_sha256", "caption", "split"} - set(df.columns)
    if missing:
        raise ValueError(f"{manifest}: manifest lacks columns {sorted(missing)} (a release manifest is needed)")
    keep = usable_caption_rows(df)
    if split is not None:
        keep &= df["split"] == split
    return df[keep].reset_index(drop=True)


log = logging.getLogger(__name__)

MAX_CHECKED = 20_000  # distinct captions measured for the truncation warning (a sample beyond that)


def caption_token_count(tokenizer: Callable, text: str) -> int | None:
    """Tokens ``text`` takes in the model's context, start and end included, before truncation;
    None for a tokenizer this cannot ask (then nothing is said)."""
    encode = getattr(tokenizer, "encode", None)  # open_clip's SimpleTokenizer (CLIP BPE)
    if callable(encode):
        return len(encode(text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer (e.g. BiomedCLIP's BERT)
    if inner is not None and callable(inner):
        return len(inner(text)["input_ids"])
    return None


def warn_cut_captions(tokenizer: Callable, captions: "pd.Series", where: str) -> tuple[int, int] | None:
    """Warn when captions are longer than the text encoder's context: open_clip cuts them there,
    so the model never reads their ends (GPT-4V-class captions often pass CLIP's 77 tokens).
    Returns (cut, checked) over distinct captions, or None when the tokenizer cannot say."""
    context = getattr(tokenizer, "context_length", None)
    distinct = pd.Series(captions).dropna().astype(str).drop_duplicates()
    if not context or distinct.empty:
        return None
    if len(distinct) > MAX_CHECKED:
        distinct = distinct.sample(MAX_CHECKED, random_state=0)
    counts = [caption_token_count(tokenizer, t) for t in distinct]
    if any(c is None for c in counts):
        return None
    cut = sum(c > context for c in counts)
    if cut:
        log.warning("%d of %d distinct %s captions (%.0f%%) are longer than the model's %d-token context and "
                    "are cut there (median %d tokens): their ends are never read; ask for shorter captions "
                    "(curate caption --prompt-file) or use a model with a longer context",
                    cut, len(counts), where, 100 * cut / len(counts), context, int(pd.Series(counts).median()))
    return cut, len(counts)


def read_rgb(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class ClipPairs(Dataset):
    """(image tensor, token ids, image id) triples; index with an int or with ``(epoch, int)``.

    The image id numbers the distinct ``image_sha256`` of the pairs, so the loss can treat two
    augmented views of one image as the same image (a positive, not a negative).

    The ``(epoch, i)`` form, produced by :class:`EpochSampler`, seeds the random augmentation
    with (seed, epoch, i), which makes training reproducible across resume and worker counts.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        pairs: pd.DataFrame,
        transform: Callable,
        tokenizer: Callable,
        seed: int = 0,
    ) -> None:
        self.paths = [str(Path(workdir) / p) for p in pairs["image_path"]]
        self.captions = [str(c) for c in pairs["caption"]]
        keys = pairs["image_sha256"] if "image_sha256" in pairs.columns else pairs["image_path"]
        ids: dict[str, int] = {}
        self.image_ids = [ids.setdefault(str(k), len(ids)) for k in keys]
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, i = item if isinstance(item, tuple) else (None, item)
        image = read_rgb(self.paths[i])
        if epoch is None:
            pixels = self.transform(image)
        else:
            # fork_rng keeps the caller's global RNG untouched (workers=0 runs in the main process).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
                pixels = self.transform(image)
        tokens = self.tokenizer([self.captions[i]])[0]
        return pixels, tokens, torch.tensor(self.image_ids[i], dtype=torch.long)


class ImageFiles(Dataset):
    """Preprocessed images for embedding/evaluation (no augmentation)."""

    def __init__(self, paths: list[str], transform: Callable) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(read_rgb(self.paths[i]))


class EpochSampler(Sampler):
    """A seeded permutation per epoch, yielding ``(epoch, index)``; ``skip`` drops the first
    indices (the samples an interrupted run already trained on this epoch)."""

    def __init__(self, n: int, seed: int, epoch: int, skip: int = 0) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for i in order[self.skip:]:
            yield self.epoch, i

    def __len__(self) -> int:
        return max(self.n - self.skip, 0)
