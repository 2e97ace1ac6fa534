"""`train finetune` on a tiny synthetic workdir (32^3 volumes, tiny encoders; CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.networks.nets import UNETR

from curation.store.layout import Workdir
from curation.store.manifest import write_manifest
from curation.store.splits import split_of
from training.finetune.data import train_subset
from training.finetune.nets import load_final
from training.finetune.train import FinetuneConfig, finetune
from training.loop.errors import TrainingError
from training.models.encoders import build_encoder
from training.pretrain.export import export_encoder, load_into_monai

G = 32
# UNETR fixes patch 16 and 12 layers: keep the width tiny instead.
TINY_VIT = dict(hidden_size=32, mlp_dim=32, num_heads=2)
TINY_CNN = dict(block_inplanes=(4, 8, 8, 16), conv1_t_size=3, conv1_t_stride=1)
LABELS = {"0": "background", "1": "cube", "2": "bar"}


def _cases(n_train: int = 4, n_val: int = 1, n_test: int = 2) -> list[str]:
    """Case ids whose (hash) split gives the wanted counts."""
    want = {"train": n_train, "val": n_val, "test": n_test}
    out = []
    for i in range(500):
        c = f"case{i:03d}"
        if want[split_of(c)] > 0:
            want[split_of(c)] -= 1
            out.append(c)
    return out


def make_workdir(root: Path, subset: str = "Task01_Tiny") -> Path:
    """volumes/<id>/volume.npy + label.npy and manifests/volumes.parquet: a bright cube (label 1)
    at a case-specific place and a bar (label 2)."""
    rng = np.random.default_rng(0)
    rows = []
    for v, case in enumerate(_cases()):
        vid = f"{subset.lower()}-{v:02d}"
        vol = rng.uniform(0, 0.1, size=(G,) * 3).astype(np.float32)
        label = np.zeros((G,) * 3, np.uint8)
        x, y, z = rng.integers(4, 18, size=3)
        vol[x:x + 10, y:y + 10, z:z + 10] = 0.9
        label[x:x + 10, y:y + 10, z:z + 10] = 1
        vol[2:30, 28:30, 2:6] = 0.5
        label[2:30, 28:30, 2:6] = 2
        d = Workdir(root).volume_dir(vid)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "volume.npy", vol.astype(np.float16))
        np.save(d / "label.npy", label)
        rows.append(dict(volume_id=vid, dataset="msd", subset=subset, case_id=case, modality="CT", status="ok",
                         volume_path=Workdir(root).rel(d / "volume.npy"), label_volume_path=Workdir(root).rel(d / "label.npy"),
                         label_names=json.dumps(LABELS), grid_size=G, source_sha256=f"sha{v}"))
    path = Workdir(root).volumes_manifest
    old = pd.read_parquet(path) if path.exists() else None
    df = pd.DataFrame(rows) if old is None else pd.concat([old, pd.DataFrame(rows)], ignore_index=True)
    write_manifest(df, path)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("finetune"))


@pytest.fixture(scope="module")
def vit_export(workdir: Path) -> Path:
    torch.manual_seed(1)
    enc = build_encoder("vit", img_size=G, **TINY_VIT)
    with torch.no_grad():  # weights no fresh init could have
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return export_encoder(enc, "vit", enc.config, Workdir(workdir).exports)[1]


def _cfg(workdir: Path, **kw) -> FinetuneConfig:
    base = dict(workdir=workdir, task="seg", encoder="vit", steps=2, batch_size=2, lr=1e-3, precision="fp32",
                progress=False, log_every=1, encoder_kwargs=dict(TINY_VIT), feature_size=8)
    return FinetuneConfig(**{**base, **kw})


def _final(res) -> dict[str, torch.Tensor]:
    return torch.load(res.directory / "final.pt", weights_only=True)


def test_steps_0_from_an_export_is_the_export_and_scratch_differs(workdir: Path, vit_export: Path):
    pre = finetune(_cfg(workdir, steps=0, init=str(vit_export), encoder_kwargs={}, name="pre0"))
    scratch = finetune(_cfg(workdir, steps=0, name="scratch0"))
    exported = load_into_monai(vit_export).vit.state_dict()
    got, fresh = _final(pre), _final(scratch)
    for k, v in exported.items():
        torch.testing.assert_close(got[f"vit.{k}"], v, rtol=0, atol=0)
    assert any(not torch.equal(fresh[f"vit.{k}"], v) for k, v in exported.items())
    # the decoder starts the same for the same seed: only the encoder differs
    dec = [k for k in got if not k.startswith("vit.")]
    assert dec and all(torch.equal(got[k], fresh[k]) for k in dec)
    # final.json rebuilds the network and loads final.pt strictly
    net = load_final(pre.directory / "final.json")
    assert isinstance(net, UNETR)
    meta = json.loads((pre.directory / "final.json").read_text())
    assert meta["class"] == "monai.networks.nets.UNETR" and meta["args"]["out_channels"] == 3
    # metrics.json: {"test": {"dice_mean": x, "dice": {class: x}}}
    m = json.loads((pre.directory / "metrics.json").read_text())
    assert set(m["test"]["dice"]) == {"cube", "bar"} and m["step"] == 0
    assert 0 <= m["test"]["dice_mean"] <= 1 and m["test"]["n_volumes"] == 2
    assert set(m["test"]["dice_ignore_empty"]) == {"cube", "bar"} and m["split"]["source"] == "hash"
    assert m == pre.metrics
    rows = [json.loads(ln) for ln in (pre.directory / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test/dice_mean"] == m["test"]["dice_mean"]


def test_training_lowers_the_loss_and_resume_matches_an_uninterrupted_run(workdir: Path):
    full = finetune(_cfg(workdir, steps=4, name="full"))
    assert full.losses[-1] < full.losses[0]
    part = finetune(_cfg(workdir, steps=4, name="parts", stop_after=2))
    assert part.step == 2 and part.metrics == {} and not (part.directory / "final.pt").exists()
    rest = finetune(_cfg(workdir, steps=4, name="parts", resume="latest"))
    assert (rest.start_step, rest.step) == (2, 4)
    a, b = _final(full), _final(rest)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert json.loads((rest.directory / "metrics.json").read_text())["test"] == full.metrics["test"]
    steps = [json.loads(ln)["step"] for ln in (rest.directory / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]
    with pytest.raises(TrainingError, match="cannot resume: task"):
        finetune(_cfg(workdir, steps=4, name="parts", resume="latest", task="cls", encoder="cnn",
                      encoder_kwargs=dict(TINY_CNN), labels="x.csv"))


def test_cls_with_a_labels_csv(workdir: Path, tmp_path: Path):
    vols = pd.read_parquet(Workdir(workdir).volumes_manifest)
    csv = tmp_path / "labels.csv"
    # label: where the cube sits (learnable from the image)
    csv.write_text("case_id,label\n" + "".join(f"{c},{'a' if i % 2 else 'b'}\n" for i, c in enumerate(vols["case_id"])))
    res = finetune(_cfg(workdir, task="cls", encoder="cnn", encoder_kwargs=dict(TINY_CNN), labels=str(csv), steps=3,
                        name="cls"))
    m = json.loads((res.directory / "metrics.json").read_text())["test"]
    assert set(m) == {"accuracy", "auc", "n_volumes"} and 0 <= m["accuracy"] <= 1
    assert m["auc"] is None or 0 <= m["auc"] <= 1
    net = load_final(res.directory / "final.json")
    assert net(torch.zeros(1, 1, G, G, G)).shape == (1, 2)
    bad = tmp_path / "bad.csv"
    bad.write_text("case,diagnosis\nx,1\n")
    with pytest.raises(TrainingError, match="bad.csv: needs a header with columns case_id,label"):
        finetune(_cfg(workdir, task="cls", encoder="cnn", encoder_kwargs=dict(TINY_CNN), labels=str(bad)))


def test_bad_requests_are_one_line_errors(workdir: Path, vit_export: Path):
    with pytest.raises(TrainingError, match="--task seg --encoder cnn"):
        finetune(_cfg(workdir, encoder="cnn", encoder_kwargs=dict(TINY_CNN)))
    with pytest.raises(TrainingError, match="holds a vit encoder"):
        finetune(_cfg(workdir, encoder="swin", init=str(vit_export), encoder_kwargs={}))
    with pytest.raises(TrainingError, match="--where"):
        finetune(_cfg(workdir, where="no_such_column = 1"))
    with pytest.raises(TrainingError, match="no usable volumes among the volumes --where"):
        finetune(_cfg(workdir, where="subset = 'nothing'"))
    with pytest.raises(TrainingError, match="no such file"):
        finetune(_cfg(workdir, init="exports/missing.json", encoder_kwargs={}))


def test_train_fraction_takes_nested_case_subsets():
    rows = pd.DataFrame({"case_id": [f"c{i}" for i in range(20)], "split": ["train"] * 20})
    small, big = train_subset(rows, 0.25, 0), train_subset(rows, 0.5, 0)
    assert len(small) == 5 and len(big) == 10 and set(small["case_id"]) <= set(big["case_id"])
    assert set(train_subset(rows, 0.25, 1)["case_id"]) != set(small["case_id"])
    with pytest.raises(TrainingError):
        train_subset(rows, 0, 0)


def test_swin_export_goes_into_swinunetr(workdir: Path, tmp_path: Path):
    tiny = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    enc = build_encoder("swin", img_size=2 * G, **tiny)  # SwinUNETR needs >= 64 (volumes are resized)
    _, meta = export_encoder(enc, "swin", enc.config, tmp_path)
    res = finetune(_cfg(workdir, encoder="swin", init=str(meta), encoder_kwargs={}, steps=0, name="swin"))
    net = load_final(res.directory / "final.json")
    assert type(net).__name__ == "SwinUNETR"
    assert set(res.metrics["test"]["dice"]) == {"cube", "bar"}
    with pytest.raises(TrainingError, match="multiple of 32 and >= 64"):
        finetune(_cfg(workdir, encoder="swin", encoder_kwargs=tiny, img_size=G))


def test_batch_dice_pools_the_batch_and_reaches_the_training_loss(workdir: Path):
    """FinetuneConfig.batch_dice: the Dice term is the Dice of the batch taken as one volume (nnU-Net's
    batch Dice), not the mean of per-volume Dice; the option reaches the training loss."""
    from training.finetune.evaluate import seg_loss

    y = torch.zeros(2, 1, 8, 8, 8)
    y[0, 0, 2:4, 2:4, 2:4] = 1  # volume 0 has the class, volume 1 lacks it
    logits = torch.zeros(2, 2, 8, 8, 8)
    logits[:, 0] = 20.0
    logits[0, :, 2:4, 2:4, 2:4] = torch.tensor([-20.0, 20.0]).view(2, 1, 1, 1)  # found
    logits[1, :, 5:7, 5:7, 5:7] = torch.tensor([-20.0, 20.0]).view(2, 1, 1, 1)  # a false positive of 8 voxels
    one = (logits.permute(1, 0, 2, 3, 4).reshape(1, 2, 16, 8, 8), y.permute(1, 0, 2, 3, 4).reshape(1, 1, 16, 8, 8))
    pooled = float(seg_loss(batch_dice=True)(logits, y))  # CE is a voxel mean: the same either way
    assert pooled == pytest.approx(float(seg_loss()(*one)), rel=1e-5)
    # lesion Dice loss: per volume 0 and 1 (mean 0.5), pooled 1 - 2*8 / (8 + 16) = 1/3; background ~0;
    # the Dice term averages the two classes, and the cross-entropy is the same in both
    assert float(seg_loss()(logits, y)) - pooled == pytest.approx((0.5 - 1 / 3) / 2, abs=0.01)
    from training.finetune.train import Finetuner

    assert Finetuner(_cfg(workdir, name="dice-batch", batch_dice=True)).loss_fn.dice.batch is True
    assert Finetuner(_cfg(workdir, name="dice-volume")).loss_fn.dice.batch is False
