"""bench_downstream.py --text-embeddings clip: a caption arm trains a tiny CLIP (`train clip`, random
init, no hub weights) and caches its embeddings (`train embed`); no stand-in store is written, and
`train pretrain` (``--embeddings`` unset) aligns to the CLIP's embeddings, in the volume-shuffled copy
too. A 4-subject cohort, 10 CLIP steps, 2 pretraining steps."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

pytest.importorskip("nilearn")


def test_clip_arm_writes_clip_embeddings_that_pretrain_uses(tmp_path, monkeypatch, capsys):
    import downstream_data as dd
    import torch

    from curation.store.embed_store import latest_fingerprint, load_embeddings
    from curation.store.manifest import read_manifest
    from training.pretrain.config import PretrainConfig
    from training.pretrain.train import pretrain

    monkeypatch.setattr(dd, "CLIP_STEPS", 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ranked = dd.ranked(dd.build_cohort(tmp_path / "pre", "p", 4, 1001, 32), tmp_path / "ranked")
        capsys.readouterr()
        arm = dd.caption_arm(ranked, tmp_path / "labels", "labels", "clip")
        said = capsys.readouterr().out.splitlines()
        rec = json.loads((arm / dd.CLIP_RECORD).read_text())
        fp = rec["fingerprint"]
        assert rec["model"] == "tiny-clip" and rec["steps"] == 10 and rec["config"] == str(dd.TINY_CLIP)
        assert any("train clip labels: 10 steps" in s and fp[:12] in s for s in said), said
        # the store is the CLIP's, it is the latest, and no stand-in table exists
        assert latest_fingerprint(arm) == fp
        assert not (arm / "embeddings" / "standin").exists()
        meta = json.loads((arm / "embeddings" / fp / "meta.json").read_text())
        assert meta["model"] == "tiny-clip" and meta["dim"] == 32
        ckpt = torch.load(rec["checkpoint"], weights_only=True)
        assert ckpt["fingerprint"] == fp and ckpt["model"] == "tiny-clip"
        df = read_manifest(arm / "manifests" / "v1.parquet")
        img, txt, got = load_embeddings(arm, df[~df["refused"].astype(bool) & df["caption"].notna()])
        assert got == fp and img.shape[1] == txt.shape[1] == 32 and len(img) > 100
        # rerunning the arm reuses it (no second CLIP)
        assert dd.caption_arm(ranked, tmp_path / "labels", "labels", "clip") == arm
        assert json.loads((arm / dd.CLIP_RECORD).read_text()) == rec

        shuffled = dd.shuffle_volumes(arm, tmp_path / "shuffled")
        assert latest_fingerprint(shuffled) == fp
        for w in (arm, shuffled):
            vit = {"hidden_size": 16, "mlp_dim": 32, "num_heads": 2}
            cfg = PretrainConfig(workdir=w, encoder="vit", encoder_kwargs=vit, steps=2, batch_size=2, lr=1e-3,
                                 warmup=1, precision="fp32", workers=0, num_queries=4, psat_width=16, psat_layers=1,
                                 psat_heads=2, seed=0, splits="train,val", val_split="test", log_every=1, ckpt_every=2,
                                 progress=False, device="cpu")
            res = pretrain(cfg)
            assert res.step == 2
            assert torch.load(res.checkpoint, weights_only=False)["embeddings"] == fp
    finally:
        torch.set_num_threads(threads)
