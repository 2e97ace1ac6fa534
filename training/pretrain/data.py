"""Data for `train pretrain`: one item per volume, one captioned slice of it sampled per epoch.

Each item is the whole preprocessed volume plus the plane/index of one of its captioned slices
and that slice's cached CLIP image and caption embeddings (no CLIP forward here, ever). Which
slice a volume contributes in an epoch is a pure function of (seed, epoch, volume), and the
sampler can start mid-epoch, so a resumed run sees exactly the batches an uninterrupted run
would have seen, with any number of DataLoader workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from curation.store.embed_store import load_embeddings
from curation.store.manifest import read_manifest, usable_caption_rows
from training.loop.errors import input_errors

REQUIRED_COLUMNS = ("slice_id", "volume_id", "plane_index", "index", "image_path", "image_sha256", "caption",
                    "split", "volume_path", "grid_size")


def captioned_rows(manifest_path: str | Path, split: str | tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Rows of ``split`` (one name or several) with a caption that was not refused, in a stable
    order (volume, slice)."""
    df = read_manifest(manifest_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{manifest_path}: not a release manifest (missing columns {missing})")
    splits = [split] if isinstance(split, str) else list(split)
    keep = df["split"].isin(splits) & usable_caption_rows(df)
    rows = df[keep].sort_values(["volume_id", "slice_id"], kind="stable").reset_index(drop=True)
    return rows


def grid_of(rows: pd.DataFrame) -> int:
    """The single grid size of ``rows`` (the PSAT slice-position table has one length)."""
    sizes = sorted({int(g) for g in rows["grid_size"]})
    if len(sizes) != 1:
        raise ValueError(f"manifest mixes grid sizes {sizes}; curate all volumes with one --grid")
    return sizes[0]


def load_volume(workdir: str | Path, volume_path: str, size: int | None = None) -> torch.Tensor:
    """(1, S, S, S) float32 from a (G, G, G) .npy; trilinearly resized when ``size`` != G."""
    arr = np.load(Path(workdir) / volume_path, mmap_mode="r")
    vol = torch.from_numpy(np.asarray(arr, dtype=np.float32)).unsqueeze(0)
    if size is not None and size != vol.shape[-1]:
        vol = F.interpolate(vol.unsqueeze(0), size=(size,) * 3, mode="trilinear", align_corners=False)[0]
    return vol


def load_split(workdir: str | Path, manifest: Path, split: str | tuple[str, ...] | list[str],
               fingerprint: str | None, seed: int = 0,
               img_size: int | None = None) -> tuple[VolumeSliceDataset, str] | None:
    """The dataset of ``split`` with its cached CLIP embeddings and their fingerprint (None = the
    latest store); None when the split has no usable rows. TrainingError when embeddings are missing."""
    rows = captioned_rows(manifest, split)
    if rows.empty:
        return None
    with input_errors(f"{split if isinstance(split, str) else '+'.join(split)} split: "):
        image, text, fp = load_embeddings(workdir, rows, fingerprint)
    return VolumeSliceDataset(workdir, rows, image, text, seed=seed, img_size=img_size), fp


class VolumeSliceDataset(Dataset):
    """Item ``(volume_idx, epoch)`` -> dict(volume, plane, index, image, text, row).

    Args:
        workdir: the workdir that ``volume_path`` is relative to.
        rows: captioned rows of one split (see ``captioned_rows``).
        image_emb, text_emb: (len(rows), D) cached CLIP embeddings aligned with ``rows``.
        seed: base seed of the slice sampling.
        img_size: encoder input side; None keeps the manifest grid. The slice index stays on
            the manifest grid either way (it addresses the PSAT position table).
    """

    def __init__(self, workdir: str | Path, rows: pd.DataFrame, image_emb: np.ndarray,
                 text_emb: np.ndarray, seed: int = 0, img_size: int | None = None):
        if len(rows) != len(image_emb) or len(rows) != len(text_emb):
            raise ValueError("embeddings are not aligned with the manifest rows")
        self.workdir = Path(workdir)
        self.rows = rows
        self.image_emb = image_emb
        self.text_emb = text_emb
        self.seed = seed
        self.img_size = img_size
        groups = rows.groupby("volume_id", sort=True).indices
        self.volume_ids = list(groups)
        self.slices = [np.sort(groups[v]) for v in self.volume_ids]
        self.volume_paths = [rows["volume_path"].iloc[s[0]] for s in self.slices]

    def __len__(self) -> int:
        return len(self.volume_ids)

    def sample_row(self, volume_idx: int, epoch: int) -> int:
        """Row (position in ``rows``) of the slice volume ``volume_idx`` contributes in ``epoch``."""
        rng = np.random.default_rng((self.seed, epoch, volume_idx))
        choices = self.slices[volume_idx]
        return int(choices[rng.integers(len(choices))])

    def item(self, row: int, volume: torch.Tensor | None = None) -> dict[str, Any]:
        r = self.rows.iloc[row]
        if volume is None:
            volume = load_volume(self.workdir, r["volume_path"], self.img_size)
        return {
            "volume": volume,
            "plane": torch.tensor(int(r["plane_index"]), dtype=torch.long),
            "index": torch.tensor(int(r["index"]), dtype=torch.long),
            "image": torch.from_numpy(self.image_emb[row].astype(np.float32)),
            "text": torch.from_numpy(self.text_emb[row].astype(np.float32)),
            "row": torch.tensor(row, dtype=torch.long),
        }

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        volume_idx, epoch = key if isinstance(key, tuple) else (key, 0)
        return self.item(self.sample_row(volume_idx, epoch))


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, drop_last) that yields ``(index, epoch)`` and can
    skip the first ``skip`` samples of this rank's epoch (resume mid-epoch without loading them).

    Works without torch.distributed too: pass ``num_replicas=1, rank=0``.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(super().__iter__())[self.skip:]
        return iter([(i, self.epoch) for i in order])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)
