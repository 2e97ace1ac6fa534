"""`train pretrain` end to end on a tiny synthetic workdir (CPU, seconds per run).

The workdir holds 12 volumes of 4 classes (a bright cube in a class-specific octant), a release
manifest with 6 captioned slices per volume (+1 refused), and cached "CLIP" embeddings that are
a fixed random projection of (class, plane) plus slice noise, so alignment is learnable and
generalises to held-out volumes of the same classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from curation.store.embed_store import text_key, write_meta, write_table
from curation.store.layout import Workdir
from curation.store.manifest import write_manifest
from training.loop.errors import TrainingError
from training.loop.optim import param_groups, warmup_cosine
from training.models.align_model import build_model
from training.pretrain.data import StepBatchSampler, VolumeSliceDataset, captioned_rows
from training.pretrain.export import export_latest, load_into_monai
from training.pretrain.train import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]
G, DIM, CLASSES = 32, 32, 4
PLANES = ("axial", "coronal", "sagittal")
INDICES = (10, 21)
# Stride-1 stem: 8 tokens at 32^3 (the default stride 2 leaves a single token).
TINY_CNN = dict(block_inplanes=(4, 8, 8, 16), conv1_t_size=3, conv1_t_stride=1)
TINY_VIT = dict(patch_size=8, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
TINY_HEAD = dict(num_queries=8, psat_width=32, psat_layers=1, psat_heads=4)


def make_workdir(root: Path, nan_volume: str | None = None) -> Path:
    """Write volumes, manifests/v1.parquet and an embedding store under ``root``."""
    rng = np.random.default_rng(0)
    class_vec = rng.normal(size=(CLASSES, DIM))
    plane_vec = rng.normal(size=(3, DIM))
    rows, image_emb, text_emb = [], [], []
    for v in range(12):
        k, rep = v % CLASSES, v // CLASSES
        vid = f"vol{v:02d}"
        vol = rng.uniform(0, 0.1, size=(G, G, G))
        ox, oy, oz = [(k >> b) & 1 for b in range(3)]  # class -> octant
        j = rng.integers(-2, 3, size=3)
        x0, y0, z0 = 4 + 16 * ox + j[0], 4 + 16 * oy + j[1], 4 + 16 * oz + j[2]
        vol[x0:x0 + 10, y0:y0 + 10, z0:z0 + 10] = 0.9
        path = root / "volumes" / vid / "volume.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vol.astype(np.float16))
        split = "train" if rep < 2 else "val"
        for p, plane in enumerate(PLANES):
            for idx in (*INDICES, 5):
                refused = idx == 5 and p == 0
                if idx == 5 and not refused:
                    continue
                sid = f"{vid}:{plane}:{idx}"
                caption = f"class {k} {plane} slice {idx} of {vid}"
                base = class_vec[k] + 0.7 * plane_vec[p]
                img = base + 0.3 * rng.normal(size=DIM)
                txt = base + 0.2 * rng.normal(size=DIM)
                if vid == nan_volume:
                    txt = np.full(DIM, np.nan)
                rows.append(dict(slice_id=sid, volume_id=vid, case_id=f"case{v}", plane=plane, plane_index=p,
                                 index=idx, image_path=Workdir.png_relpath(vid, plane, idx, G),
                                 image_sha256=hashlib.sha256(sid.encode()).hexdigest(),
                                 caption=caption, refused=refused, split=split,
                                 volume_path=f"volumes/{vid}/volume.npy", grid_size=G))
                image_emb.append(img / np.linalg.norm(img))
                text_emb.append(txt / np.linalg.norm(txt))
    df = pd.DataFrame(rows)
    write_manifest(df, root / "manifests" / "v1.parquet")
    fp = "tinyclip000000"
    write_table(root, fp, "image", df["image_sha256"], np.stack(image_emb))
    write_table(root, fp, "text", [text_key(c) for c in df["caption"]], np.stack(text_emb))
    write_meta(root, fp, model="tiny", checkpoint="none", dim=DIM)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("pretrain"))


def _cfg(workdir: Path, **kw) -> PretrainConfig:
    base = dict(workdir=workdir, encoder="cnn", encoder_kwargs=dict(TINY_CNN), steps=8, batch_size=4,
                lr=1e-3, wd=0.01, warmup=3, precision="fp32", workers=0, log_every=1, ckpt_every=100,
                progress=False, **TINY_HEAD)
    return PretrainConfig(**{**base, **kw})


def _ckdir(workdir: Path) -> Path:
    return Workdir(workdir).pretrain_checkpoints


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (_ckdir(workdir) / "metrics.jsonl").read_text().splitlines()]


def _copy_inputs(src: Path, dst: Path) -> Path:
    """A fresh workdir sharing the module's inputs (checkpoints stay separate)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("volumes", "manifests", "embeddings"):
        (dst / name).symlink_to(src / name)
    return dst


