"""The pretraining objective must need the volume (issue 21): position-matched batches, positives
per modality, no batch of one, exact or refused accumulation, retrieval with controls, the
collapse probe, and the default `train pretrain` through the CLI."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_pretrain import DIM, TINY_CNN, TINY_HEAD, TINY_VIT, G, _cfg, _copy_inputs, make_workdir
from torch import nn
from typer.testing import CliRunner

from training.loop.accumulate import accumulate_gradients, frozen_norm_stats
from training.loop.errors import TrainingError
from training.loop.precision import Precision
from training.models.losses import AlignmentLoss, duplicate_positives, symmetric_infonce
from training.pretrain.data import StepBatchSampler, VolumeSliceDataset, captioned_rows
from training.pretrain.probe import token_variance_share, token_variance_shares
from training.pretrain.retrieval import derangement, evaluate_volumes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("objective"))


def _synthetic_rows(counts: dict[tuple[int, int], int], volumes: int) -> pd.DataFrame:
    """Rows where position p is captioned in the first ``counts[p]`` volumes."""
    rows = []
    for (plane, index), n in counts.items():
        for v in range(n):
            rows.append(dict(volume_id=f"v{v:02d}", slice_id=f"v{v:02d}:{plane}:{index}", plane_index=plane, index=index,
                             volume_path=f"volumes/v{v:02d}.npy", caption=f"c{plane}{index}{v}"))
    for v in range(volumes):  # every volume has some slice
        rows.append(dict(volume_id=f"v{v:02d}", slice_id=f"v{v:02d}:2:0", plane_index=2, index=0,
                         volume_path=f"volumes/v{v:02d}.npy", caption="x"))
    return pd.DataFrame(rows).sort_values(["volume_id", "slice_id"], kind="stable").reset_index(drop=True)


def _dataset(rows: pd.DataFrame) -> VolumeSliceDataset:
    emb = np.zeros((len(rows), 4), np.float32)
    return VolumeSliceDataset(".", rows, emb, emb)


def test_matched_batches_share_one_position_across_micro_batches_and_ranks():
    # Position (0, 5) in 9 volumes, (1, 7) in 3, (0, 9) in 1 (never a batch), (2, 0) in all 12.
    data = _dataset(_synthetic_rows({(0, 5): 9, (1, 7): 3, (0, 9): 1}, volumes=12))
    world, accum = 2, 2
    samplers = [StepBatchSampler(data, batch_size=3, accum=accum, rank=r, world=world, seed=1) for r in range(world)]
    seen = set()
    for step in range(60):
        plans = [s.plan(step) for s in samplers]
        rows = [r for plan in plans for mb in plan for r in mb]
        sizes = {len(mb) for plan in plans for mb in plan}
        assert len(sizes) == 1 and len(rows) >= 4  # equal micro-batches, a contrastive batch of >= 2
        pos = {(int(data.rows["plane_index"].iloc[r]), int(data.rows["index"].iloc[r])) for r in rows}
        assert len(pos) == 1, pos  # one position for every micro-batch of every rank
        assert len({data.rows["volume_id"].iloc[r] for r in rows}) == len(rows)  # distinct volumes
        seen |= pos
    assert (0, 9) not in seen and (1, 7) not in seen  # 3 volumes cannot fill 2 ranks x 2 micro-batches
    assert {(0, 5), (2, 0)} <= seen
    # Random sampling (the ablation) mixes positions.
    rnd = StepBatchSampler(data, batch_size=4, accum=1, rank=0, world=1, seed=1, mode="random")
    assert any(len({int(data.rows["index"].iloc[r]) for r in rnd.step_rows(s)}) > 1 for s in range(10))


def test_no_batch_of_one():
    data = _dataset(_synthetic_rows({(0, 5): 2, (1, 7): 1}, volumes=5))
    sampler = StepBatchSampler(data, batch_size=4, accum=1, rank=0, world=1, seed=0)
    assert all(len(sampler.step_rows(s)) >= 2 for s in range(100))
    with pytest.raises(ValueError, match="contrastive batch of one"):
        StepBatchSampler(data, batch_size=1, accum=1, rank=0, world=1)
    only_one = _dataset(_synthetic_rows({}, volumes=1))
    with pytest.raises(ValueError):
        StepBatchSampler(only_one, batch_size=2, accum=1, rank=0, world=1)
    with pytest.raises(ValueError, match="batch of one"):
        AlignmentLoss()(torch.randn(1, 4), image=torch.randn(1, 4))


def test_positives_per_modality():
    """Rows 0 and 1 share a caption but not an image: a positive pair in the text loss only."""
    torch.manual_seed(0)
    v = F.normalize(torch.randn(3, 8), dim=-1)
    image = F.normalize(torch.randn(3, 8), dim=-1)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    text[1] = text[0]
    loss = AlignmentLoss(init_temperature=0.5)
    out = loss(v, image=image, text=text)
    scale = loss.scale()
    caption_pairs = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(out["image_loss"], symmetric_infonce(v, image, scale))
    torch.testing.assert_close(out["text_loss"], symmetric_infonce(v, text, scale, caption_pairs))
    old = duplicate_positives(image, text)  # "same image OR same caption", once used for both
    assert not torch.allclose(out["image_loss"], symmetric_infonce(v, image, scale, old))
    # The same image twice is a positive in the image loss only.
    image[2] = image[0]
    out = loss(v, image=image, text=text)
    image_pairs = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(out["image_loss"], symmetric_infonce(v, image, scale, image_pairs))
    torch.testing.assert_close(out["text_loss"], symmetric_infonce(v, text, scale, caption_pairs))


def test_batchnorm_accumulation_is_refused_and_keeps_running_stats():
    from training.pretrain.step import TrainState

    cfg = _cfg(Path("."), encoder="cnn", encoder_kwargs=TINY_CNN, img_size=16, batch_size=2, accum_freq=2)
    with pytest.raises(TrainingError, match=r"--accum-freq 2 with --encoder cnn: .*BatchNorm.*--accum-freq 1"):
        TrainState.create(cfg, G, DIM, torch.device("cpu"), Precision("fp32", "cpu"))
    # The shared step's cached no-grad pass leaves running statistics alone: after two
    # micro-batches they are those of the two gradient passes only.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    twin = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    twin.load_state_dict(net.state_dict())
    micro = [torch.randn(3, 4), torch.randn(3, 4)]

    def loss_fn(spliced, rest, first):
        return {"loss": spliced[0].pow(2).mean()}

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    accumulate_gradients(micro, net, loss_fn, step=1, precision=Precision("fp32", "cpu"), scaler=scaler, model=net)
    for mb in micro:
        twin(mb)
    torch.testing.assert_close(net[1].running_mean, twin[1].running_mean)
    assert int(net[1].num_batches_tracked) == 2
    with frozen_norm_stats(net):
        net(torch.randn(3, 4) + 5)
    torch.testing.assert_close(net[1].running_mean, twin[1].running_mean)


def test_accumulation_splices_tuple_outputs_like_clip():
    """A forward returning (image, text, scale) with concat=2: the gradient equals one big batch."""
    torch.manual_seed(0)
    img_net, txt_net = nn.Linear(6, 4), nn.Linear(5, 4)
    scale = nn.Parameter(torch.tensor(2.0))
    x, y = torch.randn(6, 6), torch.randn(6, 5)
    params = [*img_net.parameters(), *txt_net.parameters(), scale]

    def forward(mb):
        return F.normalize(img_net(mb[0]), dim=-1), F.normalize(txt_net(mb[1]), dim=-1), scale.exp()

    def loss_fn(spliced, rest, first):
        s = rest[0] if first else rest[0].detach()
        return {"loss": symmetric_infonce(spliced[0], spliced[1], s)}

    grads = []
    for chunks in ([(x, y)], [(x[:3], y[:3]), (x[3:], y[3:])]):
        for p in params:
            p.grad = None
        accumulate_gradients(chunks, forward, loss_fn, step=1, precision=Precision("fp32", "cpu"),
                             scaler=torch.amp.GradScaler("cpu", enabled=False), model=img_net, concat=2)
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(TrainingError, match="at step 7"):
        accumulate_gradients([(x, y)], forward, lambda *a: {"loss": torch.tensor(math.nan)}, step=7,
                             precision=Precision("fp32", "cpu"), scaler=torch.amp.GradScaler("cpu", enabled=False),
                             model=img_net)


class _PositionOnly(nn.Module):
    """Ignores the volume: the projection is the mean caption embedding of the query's position."""

    def __init__(self, data: VolumeSliceDataset):
        super().__init__()
        key = data.rows["plane_index"].to_numpy() * 1000 + data.rows["index"].to_numpy()
        self.table = {int(k): torch.from_numpy(data.text_emb[key == k].mean(0)).float() for k in np.unique(key)}
        self.encoder = lambda vol: torch.zeros(len(vol), 1, 1)
        self.head = lambda tokens, plane, index: torch.stack(
            [self.table[int(p) * 1000 + int(i)] for p, i in zip(plane, index)])


