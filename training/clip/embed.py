"""`train embed`: frozen-CLIP embeddings of every slice PNG and caption, computed once.

Images are keyed by ``image_sha256``, captions by ``text_key(caption)``, and both live under
the CLIP fingerprint (embed_store.py), so a rerun embeds only keys the store lacks: new or
changed slices and captions; a different checkpoint is a new fingerprint and starts over.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from curation.store.embed_store import store_dir, text_key, write_meta, write_table
from curation.store.layout import Workdir
from curation.store.manifest import read_manifest, resolve_manifest, usable_caption_rows
from training.clip.data import ImageFiles
from training.loop.distributed import resolve_device
from training.loop.errors import input_errors
from training.loop.precision import resolve_precision
from training.models.clip_models import LoadedClip, load_clip

log = logging.getLogger(__name__)

FLUSH_ROWS = 16384  # rows per store write: bounds lost work on a crash, keeps rewrites rare


@dataclass
class EmbedSummary:
    fingerprint: str
    model: str
    checkpoint: str
    dim: int
    images_computed: int
    images_reused: int
    texts_computed: int
    texts_reused: int
    seconds: float

    @property
    def computed(self) -> int:
        return self.images_computed + self.texts_computed

    @property
    def reused(self) -> int:
        return self.images_reused + self.texts_reused


def _stored_keys(workdir: Path, fingerprint: str, kind: str) -> set[str]:
    path = store_dir(workdir, fingerprint) / f"{kind}.parquet"
    return set(pq.read_table(path, columns=["key"]).column("key").to_pylist()) if path.exists() else set()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


@torch.no_grad()
def encode_images(clip: LoadedClip, paths: list[str], device: torch.device, batch_size: int,
                  workers: int = 0) -> Iterator[np.ndarray]:
    """L2-normalised image embeddings (float32) of the PNGs at ``paths``, batch by batch, with the
    frozen CLIP (fp16 autocast on CUDA, fp32 elsewhere)."""
    precision = resolve_precision(None, device)
    loader = DataLoader(ImageFiles(paths, clip.preprocess_val), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    for pixels in loader:
        with precision.autocast():
            emb = clip.model.encode_image(pixels.to(device, non_blocking=True), normalize=True)
        yield emb.float().cpu().numpy()


def store_in_blocks(
    keys: list[str], batches: Iterable[np.ndarray], workdir: Path, fingerprint: str, kind: str,
    on_batch: Callable[[int], None] | None = None, keep: bool = False,
) -> dict[str, np.ndarray]:
    """Write the embeddings of ``keys`` (in order, as ``batches`` yields them) to the store every
    FLUSH_ROWS rows, so a crash loses at most one block. ``on_batch(done)`` follows each batch.

    Returns:
        key -> the stored (float16) embedding when ``keep``, else an empty dict.
    """
    out: dict[str, np.ndarray] = {}
    pending: list[np.ndarray] = []
    start = done = 0

    def flush() -> None:
        nonlocal pending, start
        block = np.concatenate(pending).astype(np.float16)
        write_table(workdir, fingerprint, kind, keys[start:done], block)
        if keep:
            out.update(zip(keys[start:done], block))
        pending, start = [], done

    for emb in batches:
        pending.append(emb)
        done += len(emb)
        if on_batch is not None:
            on_batch(done)
        if done - start >= FLUSH_ROWS:
            flush()
    if pending:
        flush()
    return out


def embed_manifest(
    workdir: str | os.PathLike,
    manifest: str | os.PathLike,
    clip_checkpoint: str | os.PathLike,
    batch_size: int = 64,
    device: str | None = None,
    model: str | None = None,
    workers: int = 0,
) -> EmbedSummary:
    """Embed the manifest's slice images and captions with a (frozen) CLIP into the store.

    Args:
        workdir: the workdir (image paths in the manifest are relative to it).
        manifest: release manifest (image_path, image_sha256, caption, refused).
        clip_checkpoint: a `train clip` checkpoint (e.g. checkpoints/clip/final.pt); with
            ``model`` also an open_clip tag or weights file, or an ``hf-hub:`` id.
        batch_size: images/captions per forward pass.
        device: "cuda", "cpu", ...; None picks CUDA when available.
        model: open_clip model name / config JSON, overriding the checkpoint's.
        workers: DataLoader workers decoding PNGs.

    Returns:
        counts of computed and reused embeddings, the fingerprint and the time taken. Bad input
        (manifest, checkpoint) is a TrainingError.
    """
    t0 = time.time()
    workdir = Path(workdir)
    dev = resolve_device(device)
    with input_errors():
        df = read_manifest(resolve_manifest(workdir, manifest))
        missing = {"image_path", "image_sha256", "caption"} - set(df.columns)
        if missing:
            raise ValueError(f"{manifest}: manifest lacks columns {sorted(missing)} (a release manifest is needed)")
        clip = load_clip(clip_checkpoint, model=model, device=dev)
    images: dict[str, str] = {}  # image key -> path; every rendered slice (curate rank --features clip)
    for path, sha in zip(df["image_path"], df["image_sha256"]):
        if isinstance(path, str) and path and isinstance(sha, str) and sha:
            images.setdefault(sha, str(workdir / path))
    texts: dict[str, str] = {}  # text key -> caption; usable captions only
    for caption in df.loc[usable_caption_rows(df), "caption"]:
        texts.setdefault(text_key(str(caption)), str(caption))

    fp = clip.fingerprint
    store = Workdir(workdir).rel(Workdir(workdir).embedding_store(fp))
    net = clip.model.eval()
    precision = resolve_precision(None, dev)  # fp16 autocast on CUDA, fp32 elsewhere (captions)
    have_img, have_txt = _stored_keys(workdir, fp, "image"), _stored_keys(workdir, fp, "text")
    todo_img = sorted(k for k in images if k not in have_img)
    todo_txt = sorted(k for k in texts if k not in have_txt)
    log.info("%s (%s): %d/%d images and %d/%d captions to embed", store, clip.name, len(todo_img), len(images),
             len(todo_txt), len(texts))

    @torch.no_grad()
    def embed_texts(batch: list[str]) -> np.ndarray:
        with precision.autocast():
            emb = net.encode_text(clip.tokenizer(batch).to(dev), normalize=True)
        return emb.float().cpu().numpy()

    dim = int(clip.model_cfg["embed_dim"])
    with _progress() as progress:
        if todo_img:
            task = progress.add_task("images", total=len(todo_img))
            store_in_blocks(todo_img, encode_images(clip, [images[k] for k in todo_img], dev, batch_size, workers),
                            workdir, fp, "image", on_batch=lambda done: progress.update(task, completed=done))
        if todo_txt:
            captions = [texts[k] for k in todo_txt]
            text_batches = (embed_texts(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size))
            task = progress.add_task("captions", total=len(todo_txt))
            store_in_blocks(todo_txt, text_batches, workdir, fp, "text",
                            on_batch=lambda done: progress.update(task, completed=done))
    write_meta(workdir, fp, clip.name, str(clip_checkpoint), dim)
    summary = EmbedSummary(
        fingerprint=fp, model=clip.name, checkpoint=str(clip_checkpoint), dim=dim,
        images_computed=len(todo_img), images_reused=len(images) - len(todo_img),
        texts_computed=len(todo_txt), texts_reused=len(texts) - len(todo_txt),
        seconds=time.time() - t0,
    )
    log.info("embedded %d (reused %d) in %.1fs -> %s", summary.computed, summary.reused, summary.seconds, store)
    return summary
