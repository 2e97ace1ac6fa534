"""The frozen-CLIP embedding store: written once by `train embed`, read by `train pretrain` and
by `curate rank --features clip` (so it lives on the ground floor, with the other formats).

Layout under ``<workdir>/embeddings/<fingerprint>/`` (fingerprint = sha256 of the CLIP
checkpoint's weights + model name, first 16 hex)::

    image.parquet   key (image_sha256), embedding (list<halffloat>, L2-normalised)
    text.parquet    key (sha256 of the caption text), embedding
    meta.json       {"fingerprint", "model", "checkpoint", "dim", "created_at"}

``embeddings/latest.json`` names the fingerprint written last. Keys are content hashes, so a
changed image or caption is simply a missing key, and a changed checkpoint is a new folder.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from curation.store.fsutil import atomic_path, atomic_write_text
from curation.store.layout import Workdir


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def store_dir(workdir: str | Path, fingerprint: str) -> Path:
    return Workdir(workdir).embedding_store(fingerprint)


def _atomic_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def read_table(workdir: str | Path, fingerprint: str, kind: str) -> dict[str, np.ndarray]:
    """key -> embedding (float16) for ``kind`` in {"image", "text"}; empty if nothing stored."""
    path = store_dir(workdir, fingerprint) / f"{kind}.parquet"
    if not path.exists():
        return {}
    table = pq.read_table(path)
    keys = table.column("key").to_pylist()
    flat = table.column("embedding").combine_chunks()
    dim = len(flat[0]) if len(flat) else 0
    values = flat.flatten().to_numpy(zero_copy_only=False).astype(np.float16).reshape(len(keys), dim)
    return dict(zip(keys, values))


def write_table(workdir: str | Path, fingerprint: str, kind: str, keys: Iterable[str], embeddings: np.ndarray) -> Path:
    """Merge new rows into ``kind``.parquet (existing keys are replaced), atomically."""
    keys = list(keys)
    emb = np.asarray(embeddings, dtype=np.float16)
    current = read_table(workdir, fingerprint, kind)
    current.update(dict(zip(keys, emb)))
    all_keys = sorted(current)
    dim = emb.shape[1] if emb.ndim == 2 and emb.shape[0] else (len(next(iter(current.values()))) if current else 0)
    mat = np.stack([current[k] for k in all_keys]).astype(np.float16) if all_keys else np.zeros((0, dim), np.float16)
    values = pa.array(mat.reshape(-1), type=pa.float16())
    col = pa.FixedSizeListArray.from_arrays(values, dim) if dim else pa.array([], type=pa.list_(pa.float16()))
    table = pa.table({"key": pa.array(all_keys, type=pa.string()), "embedding": col})
    path = store_dir(workdir, fingerprint) / f"{kind}.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_meta(workdir: str | Path, fingerprint: str, model: str, checkpoint: str, dim: int) -> None:
    meta = {
        "fingerprint": fingerprint,
        "model": model,
        "checkpoint": checkpoint,
        "dim": int(dim),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _atomic_json(store_dir(workdir, fingerprint) / "meta.json", meta)
    _atomic_json(Workdir(workdir).embeddings_latest, {"fingerprint": fingerprint})


def latest_fingerprint(workdir: str | Path) -> str:
    path = Workdir(workdir).embeddings_latest
    if not path.exists():
        raise FileNotFoundError(f"{path}: no embeddings yet (run `train embed` first)")
    return json.loads(path.read_text())["fingerprint"]


def load_embeddings(
    workdir: str | Path, manifest: pd.DataFrame, fingerprint: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Image and text embeddings aligned with ``manifest`` rows (image_sha256, caption).

    Raises KeyError naming how many rows lack an embedding (run `train embed` again).
    """
    fingerprint = fingerprint or latest_fingerprint(workdir)
    images = read_table(workdir, fingerprint, "image")
    texts = read_table(workdir, fingerprint, "text")
    ikeys = list(manifest["image_sha256"])
    tkeys = [text_key(t) for t in manifest["caption"]]
    missing_i = sum(k not in images for k in ikeys)
    missing_t = sum(k not in texts for k in tkeys)
    if missing_i or missing_t:
        raise KeyError(
            f"embeddings/{fingerprint}: {missing_i} image and {missing_t} text embeddings missing "
            "for this manifest (run `train embed --manifest ...` again)"
        )
    img = np.stack([images[k] for k in ikeys]) if ikeys else np.zeros((0, 0), np.float16)
    txt = np.stack([texts[k] for k in tkeys]) if tkeys else np.zeros((0, 0), np.float16)
    return img, txt, fingerprint
