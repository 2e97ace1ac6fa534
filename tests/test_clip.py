"""`train clip` on a synthetic slice/caption set whose captions name a visible pattern.

Offline by construction: a tiny open_clip config (training/models/configs/tiny-clip.json), random
init, and a guard that fails any TCP connection attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from curation.store.layout import Workdir
from curation.store.manifest import write_manifest
from training.clip import train as clip_train
from training.clip.retrieval import dedupe_pairs, recall_at_k
from training.clip.train import ClipTrainConfig, train_clip, train_step
from training.loop.checkpoint import save
from training.loop.errors import TrainingError
from training.loop.optim import param_groups, warmup_cosine
from training.loop.precision import Precision
from training.loop.rng import rng_state, set_rng_state
from training.models.clip_models import register_tiny
from training.models.losses import ContrastiveLoss

TINY = "training/models/configs/tiny-clip.json"
ROOT = Path(__file__).resolve().parents[1]
PLANES = ("axial", "coronal", "sagittal")


def _pattern(plane: str, rng: np.random.Generator) -> np.ndarray:
    """32x32 uint8 with a plane-specific bright structure, jittered in place and contrast:
    a central disc (axial), an upper band (coronal), a left-hand bar (sagittal)."""
    y, x = np.mgrid[0:32, 0:32]
    dy, dx = rng.integers(-3, 4, size=2)
    y, x = y + dy, x + dx
    if plane == "axial":
        on = (y - 16) ** 2 + (x - 16) ** 2 < 8 ** 2
    elif plane == "coronal":
        on = (y > 4) & (y < 14)
    else:
        on = (x > 4) & (x < 12)
    lo, hi = rng.uniform(10, 60), rng.uniform(160, 240)
    img = lo + (hi - lo) * on + rng.normal(0, 20, size=on.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_workdir(root: Path, cases: dict[str, str], per_plane: int = 8, seed: int = 0,
                 caption=lambda plane, case, i: f"an {plane} slice") -> pd.DataFrame:
    """Write PNGs and manifests/v1.parquet under ``root``; ``cases`` maps case_id -> split."""
    rng = np.random.default_rng(seed)
    rows = []
    for case, split in cases.items():
        volume_id = f"ds:{case}"
        for plane_index, plane in enumerate(PLANES):
            for i in range(per_plane):
                rel = f"slices/{case}/{plane}_{i:03d}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_pattern(plane, rng), mode="L").save(root / rel)
                rows.append(dict(
                    slice_id=f"{volume_id}:{plane}:{i}", volume_id=volume_id, case_id=case, plane=plane,
                    plane_index=plane_index, index=i, image_path=rel,
                    image_sha256=hashlib.sha256((root / rel).read_bytes()).hexdigest(),
                    caption=caption(plane, case, i), refused=False, split=split,
                ))
    df = pd.DataFrame(rows)
    write_manifest(df, root / "manifests" / "v1.parquet")
    return df


CASES = {**{f"c{i}": "train" for i in range(4)}, "v0": "val", "v1": "val"}


def tiny_cfg(workdir: Path, **kw) -> ClipTrainConfig:
    base = dict(workdir=workdir, manifest=Path("manifests/v1.parquet"), model=str(ROOT / TINY), epochs=5,
                batch_size=16, lr=1e-3, wd=0.1, warmup=3, workers=0, precision="fp32", seed=0, device="cpu")
    return ClipTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Fail loudly if anything (open_clip, its tokenizer, huggingface_hub) tries the network.

    Also one intra-op thread: on 2 shared cores, torch's thread pool costs more than it gives.
    """
    real, threads = socket.socket.connect, torch.get_num_threads()
    torch.set_num_threads(1)

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real(self, address)

    socket.socket.connect = guarded
    yield
    socket.socket.connect = real
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted fine-tune of the tiny CLIP (shared by several tests)."""
    workdir = tmp_path_factory.mktemp("clip")
    make_workdir(workdir, CASES)
    result = train_clip(tiny_cfg(workdir))
    return workdir, result


def test_recall_counts_duplicates_as_one():
    # Three images of two captions: image 0 and 1 share caption "a".
    first, texts, pos = dedupe_pairs(["i0", "i1", "i2", "i0"], ["a", "a", "b", "a"])
    assert first == [0, 1, 2] and texts == ["a", "b"]
    img = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # "a" points where image 2 is: all wrong at k=1
    m = recall_at_k(img, txt, pos, ks=(1, 2))
    assert m["i2t_R@1"] == 0.0 and m["i2t_R@2"] == 1.0
    assert m["t2i_R@1"] == 0.0 and m["t2i_R@2"] == 0.5  # "a": top2 = {2, 1} -> hit; "b": {0, 1} -> miss


def test_cosine_schedule_and_weight_decay_groups():
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0)
    register_tiny()
    model = open_clip.create_model("tiny-clip")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    # As open_clip: no decay on gains, biases and the logit scale; matrices (embeddings too) decay.
    assert "logit_scale" in exempt and "ln_final.weight" in exempt and "visual.conv1.weight" not in exempt
    assert not any(n.endswith("bias") for n in (names[id(p)] for p in decay["params"]))
    assert "token_embedding.weight" in {names[id(p)] for p in decay["params"]}


def test_finetune_beats_base_model(trained):
    workdir, result = trained
    base, final = result.base_metrics, result.val_metrics
    assert base["n_images"] == 48 and base["n_texts"] == 3
    assert final["mean_R@1"] >= 0.85, final
    assert final["mean_R@1"] >= base["mean_R@1"] + 0.4, (base, final)
    lines = [json.loads(x) for x in (Workdir(workdir).clip_checkpoints / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(6)) and "loss" not in lines[0]
    assert lines[0]["val/mean_R@1"] == base["mean_R@1"] and lines[-1]["val/i2t_R@1"] == final["i2t_R@1"]
    assert {"loss", "lr", "logit_scale", "val/t2i_R@5"} <= lines[-1].keys()
    assert result.history == lines


def test_final_checkpoint_loads_with_open_clip(trained):
    workdir, result = trained
    final = workdir / "checkpoints/clip/final.pt"
    assert result.completed and result.final_checkpoint == final
    ckpt = torch.load(final, weights_only=True)
    assert ckpt["model"] == "tiny-clip" and ckpt["step"] == result.total_steps == 30
    assert ckpt["model_cfg"]["embed_dim"] == 32 and "optimizer" not in ckpt
    assert ckpt["fingerprint"] == result.fingerprint
    assert (workdir / "checkpoints/clip/tiny-clip.json").is_file()  # sidecar for users elsewhere
    register_tiny()
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(final))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k
    assert {f"epoch_{i}.pt" for i in range(1, 6)} <= {p.name for p in (workdir / "checkpoints/clip").iterdir()}


def test_captions_longer_than_the_context_are_counted_and_warned(tmp_path, caplog):
    from training.clip.data import warn_cut_captions

    register_tiny()
    tok = open_clip.get_tokenizer("tiny-clip")  # 32-token context
    long = "an axial slice " + "with a bright rim " * 10
    assert warn_cut_captions(tok, pd.Series(["an axial slice", long, long]), "train") == (1, 2)
    assert "1 of 2 distinct train captions" in caplog.text and "32-token context" in caplog.text
    caplog.clear()
    assert warn_cut_captions(tok, pd.Series(["an axial slice"]), "train") == (0, 1) and not caplog.text
    make_workdir(tmp_path, CASES, per_plane=2, caption=lambda plane, case, i: f"an {plane} slice " + "of tissue " * 20)
    with caplog.at_level(logging.WARNING):
        train_clip(tiny_cfg(tmp_path, epochs=1, save_frequency=0, progress=False))
    assert "are cut there" in caplog.text


def test_save_frequency_thins_the_epoch_checkpoints(tmp_path):
    make_workdir(tmp_path, CASES, per_plane=2)
    res = train_clip(tiny_cfg(tmp_path, epochs=4, save_frequency=2, progress=False))
    names = {p.name for p in (tmp_path / "checkpoints/clip").glob("*.pt")}
    assert res.completed and names == {"epoch_2.pt", "epoch_4.pt", "latest.pt", "final.pt"}, names
    none = tmp_path / "none"
    make_workdir(none, CASES, per_plane=2)
    train_clip(tiny_cfg(none, epochs=2, save_frequency=0, progress=False))
    assert {p.name for p in (none / "checkpoints/clip").glob("*.pt")} == {"latest.pt", "final.pt"}
    with pytest.raises(TrainingError, match="--save-frequency"):
        train_clip(tiny_cfg(none, save_frequency=-1, progress=False))


def test_resume_latest_matches_uninterrupted_run(trained, tmp_path):
    """Stop at step 8 (mid-epoch 2), resume: same step count and same weights as one run,
    here with a DataLoader worker against the reference's none."""
    _, reference = trained
    make_workdir(tmp_path, CASES)
    first = train_clip(tiny_cfg(tmp_path, stop_after=8, workers=1))
    assert (first.step, first.completed, first.final_checkpoint) == (8, False, None)
    assert torch.load(tmp_path / "checkpoints/clip/latest.pt", weights_only=True)["step"] == 8
    second = train_clip(tiny_cfg(tmp_path, resume="latest", workers=1))
    assert second.step == 30 and second.completed
    assert second.base_metrics == first.base_metrics  # carried over, not re-measured
    assert second.fingerprint == reference.fingerprint
    steps = [json.loads(x)["step"] for x in (tmp_path / "checkpoints/clip/metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 6, 12, 18, 24, 30]


def test_resume_restores_every_rng_and_this_runs_config(tmp_path, caplog):
    """latest.pt carries python, numpy and torch RNG state, and --resume restores all three; a
    changed --wd applies to the resumed optimizer (with a warning), an allowed field silently."""
    make_workdir(tmp_path, CASES, per_plane=2)
    first = train_clip(tiny_cfg(tmp_path, epochs=2, batch_size=8, stop_after=1))
    latest = first.latest_checkpoint
    ckpt = torch.load(latest, weights_only=True)
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
    # Put a recognisable state in the checkpoint; resuming with nothing left to train saves it back.
    np.random.seed(1234)
    torch.manual_seed(1234)
    expected = rng_state()
    ckpt["rng"] = expected
    save(ckpt, latest)
    np.random.seed(0)
    torch.manual_seed(0)
    caplog.set_level(logging.WARNING, logger="training")
    again = train_clip(tiny_cfg(tmp_path, epochs=2, batch_size=8, stop_after=1, resume="latest", wd=0.05, workers=1))
    assert again.step == 1
    assert [m for m in caplog.messages if m.startswith("resume:")] == ["resume: wd changed from 0.1 to 0.05"]
    saved = torch.load(latest, weights_only=True)
    assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [0.05, 0.0]
    set_rng_state(saved["rng"])
    a = (np.random.random(4), torch.rand(4))
    set_rng_state(expected)
    b = (np.random.random(4), torch.rand(4))
    np.testing.assert_array_equal(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_lock_image_and_accum_freq(tmp_path):
    """A locked tower does not move; accumulation 2 x 8 trains like batch 16 (one step per 2 batches)."""
    make_workdir(tmp_path, CASES, per_plane=2)
    cfg = tiny_cfg(tmp_path, epochs=1, batch_size=8, accum_freq=2, lock_image=True)
    register_tiny()
    torch.manual_seed(cfg.seed)
    before = open_clip.create_model("tiny-clip")  # same seed -> same init as the run below
    result = train_clip(cfg)
    after = torch.load(result.latest_checkpoint, weights_only=True)
    assert result.step == 1  # 24 pairs // 8 = 3 batches -> 1 step of 2 batches
    for k, v in before.state_dict().items():
        moved = not torch.equal(v, after["state_dict"][k])
        assert moved == (not k.startswith("visual.")), k


def test_accum_freq_gives_the_full_batch_gradient():
    """Two accumulated chunks of 4 must give exactly the gradient of one batch of 8,
    logit scale included (counted once, not once per chunk)."""
    register_tiny()
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    images, texts = torch.randn(8, 3, 32, 32), torch.randint(1, 400, (8, 32))
    grads = []
    for chunk in ([(images, texts)], [(images[:4], texts[:4]), (images[4:], texts[4:])]):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        train_step(model, chunk, ContrastiveLoss(), opt, scaler, torch.device("cpu"), Precision("fp32", "cpu"))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_recall_counts_ties_against_the_model():
    # A constant model (every score equal) scores chance, k / candidates, not 1.0.
    n = 8
    _, _, pos = dedupe_pairs([f"i{i}" for i in range(n)], [f"t{i}" for i in range(n)])
    const = torch.ones(n, 4) / 2
    m = recall_at_k(const, const, pos, ks=(1, 5, 10))
    assert m["i2t_R@1"] == pytest.approx(1 / n) and m["t2i_R@5"] == pytest.approx(5 / n)
    assert m["i2t_R@10"] == pytest.approx(1.0)
    # a positive tied with one negative at the top: half a hit at k=1
    img = torch.tensor([[1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = recall_at_k(img, txt, np.array([[True, False, False]]), ks=(1, 2))
    assert m["i2t_R@1"] == pytest.approx(0.5) and m["i2t_R@2"] == pytest.approx(1.0)
    # two tied positives and one tied negative: P(top 1 is a positive) = 2/3
    m = recall_at_k(img, txt[[0, 1, 0]], np.array([[True, True, False]]), ks=(1,))
    assert m["i2t_R@1"] == pytest.approx(2 / 3)


def test_duplicate_captions_and_images_are_positives_in_the_clip_loss():
    from training.models.losses import ContrastiveLoss

    register_tiny()
    torch.manual_seed(0)
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(1, 400, (4, 32))
    texts[1] = texts[0]  # the same template caption twice
    ids = torch.tensor([0, 1, 2, 2])  # two augmented views of one image
    pos = clip_train._positives([(images, texts, ids)])
    assert pos.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    # perfectly aligned features lose ~nothing once duplicates are positives
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    f[1], f[3] = f[0], f[2]
    assert ContrastiveLoss()(f, f, torch.tensor(100.0), positives=pos).item() < 1e-3
    assert ContrastiveLoss()(f, f, torch.tensor(100.0)).item() > 0.3


def test_named_architecture_without_pretrained_warns(tmp_path: Path, caplog):
    make_workdir(tmp_path, CASES)
    with caplog.at_level(logging.WARNING, logger="training"):
        from training.clip.train import ClipTrainer

        ClipTrainer(tiny_cfg(tmp_path))
    assert any("RANDOM weights" in r.getMessage() and "--pretrained" in r.getMessage() for r in caplog.records)
