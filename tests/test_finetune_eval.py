"""`train finetune` evaluation rules: Dice that counts false positives, classes from `_seg` label
files, user-chosen splits (split file, folds) and stratified nested train subsets."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import DiceMetric
from test_finetune import TINY_VIT, _cfg, make_workdir
from typer.testing import CliRunner

from curation.store.manifest import read_manifest
from curation.store.splits import kfold_splits, read_split_file
from training.finetune.data import choose_split, seg_classes, stratified_order, train_subset
from training.finetune.evaluate import dice_per_class, summarize_dice
from training.finetune.train import Finetuner, finetune
from training.loop.errors import TrainingError

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
TINY = [a for k, v in TINY_VIT.items() for a in ("--encoder-arg", f"{k}={v}")]


# ------------------------------------------------------------------------------ the Dice rule


def test_dice_counts_a_class_predicted_on_a_volume_that_lacks_it_as_a_miss():
    y = torch.zeros(4, 4, 4, dtype=torch.long)
    y[:2] = 1  # class 1 present; class 2 absent
    pred = y.clone()
    pred[3, 3, 3] = 2  # one false-positive voxel of class 2
    counted, ignore = dice_per_class(pred, y, 3)
    assert counted.tolist() == [1.0, 0.0]
    assert ignore[0] == 1.0 and np.isnan(ignore[1])
    # the ignore-empty figure is MONAI's ignore_empty=True (the old dice_mean)
    monai = DiceMetric(include_background=False, reduction="none", ignore_empty=True, num_classes=3)
    np.testing.assert_allclose(monai(y_pred=pred[None, None], y=y[None, None]).numpy()[0], ignore)
    # absent from both: not counted
    counted, _ = dice_per_class(y, y, 3)
    assert counted[0] == 1.0 and np.isnan(counted[1])
    # two volumes: class 2 right on one (Dice 1), falsely predicted on the other (0)
    y2 = y.clone()
    y2[3] = 2
    out = summarize_dice([dice_per_class(pred, y, 3), dice_per_class(y2, y2, 3)], ["bg", "a", "b"])
    assert out["dice"] == {"a": 1.0, "b": 0.5} and out["dice_mean"] == 0.75
    assert out["dice_ignore_empty"] == {"a": 1.0, "b": 1.0} and out["dice_mean_ignore_empty"] == 1.0
    assert out["n_volumes_counted"] == {"a": 2, "b": 2}
    # nothing anywhere: no Dice
    empty = torch.zeros(4, 4, 4, dtype=torch.long)
    none = summarize_dice([dice_per_class(empty, empty, 3)], ["bg", "a", "b"])
    assert none["dice_mean"] is None and none["dice"] == {"a": None, "b": None}


def test_a_seg_run_without_dice_is_an_error(tmp_path: Path, monkeypatch):
    w = make_workdir(tmp_path / "w")
    monkeypatch.setattr(Finetuner, "evaluate", lambda self: {"dice_mean": None, "dice": {"cube": None, "bar": None},
                                                               "n_volumes": len(self.test)})
    with pytest.raises(TrainingError, match="no Dice"):
        finetune(_cfg(w, steps=0, name="nodice"))


# ------------------------------------------------------------------ classes from `_seg` files


def _nifti_folder(root: Path, n: int = 4, background_only: bool = False) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        img = rng.uniform(0, 100, (20, 20, 20)).astype(np.float32)
        lab = np.zeros(img.shape, np.uint8)
        if not background_only:
            img[3 + i:11 + i, 5:13, 5:13] += 300
            lab[3 + i:11 + i, 5:13, 5:13] = 1
            if i % 2 == 0:  # the lesion-like class only in some subjects
                img[14:18, 14:18, 14:18] += 600
                lab[14:18, 14:18, 14:18] = 2
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / f"sub{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / f"sub{i}_seg.nii.gz")
    return root


def _slice(folder: Path, w: Path) -> None:
    from med3dinsight.curate import app as curate

    res = CliRunner().invoke(curate, ["slice", "--dataset", "nifti", "--root", str(folder), "--workdir", str(w),
                                      "--grid-size", "32"], env=ENV)
    assert res.exit_code == 0, res.output


def _finetune(w: Path, *extra: str):
    from med3dinsight.train import app as train

    return CliRunner().invoke(train, ["finetune", "--workdir", str(w), "--task", "seg", "--steps", "2",
                                      "--precision", "fp32", "--workers", "0", "--feature-size", "8",
                                      "--batch-size", "2", *TINY, *extra], env=ENV)


def test_seg_on_a_nifti_folder_with_seg_files_through_the_cli(tmp_path: Path):
    w = tmp_path / "w"
    _slice(_nifti_folder(tmp_path / "nii"), w)
    vols = read_manifest(w / "manifests/volumes.parquet")
    assert (vols["label_names"] == "{}").all() and vols["label_volume_path"].notna().all()
    res = _finetune(w, "--folds", "2", "--fold", "0", "--name", "seg")
    assert res.exit_code == 0, res.output
    m = json.loads((w / "checkpoints/finetune/seg/metrics.json").read_text())
    assert set(m["test"]["dice"]) == {"label_1", "label_2"} and m["test"]["dice_mean"] is not None
    assert m["split"]["source"] == "folds" and (m["split"]["folds"], m["split"]["fold"]) == (2, 0)
    assert json.loads((w / "checkpoints/finetune/seg/final.json").read_text())["args"]["out_channels"] == 3
    # a split file by source file name, as nnU-Net's splits_final.json names cases
    split = tmp_path / "splits_final.json"
    split.write_text(json.dumps([{"train": ["sub0", "sub1", "sub2"], "val": ["sub3"]},
                                 {"train": ["sub1", "sub2", "sub3"], "val": ["sub0"]}]))
    res = _finetune(w, "--split-file", str(split), "--fold", "1", "--name", "nn", "--steps", "0")
    assert res.exit_code == 0, res.output
    m = json.loads((w / "checkpoints/finetune/nn/metrics.json").read_text())
    assert m["split"]["source"] == "file" and m["split"]["fold"] == 1 and m["n_test"] == 1
    sub0 = vols.loc[vols["source_path"].str.startswith("sub0."), "case_id"].iloc[0]
    assert m["split"]["test_cases"] == [sub0]


def test_seg_with_background_only_labels_is_one_line_and_fails(tmp_path: Path):
    w = tmp_path / "w"
    _slice(_nifti_folder(tmp_path / "nii", n=2, background_only=True), w)
    res = _finetune(w, "--folds", "2", "--fold", "0")
    assert res.exit_code != 0
    assert "only background" in res.output and len(res.output.strip().splitlines()) == 1


def test_seg_classes_from_names_or_values():
    rows = pd.DataFrame({"label_names": ["{}", "{}"]})
    assert seg_classes(rows, [(0, 1), (0, 3)]) == ["background", "label_1", "label_2", "label_3"]
    named = pd.DataFrame({"label_names": [json.dumps({"0": "bg", "1": "liver"})]})
    assert seg_classes(named, [(0, 1, 2)]) == ["bg", "liver", "label_2"]
    with pytest.raises(TrainingError, match="only background"):
        seg_classes(rows, [(0,), ()])
    with pytest.raises(TrainingError, match="not class indices"):
        seg_classes(rows, [(0, 1000)])


# ----------------------------------------------------------------------------------- splits


def _rows(n: int = 10) -> pd.DataFrame:
    return pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "volume_id": [f"v{i}" for i in range(n)],
                         "source_path": [f"img/case_{i}_0000.nii.gz" for i in range(n)],
                         "source_sha256": [f"s{i}" for i in range(n)], "split": ["train"] * n})


def test_folds_partition_the_cases_deterministically_and_stratified():
    rows = _rows(12)
    strata = {f"c{i}": "lesion" if i < 4 else "" for i in range(12)}
    tests = []
    for k in range(4):
        out, info = choose_split(rows, folds=4, fold=k, strata=strata)
        assert info == {"source": "folds", "folds": 4, "fold": k, "stratified": True}
        test = set(out.loc[out["split"] == "test", "case_id"])
        assert len(test) == 3 and sum(strata[c] == "lesion" for c in test) == 1  # one lesion case per fold
        tests.append(test)
    assert set().union(*tests) == set(rows["case_id"]) and sum(map(len, tests)) == 12
    assert choose_split(rows, folds=4, fold=2, strata=strata)[0].equals(choose_split(rows, folds=4, fold=2, strata=strata)[0])
    # cases sharing a source volume stay in one fold
    dup = kfold_splits(["a", "b", "c", "d"], 2, 0, groups=["x", "x", "y", "z"])
    assert dup["a"] == dup["b"]
    for kw, msg in [(dict(folds=4), "needs --fold"), (dict(folds=4, fold=4), "0..3"), (dict(fold=1), "needs --folds"),
                    (dict(folds=20, fold=0), "only 12 subjects"), (dict(folds=2, fold=0, split_file="x.csv"), "choose one")]:
        with pytest.raises(TrainingError, match=msg):
            choose_split(rows, **kw)


def test_split_files_csv_and_nnunet(tmp_path: Path):
    rows = _rows(5)
    csv = tmp_path / "split.csv"
    csv.write_text("case_id,split\nc0,test\nv1,train\ncase_2,validation\nc3,train\nunknown,test\n")
    out, info = choose_split(rows, split_file=str(csv))
    assert dict(zip(out["case_id"], out["split"])) == {"c0": "test", "c1": "train", "c2": "val", "c3": "train"}
    assert info["source"] == "file" and info["fold"] is None  # c4, unlisted, is left out
    with pytest.raises(TrainingError, match="--fold 1: .* CSV"):
        choose_split(rows, split_file=str(csv), fold=1)
    js = tmp_path / "splits_final.json"
    js.write_text(json.dumps([{"train": ["case_0", "case_1"], "val": ["case_2"]}, {"train": ["case_2"], "val": ["case_0"]}]))
    assert read_split_file(js, 0) == {"case_0": "train", "case_1": "train", "case_2": "test"}
    out, _ = choose_split(rows, split_file=str(js), fold=1)
    assert dict(zip(out["case_id"], out["split"])) == {"c0": "test", "c2": "train"}
    with pytest.raises(TrainingError, match="2 folds: choose one with --fold"):
        choose_split(rows, split_file=str(js))
    bad = tmp_path / "bad.csv"
    for text, msg in [("case,split\nc0,test\n", "needs a header"), ("case_id,split\nc0,holdout\n", "not train, val or test"),
                      ("case_id,split\nzz,test\n", "none of its 1 ids")]:
        bad.write_text(text)
        with pytest.raises(TrainingError, match=msg):
            choose_split(rows, split_file=str(bad))


def test_no_test_volumes_names_the_split_flags(tmp_path: Path):
    w = make_workdir(tmp_path / "w")
    vols = read_manifest(w / "manifests/volumes.parquet")
    train_case = vols.loc[vols["case_id"].map(lambda c: c).index[0], "case_id"]
    with pytest.raises(TrainingError, match="no test volumes.*--split-file F.*--folds N --fold k"):
        finetune(_cfg(w, where=f"case_id = '{train_case}'"))
    csv = tmp_path / "split.csv"
    csv.write_text("case_id,split\n" + "".join(f"{c},{'test' if i < 2 else 'train'}\n" for i, c in enumerate(vols["case_id"])))
    res = finetune(_cfg(w, steps=0, split_file=str(csv), name="file"))
    assert res.n_test == 2 and res.metrics["split"]["source"] == "file"
    assert res.metrics["split"]["test_cases"] == sorted(vols["case_id"][:2])


# ------------------------------------------------------------------ stratified train subsets


def test_train_subsets_keep_the_class_mix_and_are_nested():
    rows = pd.DataFrame({"case_id": [f"c{i:02d}" for i in range(40)], "split": ["train"] * 40})
    strata = {f"c{i:02d}": "1|2" if i % 4 == 0 else "1" for i in range(40)}  # a quarter has the lesion class
    for seed in range(5):
        prev: set[str] = set()
        for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
            sub = set(train_subset(rows, frac, seed, strata)["case_id"])
            n = int(np.ceil(frac * 40))
            assert len(sub) == n and prev <= sub
            lesion = sum(strata[c] == "1|2" for c in sub)
            assert abs(lesion - n / 4) <= 1, (seed, frac, lesion)
            prev = sub
    assert stratified_order(sorted(strata), 0, strata) != stratified_order(sorted(strata), 1, strata)
