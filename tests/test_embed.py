"""`train embed`: every slice and caption embedded once per CLIP checkpoint, nothing twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
from test_clip import CASES, make_workdir, no_network, tiny_cfg  # noqa: F401  (no_network: autouse fixture)

from curation.store.embed_store import load_embeddings, read_table, store_dir, text_key
from curation.store.manifest import read_manifest, write_manifest
from training.clip.data import read_rgb
from training.clip.embed import embed_manifest
from training.clip.train import train_clip
from training.models.clip_models import register_tiny

MANIFEST = Path("manifests/v1.parquet")


def _refuse_one(workdir: Path) -> None:
    df = read_manifest(workdir / MANIFEST)
    df.loc[5, ["caption", "refused"]] = ["I cannot describe this image.", True]
    write_manifest(df, workdir / MANIFEST)


def test_embed_computes_only_what_is_missing_or_stale(tmp_path):
    make_workdir(tmp_path, CASES, per_plane=2, caption=lambda plane, case, i: f"{plane} slice {i} of {case}")
    _refuse_one(tmp_path)  # 36 slices, 35 usable captions
    first = train_clip(tiny_cfg(tmp_path, batch_size=8, stop_after=1))
    ckpt = tmp_path / "checkpoints/clip/latest.pt"

    s1 = embed_manifest(tmp_path, MANIFEST, ckpt, batch_size=16)
    assert (s1.images_computed, s1.texts_computed, s1.reused) == (36, 35, 0)
    assert s1.fingerprint == first.fingerprint and s1.dim == 32 and s1.model == "tiny-clip"
    images = read_table(tmp_path, s1.fingerprint, "image")
    texts = read_table(tmp_path, s1.fingerprint, "text")
    assert len(images) == 36 and len(texts) == 35
    assert next(iter(images.values())).dtype == np.float16
    norms = np.linalg.norm(np.stack(list(images.values())).astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    meta = json.loads((store_dir(tmp_path, s1.fingerprint) / "meta.json").read_text())
    assert meta["model"] == "tiny-clip" and meta["dim"] == 32

    # The stored vectors are what open_clip itself computes from the checkpoint.
    df = read_manifest(tmp_path / MANIFEST)
    row = df.iloc[7]
    register_tiny()
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(ckpt))
    model.eval()
    with torch.no_grad():
        img = model.encode_image(preprocess(read_rgb(tmp_path / row.image_path))[None], normalize=True)[0]
        txt = model.encode_text(open_clip.get_tokenizer("tiny-clip")([row.caption]), normalize=True)[0]
    np.testing.assert_allclose(images[row.image_sha256].astype(np.float32), img.numpy(), atol=2e-3)
    np.testing.assert_allclose(texts[text_key(row.caption)].astype(np.float32), txt.numpy(), atol=2e-3)
    usable = df[~df["refused"]]
    img_emb, txt_emb, fp = load_embeddings(tmp_path, usable)  # what the pretrainer reads
    assert img_emb.shape == txt_emb.shape == (35, 32) and fp == s1.fingerprint

    s2 = embed_manifest(tmp_path, MANIFEST, ckpt)
    assert (s2.computed, s2.reused, s2.fingerprint) == (0, 71, s1.fingerprint)

    df.loc[3, "caption"] = "a brand new caption"
    write_manifest(df, tmp_path / MANIFEST)
    s3 = embed_manifest(tmp_path, MANIFEST, ckpt)
    assert (s3.images_computed, s3.texts_computed) == (0, 1)

    # One more optimizer step -> other weights -> new fingerprint, everything recomputed.
    second = train_clip(tiny_cfg(tmp_path, batch_size=8, stop_after=2, resume="latest"))
    assert second.step == 2
    s4 = embed_manifest(tmp_path, MANIFEST, ckpt)
    assert s4.fingerprint == second.fingerprint != s1.fingerprint
    assert (s4.images_computed, s4.texts_computed, s4.reused) == (36, 35, 0)
    assert json.loads((tmp_path / "embeddings/latest.json").read_text())["fingerprint"] == s4.fingerprint
