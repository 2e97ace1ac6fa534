"""The offline captioner on a sliced, labelled phantom: captions differ where the slices differ
(structures, sides, sizes, position), are many and deterministic, and say nothing about labels
for volumes without a label map."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ras_affine, write_msd_task

from captions.offline import OFFLINE_PROMPT_VERSION, caption_diversity, context_extras, diversity_line, offline_caption
from captions.release import _context
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.manifest import read_manifest

G = 32


def _bilateral_phantom(shape=(32, 28, 24)):
    """A body with a right-sided blob (label 1), a left-sided one (label 2) and a midline bar
    (label 3) in the lower half; x increases toward the patient's right (RAS)."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x / 0.9) ** 2 + (y / 0.8) ** 2 + (z / 0.85) ** 2 < 1
    data = np.where(body, 350.0 + 150.0 * y + 100.0 * z, 0.0)  # MR-like: a spread of intensities
    right = (x - 0.45) ** 2 + (y - 0.1) ** 2 + (z - 0.3) ** 2 < 0.06
    left = (x + 0.45) ** 2 + (y + 0.1) ** 2 + (z - 0.3) ** 2 < 0.02
    bar = (np.abs(x) < 0.12) & (np.abs(y) < 0.5) & (z < -0.2) & body
    label = np.zeros(shape, np.uint8)
    for value, mask, level in ((1, right, 900.0), (2, left, 800.0), (3, bar, 700.0)):
        data[mask] = level
        label[mask] = value
    rng = np.random.default_rng(0)
    data += np.round(rng.normal(0, 20, size=shape)) * body
    return data.astype(np.float32), label


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    base = tmp_path_factory.mktemp("cap")
    data, label = _bilateral_phantom()
    cases = {"lab": (data, ras_affine(), label), "plain": (np.roll(data, 2, 0), ras_affine(), None)}
    task = write_msd_task(base / "d", "Task09_Caps", cases, modality={"0": "MRI"},
                          labels={"0": "background", "1": "kidney", "2": "cyst", "3": "spine"})
    w = base / "w"
    run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=G)), log=lambda *_: None)
    slices = read_manifest(w / "manifests/slices.parquet")
    vols = read_manifest(w / "manifests/volumes.parquet")
    df = slices.merge(vols[["volume_id", "modality", "body_region", "channel_name", "label_volume_path", "dataset", "subset"]],
                      on="volume_id")
    out = []
    for r in df.to_dict("records"):
        ctx = {**_context(r), **context_extras(r)}
        out.append((r, ctx))
    return out


def test_label_regions_record_side_and_size(rows):
    labelled = [(r, json.loads(r["label_regions"])) for r, _ in rows if isinstance(r.get("label_regions"), str)]
    assert labelled
    sides = {(reg["name"], reg["side"]) for r, regs in labelled if r["plane"] != "sagittal" for reg in regs}
    assert ("kidney", "right") in sides and ("cyst", "left") in sides and ("spine", "midline") in sides
    for r, regs in labelled:
        for reg in regs:
            assert reg["area_mm2"] > 0 and 0 < reg["fraction"] <= 1 and 0 < reg["peak"] <= 1
        assert sorted(reg["name"] for reg in regs) == sorted(r["labels_present"])


def test_captions_differ_where_slices_differ(rows):
    lab = [(r, c) for r, c in rows if isinstance(r.get("label_regions"), str)]
    texts = [offline_caption(c) for _, c in lab]
    stats = caption_diversity(texts)
    # the old captioner gave one text per (plane, third, structure set): a handful here
    old_style = {(r["plane"], int(r["position"] * 3), tuple(r["labels_present"])) for r, _ in lab}
    assert stats["distinct"] >= 3 * len(old_style) and stats["distinct"] > 0.6 * stats["total"]
    assert stats["top_share"] < 0.05
    by_text = {}
    for (r, c), t in zip(lab, texts):
        by_text.setdefault(t, set()).add((r["plane"], tuple(r["labels_present"])))
    assert all(len(v) == 1 for v in by_text.values())  # one text never covers two structure sets
    axial = [(r, t) for (r, _), t in zip(lab, texts) if r["plane"] == "axial"]
    kidney = [t for r, t in axial if r["labels_present"] == ["kidney"]]
    assert kidney and all("kidney on the patient's right" in t for t in kidney)
    cyst = [t for r, t in axial if "cyst" in r["labels_present"]]
    assert cyst and all("cyst on the patient's left" in t for t in cyst)
    spine = [t for r, t in axial if r["labels_present"] == ["spine"]]
    assert spine and all("spine in the midline" in t for t in spine)
    assert any("mm²" in t or "cm²" in t for t in texts)
    assert any("inferior" in t for r, t in axial) and any("superior" in t for r, t in axial)
    none = [t for r, t in axial if not r["labels_present"]]
    assert all("labelled structure" in t for t in none)  # a labelled volume's empty slice says so


def test_unlabelled_volumes_get_no_label_claims(rows):
    plain = [c for r, c in rows if not isinstance(r.get("label_regions"), str)]
    assert plain
    for c in plain:
        text = offline_caption(c)
        low = text.lower()
        assert "label" not in low and "annotated" not in low and "structure" not in low, text
        assert "MRI" in text
    # labels hidden by --context metadata: no claim either, even for the labelled volume
    hidden = [{k: v for k, v in c.items() if k != "labels_present"} for r, c in rows if r.get("labels_present")]
    assert all("kidney" not in offline_caption(c) and "label" not in offline_caption(c).lower() for c in hidden)


def test_deterministic_modality_words_and_phrasings(rows):
    _, ctx = rows[len(rows) // 2]
    assert offline_caption(ctx) == offline_caption(dict(ctx))
    assert OFFLINE_PROMPT_VERSION != "offline-v1"  # old cached captions are not reused
    base = {"plane": "axial", "position": 0.5, "body_region": "brain", "labels_present": []}
    assert "T2-weighted MRI" in offline_caption({**base, "modality": "MR", "channel_name": "T2"})
    assert "FLAIR" in offline_caption({**base, "modality": "MR", "channel_name": "FLAIR"})
    assert offline_caption({**base, "modality": "CT"}).count("CT") >= 1
    starts = {offline_caption({**base, "modality": "CT", "position": p / 100}).split()[0] for p in range(100)}
    assert len(starts) >= 3  # several phrasings


def test_caption_diversity_counts():
    st = caption_diversity(["A b", "a  b", "c", None, " "])
    assert (st["distinct"], st["total"]) == (2, 3) and st["top_share"] == pytest.approx(2 / 3)
    assert "fewer than 20" in diversity_line(st)
    assert caption_diversity([]) == {"distinct": 0, "total": 0, "top_share": 0.0, "top": ""}