def test_dataset_sampling_is_deterministic(workdir):
    rows = captioned_rows(workdir / "manifests" / "v1.parquet", "train")
    assert len(rows) == 8 * 6 and not rows["refused"].any()
    emb = np.zeros((len(rows), DIM), np.float16)
    data = VolumeSliceDataset(workdir, rows, emb, emb, seed=3)
    assert len(data) == 8
    picks = [[data.sample_row(v, e) for v in range(8)] for e in range(6)]
    assert picks == [[data.sample_row(v, e) for v in range(8)] for e in range(6)]
    assert len({tuple(p) for p in picks}) > 1  # epochs differ
    assert all(rows["volume_id"].iloc[r] == data.volume_ids[v] for p in picks for v, r in enumerate(p))
    # Starting at step k yields the tail of the same sequence (resume), in both modes.
    for mode in ("matched", "random"):
        sampler = StepBatchSampler(data, batch_size=2, accum=1, rank=0, world=1, seed=3, mode=mode)
        it = iter(sampler)
        full = [next(it) for _ in range(10)]
        sampler.start = 4
        it = iter(sampler)
        assert [next(it) for _ in range(6)] == full[4:]
        assert data[full[0][0]]["row"].item() == full[0][0]
    # --img-size resizes the volume; the slice index stays on the manifest grid.
    small = VolumeSliceDataset(workdir, rows, emb, emb, img_size=16)[(0, 0)]
    assert small["volume"].shape == (1, 16, 16, 16) and small["volume"].dtype == torch.float32
    assert small["index"].item() in INDICES


def test_schedule_and_weight_decay_groups():
    def fn(step):
        return warmup_cosine(step, 4, 20)

    assert fn(0) == pytest.approx(0.25) and fn(3) == pytest.approx(1.0)
    assert fn(12) == pytest.approx(0.5) and fn(20) == pytest.approx(0.0)
    from training.models.losses import AlignmentLoss

    model = build_model(_cfg(Path("."), encoder="vit", encoder_kwargs=TINY_VIT).align_spec(), grid=G, clip_dim=DIM)
    loss = AlignmentLoss()
    decay, no_decay = param_groups({"m": model, "l": loss}, 0.1)
    names = {id(p): n for n, p in model.named_parameters()} | {id(loss.logit_scale): "logit_scale"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"head.pspe", "head.queries", "logit_scale"} <= exempt
    assert any(n.endswith("position_embeddings") for n in exempt)
    assert not any(n.endswith("bias") for n in (names[id(p)] for p in decay["params"]))