def test_position_alone_scores_chance_on_same_position_retrieval(workdir, caplog):
    rows = captioned_rows(workdir / "manifests" / "v1.parquet", "val")
    from curation.store.embed_store import load_embeddings

    image, text, _ = load_embeddings(workdir, rows, None)
    data = VolumeSliceDataset(workdir, rows, image, text)
    caplog.set_level(logging.INFO, logger="training")
    r = evaluate_volumes(_PositionOnly(data), data, torch.device("cpu"))
    # All slices: the position alone scores far above chance (1/24)...
    assert r["v2t_all_R@1"] > 4 * r["v2t_all_chance@1"] and r["v2t_all_R@5"] > 2 * r["v2t_all_chance@5"], r
    # ...but among the captions at the query's own position it is exactly chance.
    assert r["v2t_R@1"] == pytest.approx(r["v2t_chance@1"], abs=1e-6) and r["v2t_chance@1"] == pytest.approx(0.25)
    assert r["v2t_prior@1"] == pytest.approx(0.25)  # one volume per caption: no majority to guess
    for key in ("v2t_R@1", "v2t_all_R@1", "v2i_R@1", "v2t_median_rank"):
        assert r[f"{key}_blank"] == pytest.approx(r[key]) and r[f"{key}_shuffled"] == pytest.approx(r[key])
    lines = [m for m in caplog.messages if m.startswith("retrieval does not depend on the volume")]
    assert len(lines) == 1 and "blank" in lines[0] and "shuffled" in lines[0]
    assert any("chance 0.250" in m for m in caplog.messages)
    perm = derangement(7, seed=3)
    assert sorted(perm) == list(range(7)) and not (perm == np.arange(7)).any()


