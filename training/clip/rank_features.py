"""`curate rank --features clip` / `--query`: frozen-CLIP image embeddings of the slices to rank,
and each slice's image-text similarity to a query.

Only what is missing is done: a slice's PNG is rendered when ``cache/png`` lacks it, and its
image is embedded when the embedding store of this CLIP's fingerprint lacks its
``image_sha256`` (the keys `train embed` uses, so both commands share one store and a rerun
embeds nothing). New embeddings are written back to the store as they are computed.
Every vector used is the store's float16 value, so a first run and a rerun rank alike.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from curation.slicing.render import render_slices
from curation.store.embed_store import read_table, store_dir, write_meta
from curation.store.layout import Workdir
from curation.store.manifest import read_manifest
from training.clip.embed import encode_images, store_in_blocks
from training.loop.distributed import resolve_device
from training.loop.errors import TrainingError
from training.models.clip_models import LoadedClip, load_clip

Progress = Callable[[str, int, int], None]


@dataclass
class RankFeatureStats:
    """What a run rendered and embedded (the CLI prints it)."""

    fingerprint: str = ""
    model: str = ""
    pngs_rendered: int = 0
    pngs_reused: int = 0
    images_computed: int = 0
    images_reused: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class ClipRankFeatures:
    """Frozen-CLIP features for `curate rank`; the model is loaded on first use.

    Args:
        workdir: the workdir (manifests, volumes, cache/png, embeddings).
        checkpoint: a `train clip` checkpoint (names its own model).
        device: "cuda", "cpu", ...; None picks CUDA when available.
        batch_size: images per forward pass.
        render_size: PNG side in pixels (512, as `curate caption` renders, shares its PNGs and
            so the embeddings `train embed` computed from a release).
        progress: ``progress(stage, done, total)`` for the "render" and "embed" stages.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        checkpoint: str | os.PathLike,
        device: str | None = None,
        batch_size: int = 64,
        render_size: int = 512,
        progress: Progress | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.checkpoint = Path(checkpoint)
        try:
            self.device = resolve_device(device)
        except RuntimeError as exc:  # torch's own message names the device types it knows
            raise ValueError(f"--device {device}: {(str(exc).splitlines() or [''])[0][:100]}") from None
        self.batch_size = max(1, int(batch_size))
        self.render_size = int(render_size)
        self.progress = progress
        self.stats = RankFeatureStats()
        self._clip: LoadedClip | None = None
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (slice ids, embeddings)

    @property
    def clip(self) -> LoadedClip:
        if self._clip is None:
            if not self.checkpoint.is_file():
                raise FileNotFoundError(f"{self.checkpoint}: no such CLIP checkpoint (run `train clip` first, or pass --clip)")
            try:
                clip = load_clip(self.checkpoint, device=self.device)
            except (FileNotFoundError, ValueError):
                raise
            except Exception as exc:  # a truncated or foreign file fails deep in torch/open_clip
                why = (str(exc).splitlines() or [""])[0][:100]
                raise TrainingError(f"{self.checkpoint}: not a readable CLIP checkpoint ({type(exc).__name__}: {why})") from exc
            clip.model.eval()
            self._clip = clip
            self.stats.fingerprint, self.stats.model = clip.fingerprint, clip.name
        return self._clip

    def _report(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)

    def _render(self, slices: pd.DataFrame) -> pd.DataFrame:
        """PNG path and sha256 per row, rendering only the PNGs the cache lacks."""
        volumes = read_manifest(Workdir(self.workdir).volumes_manifest)
        rels = [Workdir.png_relpath(v, p, int(i), self.render_size)
                for v, p, i in zip(slices["volume_id"], slices["plane"], slices["index"])]
        missing = sum(not (self.workdir / r).exists() for r in rels)
        self.stats.pngs_rendered += missing
        self.stats.pngs_reused += len(rels) - missing
        keep = volumes[volumes["volume_id"].isin(set(slices["volume_id"]))]
        parts = []
        groups = slices.groupby("volume_id", sort=True)
        for done, (_, rows) in enumerate(groups):
            parts.append(render_slices(self.workdir, rows, keep, size=self.render_size))
            self._report("render", done + 1, groups.ngroups)
        return pd.concat(parts).loc[slices.index] if parts else slices.assign(image_path=[], image_sha256=[])

    def image_embeddings(self, slices: pd.DataFrame) -> np.ndarray:
        """(n, dim) float32 L2-normalised image embeddings aligned with ``slices`` rows."""
        ids = slices["slice_id"].to_numpy()
        if self._last is not None and np.array_equal(self._last[0], ids):
            return self._last[1]
        t0 = time.perf_counter()
        clip = self.clip
        fp = clip.fingerprint
        rendered = self._render(slices)
        keys = rendered["image_sha256"].tolist()
        paths = dict(zip(keys, rendered["image_path"]))
        stored = read_table(self.workdir, fp, "image")
        todo = sorted(k for k in set(keys) if k not in stored)
        self.stats.images_computed += len(todo)
        self.stats.images_reused += len(set(keys)) - len(todo)
        if todo:
            stored.update(self._embed(todo, [str(self.workdir / paths[k]) for k in todo]))
        if todo or not (store_dir(self.workdir, fp) / "meta.json").exists():
            write_meta(self.workdir, fp, clip.name, str(self.checkpoint), int(clip.model_cfg["embed_dim"]))
        emb = np.stack([stored[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)
        self.stats.seconds += time.perf_counter() - t0
        self._last = (ids, emb)
        return emb

    def _embed(self, keys: list[str], paths: list[str]) -> dict[str, np.ndarray]:
        """Embed ``paths`` into the store (in blocks, see `training.clip.embed.store_in_blocks`); returns key -> float16."""
        clip = self.clip
        batches = encode_images(clip, paths, self.device, self.batch_size)
        return store_in_blocks(keys, batches, self.workdir, clip.fingerprint, "image", keep=True,
                               on_batch=lambda done: self._report("embed", done, len(keys)))

    @torch.no_grad()
    def text_embedding(self, text: str) -> np.ndarray:
        """The L2-normalised text embedding of ``text`` (float32, not stored: it may be sensitive)."""
        clip = self.clip
        emb = clip.model.encode_text(clip.tokenizer([text]).to(self.device), normalize=True)
        return emb[0].float().cpu().numpy()

    def query_scores(self, text: str) -> Callable[[pd.DataFrame], np.ndarray]:
        """``scores(slices)``: each slice's image-text cosine similarity to ``text``."""

        def scores(slices: pd.DataFrame) -> np.ndarray:
            img = self.image_embeddings(slices).astype(np.float64)
            txt = self.text_embedding(text).astype(np.float64)
            norms = np.linalg.norm(img, axis=1) * max(float(np.linalg.norm(txt)), 1e-12)
            return (img @ txt) / np.maximum(norms, 1e-12)

        return scores