def test_accum_freq_enlarges_the_contrastive_batch():
    """Two accumulated micro-batches of 2 give exactly the gradient of one batch of 4 (every sample
    contrasted with all 4; the logit scale counted once) and the same loss."""
    from training.loop.precision import Precision
    from training.loop.rng import seed_all
    from training.pretrain.step import TrainState, train_step

    g = torch.Generator().manual_seed(0)
    batch = {"volume": torch.rand(4, 1, G // 2, G // 2, G // 2, generator=g), "plane": torch.tensor([0, 1, 2, 0]),
             "index": torch.tensor([3, 7, 9, 12]), "image": torch.randn(4, DIM, generator=g),
             "text": torch.randn(4, DIM, generator=g), "row": torch.arange(4)}
    grads, losses = [], []
    for bs, accum in ((4, 1), (2, 2)):
        cfg = _cfg(Path("."), encoder="vit", encoder_kwargs=TINY_VIT, img_size=G // 2, batch_size=bs,
                   accum_freq=accum, grad_clip_norm=0.0, lr=0.0, wd=0.0)
        seed_all(0)
        state = TrainState.create(cfg, G, DIM, torch.device("cpu"), Precision("fp32", "cpu"))
        chunks = iter([{k: v[i:i + bs] for k, v in batch.items()} for i in range(0, 4, bs)])
        losses.append(train_step(state, cfg, chunks, 1)["loss"])
        grads.append({n: p.grad.clone() for n, p in [*state.model.named_parameters(), ("t", state.loss_fn.logit_scale)]
                      if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and "t" in grads[0]
    for name, g0 in grads[0].items():
        torch.testing.assert_close(grads[1][name], g0, rtol=1e-4, atol=1e-6, msg=name)


def test_splits_train_val_keeps_a_holdout(workdir, tmp_path, caplog):
    from training.loop.distributed import init_distributed
    from training.pretrain.train import Pretrainer

    info = init_distributed("cpu")
    wd = _copy_inputs(workdir, tmp_path / "splits")
    plain = Pretrainer(_cfg(wd), info)
    assert len(plain.data) == 8 and len(plain.val) == 4  # train learns, val is held out
    both = Pretrainer(_cfg(wd, splits="train,val", val_split="train"), info)
    assert len(both.data) == 12 and both.val is None  # never a holdout it trained on
    caplog.set_level(logging.WARNING, logger="training")
    Pretrainer(_cfg(wd, splits="train,val,test"), info)
    assert any("no held-out retrieval metric" in m for m in caplog.messages)
    with pytest.raises(TrainingError, match="--splits 'train,bogus'"):
        Pretrainer(_cfg(wd, splits="train,bogus"), info)


def test_learns_retrieves_and_exports_without_clip(workdir, tmp_path, monkeypatch):
    import open_clip

    def no_clip(*a, **k):
        raise AssertionError("pretraining must not run CLIP")

    for name in ("create_model", "create_model_and_transforms", "create_model_from_pretrained"):
        monkeypatch.setattr(open_clip, name, no_clip)
    wd = _copy_inputs(workdir, tmp_path / "run")
    result = pretrain(_cfg(wd, steps=40, warmup=5, ckpt_every=20))
    losses = result.losses
    assert result.step == 40 and len(losses) == 40
    assert np.mean(losses[-10:]) < 0.4 * np.mean(losses[:5]), losses
    r = result.retrieval
    assert r["n_queries"] == 4 * 6 and r["n_texts"] == 24 and r["n_volumes"] == 4
    assert r["v2t_R@1"] > 2 * r["v2t_chance@1"], r
    assert r["v2t_all_R@5"] > r["v2t_all_chance@5"] + 0.2, r
    # Same-position candidates: only the volume tells them apart, so the controls fall to about chance.
    assert r["v2t_R@1"] > r["v2t_R@1_shuffled"] + 0.2 and r["v2t_R@1"] > r["v2t_R@1_blank"] + 0.2, r
    rows = _metrics(wd)
    train_rows = [m for m in rows if "loss" in m]
    assert [m["step"] for m in train_rows] == list(range(1, 41))
    assert {"loss", "image_loss", "text_loss", "lr", "logit_scale", "step_time", "samples_per_s"} <= train_rows[0].keys()
    assert any("val/v2t_R@1" in m and "val/v2i_R@1" in m for m in rows)
    val = next(m for m in rows if "val/v2t_R@1" in m)
    for key in ("v2t_R@1", "v2i_R@1", "v2t_all_R@1", "v2i_all_R@5", "v2t_median_rank"):
        assert {f"val/{key}", f"val/{key}_blank", f"val/{key}_shuffled"} <= val.keys(), key
    probe = next(m for m in rows if "probe/between_volume_share" in m)
    assert probe["probe/split"] == "held-out" and 0 < probe["probe/between_volume_share_init"] <= 1
    ckdir = _ckdir(wd)
    assert (ckdir / "step_20.pt").exists() and (ckdir / "step_40.pt").exists()
    assert os.path.samefile(ckdir / "latest.pt", ckdir / "step_40.pt")

    weights, meta = export_latest(wd)
    net = load_into_monai(meta)  # strict load
    ckpt = torch.load(ckdir / "latest.pt", weights_only=True)
    torch.testing.assert_close(net.state_dict()["conv1.weight"], ckpt["model"]["encoder.resnet.conv1.weight"])


def test_resume_continues_like_uninterrupted_run(workdir, tmp_path, caplog):
    kw = dict(steps=7, batch_size=2, img_size=16)  # 4 steps per epoch: resume lands mid-epoch 0
    # DataLoader workers must not change what is sampled.
    full = pretrain(_cfg(_copy_inputs(workdir, tmp_path / "full"), workers=2, **kw))
    wd = _copy_inputs(workdir, tmp_path / "split")
    first = pretrain(_cfg(wd, stop_after=3, **kw))
    assert first.step == 3 and first.retrieval is None
    np.testing.assert_allclose(first.losses, full.losses[:3], rtol=0, atol=1e-6)
    second = pretrain(_cfg(wd, resume="latest", **kw))
    assert second.start_step == 3 and second.step == 7
    np.testing.assert_allclose(second.losses, full.losses[3:], rtol=1e-5, atol=1e-5)
    assert [m["step"] for m in _metrics(wd) if "loss" in m] == list(range(1, 8))

    # Hyperparameter changes warn; the head's shape is the checkpoint's; another encoder is refused.
    kw["resume"] = "latest"
    caplog.set_level(logging.WARNING, logger="training")
    again = pretrain(_cfg(wd, lr=5e-4, **kw))
    assert again.start_step == again.step == 7
    assert "resume: lr changed from 0.001 to 0.0005" in caplog.text
    caplog.clear()
    pretrain(_cfg(wd, num_queries=4, **kw))
    assert "num_queries=4 differs from the checkpoint's 8; using the checkpoint's" in caplog.text
    with pytest.raises(TrainingError, match="block_inplanes"):
        pretrain(_cfg(wd, **{**kw, "encoder_kwargs": {**TINY_CNN, "block_inplanes": (4, 8, 8, 32)}}))
    with pytest.raises(TrainingError, match="'vit'"):
        pretrain(_cfg(wd, encoder="vit", encoder_kwargs=TINY_VIT, **kw))


def test_unreadable_latest_falls_back_to_newest_readable_step(workdir, tmp_path, caplog):
    wd = _copy_inputs(workdir, tmp_path / "corrupt")
    cfg = _cfg(wd, steps=6, batch_size=2, img_size=16, ckpt_every=2)
    assert pretrain(replace(cfg, stop_after=4)).step == 4
    ckdir = _ckdir(wd)
    # latest.pt is a hard link to step_4.pt: replace it by a truncated copy, and truncate step_4 too.
    data = (ckdir / "latest.pt").read_bytes()
    (ckdir / "latest.pt").unlink()
    (ckdir / "latest.pt").write_bytes(data[: len(data) // 2])
    (ckdir / "step_4.pt").write_bytes(data[:100])
    caplog.set_level(logging.INFO, logger="training")
    result = pretrain(replace(cfg, resume="latest"))
    assert result.start_step == 2 and result.step == 6
    lines = [r.getMessage() for r in caplog.records if "latest.pt" in r.getMessage()]
    assert len(lines) == 1 and "unreadable checkpoint" in lines[0], caplog.text
    assert "resuming from step_2.pt instead (step_4.pt unreadable too)" in lines[0]
    assert [m["step"] for m in _metrics(wd) if "loss" in m] == list(range(1, 7))
    assert torch.load(ckdir / "latest.pt", weights_only=True)["step"] == 6  # a readable latest again

    for name in ("latest.pt", "step_6.pt", "step_4.pt", "step_2.pt"):
        (ckdir / name).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="latest.pt: unreadable checkpoint .* no readable step_N.pt"):
        pretrain(replace(cfg, resume="latest"))
    with pytest.raises(TrainingError, match="no such checkpoint"):
        pretrain(replace(cfg, resume=str(ckdir / "step_99.pt")))


def test_nan_guard_names_the_step(tmp_path):
    wd = make_workdir(tmp_path, nan_volume="vol05")
    cfg = _cfg(wd, steps=20, batch_size=2, img_size=16)
    rows = captioned_rows(wd / "manifests" / "v1.parquet", "train")
    data = VolumeSliceDataset(wd, rows, np.zeros((len(rows), 1)), np.zeros((len(rows), 1)))
    sampler = StepBatchSampler(data, cfg.batch_size, 1, 0, 1, seed=cfg.seed)
    expected = next(s for s in range(100) if any(data.rows["volume_id"].iloc[r] == "vol05"
                                                 for r in sampler.step_rows(s))) + 1
    with pytest.raises(TrainingError, match=f"at step {expected}:") as err:
        pretrain(cfg)
    assert err.value.step == expected
    assert "CLIP text embeddings" in str(err.value) and "vol05:" in str(err.value)


def test_ablation_switches(workdir, tmp_path, caplog):
    wd = _copy_inputs(workdir, tmp_path / "nopsat")
    caplog.set_level(logging.WARNING, logger="training")
    res = pretrain(_cfg(wd, steps=3, use_psat=False, img_size=16, encoder="vit", encoder_kwargs=TINY_VIT,
                        precision="amp"))
    assert "--precision amp needs CUDA; training in fp32 on CPU" in caplog.messages
    ckpt = torch.load(_ckdir(wd) / "latest.pt", weights_only=True)
    assert res.step == 3 and ckpt["head"] == "linear" and ckpt["encoder_config"]["img_size"] == 16
    assert np.isfinite(res.losses).all()
    wd = _copy_inputs(workdir, tmp_path / "nopspe")
    res = pretrain(_cfg(wd, steps=3, use_pspe=False, img_size=16, precision="bf16", batch_size=2, accum_freq=2,
                        encoder="vit", encoder_kwargs=TINY_VIT))
    ckpt = torch.load(_ckdir(wd) / "latest.pt", weights_only=True)
    assert ckpt["head"] == "psat" and not any("pspe" in k for k in ckpt["model"])
    assert np.isfinite(res.losses).all()


def _write_config(path: Path, cfg: PretrainConfig) -> Path:
    fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    path.write_text(json.dumps(fields))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_kill_9_then_resume_latest(workdir, tmp_path):
    wd = _copy_inputs(workdir, tmp_path / "kill")
    cfg = _cfg(wd, steps=16, batch_size=2, ckpt_every=2, img_size=16)
    conf = _write_config(tmp_path / "cfg.json", cfg)
    # --step-sleep keeps the run alive long enough to be killed mid-way on a fast machine.
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "pretrain_driver.py"), "--config", str(conf),
                             "--step-sleep", "0.2"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = _ckdir(wd) / "latest.pt"
    deadline = time.time() + 90
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed_at = torch.load(latest, weights_only=True)["step"]
    assert 2 <= killed_at < 16
    result = pretrain(replace(cfg, resume="latest"))
    assert result.start_step == killed_at and result.step == 16
    assert [m["step"] for m in _metrics(wd) if "loss" in m] == list(range(1, 17))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_matches_one_process(workdir, tmp_path):
    """2 ranks x batch 2 = 1 rank x batch 4: same global batches, same losses (LayerNorm-only ViT)."""
    steps = 3
    single = pretrain(_cfg(_copy_inputs(workdir, tmp_path / "single"), steps=steps, batch_size=4,
                           encoder="vit", encoder_kwargs=TINY_VIT))
    wd = _copy_inputs(workdir, tmp_path / "ddp")
    conf = _write_config(tmp_path / "cfg.json", _cfg(wd, steps=steps, batch_size=2, encoder="vit", encoder_kwargs=TINY_VIT))
    out = tmp_path / "result.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(ROOT / "tests" / "pretrain_driver.py"), "--config", str(conf), "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["step"] == steps
    np.testing.assert_allclose(result["losses"], single.losses, rtol=1e-4, atol=1e-5)
    ckpt = torch.load(_ckdir(wd) / "latest.pt", weights_only=True)
    assert ckpt["step"] == steps and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