def test_variance_share_probe(tmp_path):
    paths = []
    for v in range(3):
        np.save(tmp_path / f"{v}.npy", np.full((4, 4, 4), float(v), np.float32))
        paths.append(f"{v}.npy")

    class Tokens(nn.Module):
        def __init__(self, volume_weight: float):
            super().__init__()
            self.w = volume_weight

        def forward(self, vol):  # token n = n + w * (volume's mean): position plus content
            return torch.arange(4.0)[None, :, None] + self.w * vol.mean((1, 2, 3, 4))[:, None, None]

    dev = torch.device("cpu")
    assert token_variance_share(Tokens(0.0), tmp_path, paths, None, dev) == pytest.approx(0.0)
    # Between = var(0, w, 2w) = 2w^2/3; within = var(0..3) = 1.25.
    assert token_variance_share(Tokens(1.0), tmp_path, paths, None, dev) == pytest.approx((2 / 3) / (2 / 3 + 1.25))
    # Per token position, the volume differences are the same here (they do not average out).
    share, per_token = token_variance_shares(Tokens(1.0), tmp_path, paths, None, dev)
    assert per_token == pytest.approx(share)


def test_default_cli_pretrain_reports_controls_and_probe(workdir, tmp_path):
    from med3dinsight.train import app

    wd = _copy_inputs(workdir, tmp_path / "cli")
    args = ["pretrain", "--workdir", str(wd), "--encoder", "vit", "--img-size", "16", "--epochs", "2",
            "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--warmup", "1", "--lr", "1e-3",
            "--num-queries", str(TINY_HEAD["num_queries"]), "--psat-width", str(TINY_HEAD["psat_width"]),
            "--psat-layers", "1", *[a for k, v in TINY_VIT.items() for a in ("--encoder-arg", f"{k}={v}")]]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "0 -> 4 of 4" in res.output  # --epochs 2: 8 train volumes / batch 4 = 2 steps an epoch
    assert "v2t_R@1 (same position)" in res.output and "v2t_all_R@1 (all slices)" in res.output
    assert "blank" in res.output and "shuffled" in res.output and "between-volume token variance" in res.output
    rows = [json.loads(ln) for ln in (wd / "checkpoints" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    val = next(m for m in rows if "val/v2t_R@1" in m)
    assert {"val/v2t_R@1_blank", "val/v2t_R@1_shuffled", "val/v2t_all_R@1_blank", "val/v2t_all_R@1_shuffled"} <= val.keys()
    assert any("probe/between_volume_share" in m for m in rows)
    res = CliRunner().invoke(app, ["export", "--workdir", str(wd)])
    assert res.exit_code == 0, res.output
    meta = json.loads((wd / "exports" / "vit_encoder.json").read_text())
    assert {"between_volume_share", "between_volume_share_init", "collapsed"} <= meta["probe"].keys()
    assert meta["probe"]["split"] == "held-out" and "between-volume share" in res.output
