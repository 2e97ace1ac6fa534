"""Data for `train pretrain`: items are captioned slices (manifest rows), batches are planned per
optimizer step.

Each item is the whole preprocessed volume plus the plane/index of one of its captioned slices
and that slice's cached CLIP image and caption embeddings (no CLIP forward here, ever).
``StepBatchSampler`` plans the rows of every optimizer step as a pure function of (seed, step):

- ``matched`` (default): one (plane, index) position per step, drawn with probability
  proportional to the number of volumes that have a captioned slice there, and up to the global
  batch of those volumes; every micro-batch and every rank gets rows at that position. The
  plane-slice embedding then cannot tell the candidates apart: only the volume's content can.
- ``random``: volumes in a per-epoch shuffled order, each with a random captioned slice of its own
  (the paper's sampling; kept as an ablation).

A resumed run starts the sampler at its step and sees exactly the batches an uninterrupted run
would have seen, with any number of DataLoader workers and on every rank without communication.
No contrastive batch holds a single sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

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
    vol = torch.from_numpy(np.array(arr, dtype=np.float32)).unsqueeze(0)
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


POSITION_SAMPLING = ("matched", "random")


class VolumeSliceDataset(Dataset):
    """Item ``row`` (a position in ``rows``) -> dict(volume, plane, index, image, text, row);
    item ``(volume_idx, epoch)`` -> the item of the slice that volume contributes in that epoch
    under random sampling (``sample_row``).

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
        if isinstance(key, tuple):
            return self.item(self.sample_row(*key))
        return self.item(int(key))

    def positions(self) -> dict[tuple[int, int], np.ndarray]:
        """(plane, index) -> the rows there, one per volume that has a captioned slice there."""
        key = self.rows["plane_index"].to_numpy().astype(np.int64) * 100_000 + self.rows["index"].to_numpy()
        vol = self.rows["volume_id"].to_numpy()
        out: dict[tuple[int, int], list[int]] = {}
        seen: set[tuple[int, str]] = set()
        for r in range(len(self.rows)):
            if (key[r], vol[r]) not in seen:
                seen.add((key[r], vol[r]))
                out.setdefault((int(key[r] // 100_000), int(key[r] % 100_000)), []).append(r)
        return {p: np.asarray(rs, dtype=np.int64) for p, rs in sorted(out.items())}


class StepBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches (lists of rows), ``accum`` per optimizer step, from step
    ``start`` on (set it to resume): a pure function of (seed, step), the same on every rank.

    The global batch of a step is ``batch_size * accum * world`` rows (matched: fewer when fewer
    volumes have a slice at the drawn position, always the same number per micro-batch and rank,
    and at least 2); micro-batch j of rank r is its slice ``[(j * world + r) * b, ... + b)``.

    Args:
        data: the training dataset.
        batch_size, accum, rank, world: as the run's.
        seed: the run's seed.
        mode: ``matched`` or ``random`` (see the module docstring).
    """

    def __init__(self, data: VolumeSliceDataset, batch_size: int, accum: int, rank: int, world: int,
                 seed: int = 0, mode: str = "matched"):
        if mode not in POSITION_SAMPLING:
            raise ValueError(f"--position-sampling {mode}: choose one of {', '.join(POSITION_SAMPLING)}")
        self.data, self.batch_size, self.accum, self.rank, self.world = data, batch_size, accum, rank, world
        self.seed, self.mode = seed, mode
        self.parts = accum * world
        self.global_batch = batch_size * self.parts
        if self.global_batch < 2:
            raise ValueError(f"--batch-size {batch_size} x --accum-freq {accum} x {world} rank(s) is a contrastive "
                             "batch of one sample (InfoNCE is then 0 with no gradient): use at least 2")
        # Steps per epoch: one pass over the volumes (nominal under matched sampling).
        self.per_epoch = len(data) // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(f"{len(data)} train volumes cannot fill one step of --batch-size {batch_size} x "
                             f"--accum-freq {accum} x {world} rank(s)")
        positions = data.positions()
        need = max(2, self.parts)
        self.positions = [(p, rows) for p, rows in positions.items() if len(rows) >= need]
        if mode == "matched" and not self.positions:
            most = max((len(r) for r in positions.values()), default=0)
            raise ValueError(f"--position-sampling matched: no (plane, index) position has a captioned slice in "
                             f"{need} or more train volumes (at most {most}); use --position-sampling random")
        counts = np.array([len(rows) for _, rows in self.positions], dtype=np.float64)
        self.weights = counts / counts.sum() if len(counts) else counts
        self.start = 0

    def step_rows(self, step: int) -> list[int]:
        """The rows of (0-based) ``step``'s global batch, in micro-batch-then-rank order."""
        if self.mode == "random":
            epoch, within = divmod(step, self.per_epoch)
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.data))
            vols = order[within * self.global_batch:(within + 1) * self.global_batch]
            return [self.data.sample_row(int(v), epoch) for v in vols]
        rng = np.random.default_rng((self.seed, step, 1))
        _, rows = self.positions[int(rng.choice(len(self.positions), p=self.weights))]
        b = min(len(rows), self.global_batch) // self.parts
        return [int(r) for r in rng.choice(rows, size=b * self.parts, replace=False)]

    def plan(self, step: int) -> list[list[int]]:
        """This rank's ``accum`` micro-batches of ``step``."""
        rows = self.step_rows(step)
        b = len(rows) // self.parts
        return [rows[(j * self.world + self.rank) * b:(j * self.world + self.rank + 1) * b] for j in range(self.accum)]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield from self.plan(step)
            step += 1
