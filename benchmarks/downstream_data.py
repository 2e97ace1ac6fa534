"""Cohorts and pretraining inputs of ``bench_downstream.py`` (see its docstring).

- ``build_cohort``: warped MNI152 subjects from ``bench_lesions.make_subject`` (imported, not
  copied), lesions in about half of them, written as an MSD task and sliced with `curate slice`.
  The pretraining and downstream cohorts are built from different seeds and subject-id prefixes,
  so they share no subject.
- ``ranked``, ``caption_arm``: the project's path on the pretraining cohort: `curate rank` ->
  `curate caption --provider offline --context labels|metadata` (the release manifest, through the
  APIs) -> the slice and caption embeddings `train pretrain` reads, by ``--text-embeddings``:
  ``random`` (default) and ``bow`` write stand-in "CLIP" embeddings
  (``bench_lesions.standin_embeddings``: an image's is a random projection of its 16x16 thumbnail,
  a caption's a random vector per distinct caption; ``bow`` replaces the text table by a bag of
  words); ``clip`` runs the method itself (``clip_embeddings``): `train clip` trains a small CLIP
  (``training/models/configs/tiny-clip.json``, random init, no hub weights) on that arm's
  slice-caption pairs (train split; held-out retrieval on val), then `train embed` caches its image
  and caption embeddings in the arm's store, which `embeddings/latest.json` names, so
  `train pretrain` (``--embeddings`` unset = latest) aligns to them. Each caption arm trains its own
  CLIP (200 steps of batch 64: ~2 min of CPU an arm, 3-6 min on the loaded shared machine).
- ``shuffle_volumes``: the volume-shuffled control: a copy of a caption arm whose manifest pairs
  every subject's slices (captions, images, embeddings) with another subject's volume; it links
  the arm's embedding store (stand-in or CLIP), so it aligns to the same embeddings.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_lesions import load_template, make_subject, standin_embeddings, write_case, write_dataset_json

from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice

# make_subject sizes lesions and shifts in mm through vox_mm; passing half the template's voxel size
# doubles them (lesion radii 8-24 mm, shifts up to 12 mm), so that a lesion spans a few voxels of a
# 32^3 grid (15-120 voxels of 32768); --lesion-scale changes the factor.
LESION_SCALE = 2.0

# --text-embeddings clip: `train clip` from scratch on the tiny open_clip config (32 px images, 32-token
# context: a long caption is cut, as open_clip does), then `train embed`. 200 steps of batch 64 (~8 epochs
# of the 1684 train pairs at --size cpu) and the embedding take ~2 min of CPU.
TINY_CLIP = Path(__file__).resolve().parents[1] / "training" / "models" / "configs" / "tiny-clip.json"
CLIP_STEPS, CLIP_BATCH, CLIP_LR = 200, 64, 1e-3
CLIP_RECORD = "clip_embeddings.json"  # in a caption arm: the CLIP run and the fingerprint of its embeddings


def build_cohort(root: Path, prefix: str, subjects: int, seed: int, grid: int, lesion_share: float = 0.5,
                 max_lesions: int = 2, lesion_scale: float = LESION_SCALE) -> Path:
    """Write ``subjects`` subjects (ids ``<prefix>NNN``) as an MSD task under ``root/data`` and slice
    them into the workdir ``root/w``; returns the workdir. Subject k has a lesion with probability
    ``lesion_share`` (1..max_lesions of them), drawn from ``seed``."""
    w = root / "w"
    if (w / "manifests" / "volumes.parquet").exists():
        return w
    res = 2
    t1img, t1, brain = load_template(res)
    task = root / "data" / f"Task96_{prefix}"
    rng = np.random.default_rng(seed)
    training = []
    for s in range(subjects):
        n = int(rng.integers(1, max_lesions + 1)) if rng.random() < lesion_share else 0
        img, lab = make_subject(t1, brain, res / lesion_scale, rng, n)
        training.append(write_case(task, f"{prefix}{s:03d}", img, lab, t1img.affine))
    write_dataset_json(task, prefix, training)
    run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=grid), workers=1), log=lambda *_: None)
    return w


def _link_inputs(src: Path, dst: Path, names=("volumes", "cache", "volumes.parquet", "slices.parquet")) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name in ("manifests", "embeddings", "checkpoints", "exports", "reports"):
            continue
        if not (dst / p.name).exists():
            (dst / p.name).symlink_to(p.resolve())


def ranked(w: Path, dst: Path) -> Path:
    """A copy of workdir ``w`` after `curate rank` (the default voter order)."""
    from curation.ranking.rank import RankConfig, run_rank

    if (dst / ".ranked").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(w, dst, symlinks=True)
    run_rank(RankConfig(workdir=dst))
    (dst / ".ranked").touch()
    return dst


def bow_text_embeddings(w: Path) -> None:
    """Replace the stand-in text table by a bag-of-words one: a caption's vector is the normalised sum
    of a fixed random vector per word, so captions that share "lesion" share a direction (closer to
    what a text encoder does than ``standin_embeddings``' random vector per distinct caption)."""
    import re

    from bench_lesions import EMB_DIM

    from curation.store.embed_store import text_key, write_table
    from curation.store.manifest import read_manifest

    caps = sorted(set(read_manifest(w / "manifests" / "v1.parquet")["caption"].dropna()))
    vecs = []
    for c in caps:
        e = np.zeros(EMB_DIM)
        for word in re.findall(r"[a-z]+", c.lower()):
            e += np.random.default_rng(int(text_key(word)[:12], 16)).normal(size=EMB_DIM)
        vecs.append(e / (np.linalg.norm(e) + 1e-8))
    write_table(w, "standin", "text", [text_key(c) for c in caps], np.stack(vecs))


def clip_embeddings(w: Path, steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
                    device: str = "auto", log=None) -> dict:
    """`train clip` then `train embed` on release workdir ``w``, through their APIs: a CLIP from the tiny
    open_clip config (random init, no hub weights) trained on the train split's slice-caption pairs
    (val: held-out retrieval, logged against chance), then its image and caption embeddings cached in
    ``w/embeddings/<fingerprint>/``, which ``embeddings/latest.json`` then names (what `train pretrain`
    reads when ``--embeddings`` is unset). Writes and returns the record ``w/clip_embeddings.json``.
    ``steps``, ``batch_size``, ``lr``: None = CLIP_STEPS, CLIP_BATCH, CLIP_LR (read at call time)."""
    import torch

    from training.clip.config import ClipTrainConfig
    from training.clip.data import read_pairs
    from training.clip.embed import embed_manifest
    from training.clip.train import train_clip

    t0 = time.time()
    steps, batch_size, lr = steps or CLIP_STEPS, batch_size or CLIP_BATCH, lr or CLIP_LR
    log = log or (lambda msg: print(msg, flush=True))
    manifest = Path("manifests") / "v1.parquet"
    n_train = len(read_pairs(w, manifest, "train"))
    batch = max(2, min(batch_size, n_train))  # a tiny cohort has fewer pairs than one batch
    precision = "amp" if device != "cpu" and torch.cuda.is_available() else "fp32"  # no "amp needs CUDA" warning
    res = train_clip(ClipTrainConfig(workdir=w, manifest=manifest, model=str(TINY_CLIP), pretrained=None, steps=steps,
                                     batch_size=batch, lr=lr, wd=0.1, warmup=max(1, steps // 10), workers=0,
                                     precision=precision, seed=0, device=device, log_every=max(1, steps // 4),
                                     progress=False, save_frequency=0))
    emb = embed_manifest(w, manifest, res.final_checkpoint, batch_size=256, device=None if device == "auto" else device)
    if emb.fingerprint != res.fingerprint:
        raise SystemExit(f"{w}: train embed wrote {emb.fingerprint}, train clip's checkpoint is {res.fingerprint}")
    base, val = res.base_metrics, res.val_metrics
    n_texts = int(val.get("n_texts") or 0)
    chance = {k: min(1.0, k / n_texts) if n_texts else float("nan") for k in (1, 5, 10)}
    rec = {"fingerprint": emb.fingerprint, "model": emb.model, "config": str(TINY_CLIP),
           "checkpoint": str(res.final_checkpoint), "steps": res.total_steps, "batch_size": batch, "lr": lr,
           "train_pairs": n_train, "base": base, "val": val, "chance": {f"R@{k}": v for k, v in chance.items()},
           "images": emb.images_computed + emb.images_reused, "texts": emb.texts_computed + emb.texts_reused,
           "dim": emb.dim, "seconds": round(time.time() - t0, 1)}
    (w / CLIP_RECORD).write_text(json.dumps(rec, indent=1) + "\n")

    def r(m: dict, k: int) -> str:
        return f"{m.get(f'i2t_R@{k}', float('nan')):.3f}/{m.get(f't2i_R@{k}', float('nan')):.3f}"

    held_out = (f"val ({n_texts} texts) i2t/t2i R@1 {r(base, 1)} -> {r(val, 1)}, R@10 {r(base, 10)} -> {r(val, 10)} "
                f"(chance {chance[1]:.3f}, {chance[10]:.3f})" if n_texts else "no val split: no held-out retrieval")
    log(f"[{time.strftime('%H:%M:%S')}]   train clip {w.name}: {res.total_steps} steps x {batch} of {n_train} train "
        f"pairs; {held_out}; train embed: {rec['images']} images, {rec['texts']} captions -> "
        f"embeddings/{emb.fingerprint[:12]}; {rec['seconds']:.0f} s")
    if n_texts and max(val.get("i2t_R@10", 0.0), val.get("t2i_R@10", 0.0)) <= chance[10]:
        log(f"  WARNING: {w.name}: the CLIP's held-out retrieval is not above chance")
    return rec


def caption_arm(w: Path, dst: Path, context: str, text: str = "random") -> Path:
    """A copy of the ranked workdir ``w`` with its own offline-captioned release (``--context
    context``) and its embeddings: stand-ins (``text`` random or bow) or, for ``text`` clip, a CLIP
    trained and run on this arm's pairs (``clip_embeddings``); returns ``dst``."""
    from captions.options import CaptionOptions
    from captions.release import run_release

    if text == "clip":
        if not (dst / CLIP_RECORD).exists():
            if not (dst / "manifests" / "v1.parquet").exists():
                _copy_for_release(w, dst)
                run_release(dst, CaptionOptions(provider="offline", context=context))
            clip_embeddings(dst)
        return dst
    if (dst / "manifests" / "v1.parquet").exists():
        return dst
    _copy_for_release(w, dst)
    # `curate caption --provider offline --context <context>`, through its API
    run_release(dst, CaptionOptions(provider="offline", context=context))
    standin_embeddings(dst)
    if text == "bow":
        bow_text_embeddings(dst)
    return dst


def _copy_for_release(w: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in w.iterdir():
        target = dst / p.name
        if target.exists():
            continue
        if p.is_dir():
            shutil.copytree(p, target, symlinks=True)  # rank/caption write under cache/ etc.
        else:
            shutil.copy2(p, target)


def volume_column(df: pd.DataFrame) -> str:
    for c in ("volume_path", "volume"):
        if c in df.columns:
            return c
    raise SystemExit(f"manifest has no volume column: {list(df.columns)}")


def shuffle_volumes(src: Path, dst: Path, seed: int = 0) -> Path:
    """Copy of caption arm ``src`` whose manifest gives every subject's rows another subject's volume
    (a fixed derangement of the volumes): the captions and embeddings no longer describe the volume."""
    from curation.store.manifest import read_manifest

    if (dst / "manifests" / "v1.parquet").exists():
        return dst
    _link_inputs(src, dst)
    (dst / "manifests").mkdir(parents=True, exist_ok=True)
    emb = dst / "embeddings"
    if not emb.exists():
        emb.symlink_to((src / "embeddings").resolve())
    df = read_manifest(src / "manifests" / "v1.parquet")
    col = volume_column(df)
    vols = sorted(df[col].dropna().unique())
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(vols))
    # a derangement: rotate a random order by one
    mapping = {vols[perm[i]]: vols[perm[(i + 1) % len(vols)]] for i in range(len(vols))}
    moved = [c for c in df.columns if c != col and c.startswith(("volume", "label_volume", "grid", "spacing"))]
    per_vol = df.drop_duplicates(col).set_index(col)[moved] if moved else None
    df = df.copy()
    df[col] = df[col].map(mapping)
    if per_vol is not None:
        for c in moved:
            df[c] = df[col].map(per_vol[c])
    for p in (src / "manifests").iterdir():
        if p.name != "v1.parquet" and not (dst / "manifests" / p.name).exists():
            (dst / "manifests" / p.name).symlink_to(p.resolve())
    df.to_parquet(dst / "manifests" / "v1.parquet", index=False)
    return dst
