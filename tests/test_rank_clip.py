"""`curate rank --features clip` and `--query` end to end with the tiny CLIP (offline, CPU):
render and embed only what is missing, text-guided order checked against open_clip itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from conftest import phantom_ras, ras_affine, write_msd_task
from test_clip import CASES, make_workdir, no_network, tiny_cfg  # noqa: F401  (no_network: autouse fixture)
from typer.testing import CliRunner

from curation.ranking.rank import RankConfig, mixed_prior, query_prior, run_rank
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.embed_store import read_table
from curation.store.manifest import read_manifest
from med3dinsight.curate import app
from training.clip.data import read_rgb
from training.clip.rank_features import ClipRankFeatures
from training.clip.train import train_clip
from training.models.clip_models import register_tiny

G = 32
SIZE = 64  # PNG side for the tests (the tiny CLIP sees 32 px)
QUERY = "a bright round structure in the middle"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny CLIP checkpoint after one optimizer step."""
    w = tmp_path_factory.mktemp("clip")
    make_workdir(w, CASES, per_plane=2)
    train_clip(tiny_cfg(w, batch_size=8, stop_after=1))
    return w / "checkpoints/clip/latest.pt"


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    """Three phantom volumes sliced on a 32 grid (kept pristine; tests copy it)."""
    root = tmp_path_factory.mktemp("sliced")
    cases = {}
    for k in range(3):
        data, label = phantom_ras(seed=k)
        cases[f"c{k}"] = (np.roll(data, 2 * k, axis=1), ras_affine(), np.roll(label, 2 * k, axis=1))
    task = write_msd_task(root / "d", "Task05_Rank", cases)
    w = root / "w"
    run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=G)), log=lambda *_: None)
    return w


@pytest.fixture
def workdir(sliced: Path, ckpt: Path, tmp_path: Path) -> Path:
    w = tmp_path / "w"
    shutil.copytree(sliced, w)
    (w / "checkpoints/clip").mkdir(parents=True)
    shutil.copy(ckpt, w / "checkpoints/clip/final.pt")
    return w


def _rank_cli(w: Path, *args: str):
    return CliRunner().invoke(app, ["rank", "--workdir", str(w), "--render-size", str(SIZE), *args])


def _check_full_ranking(w: Path) -> None:
    df = read_manifest(w / "manifests/slices.parquet")
    assert sorted(df["selection_order"]) == list(range(len(df)))
    for _, g in df.groupby(["volume_id", "plane"]):
        assert sorted(g["vote_rank"]) == list(range(len(g)))


def _direct_embeddings(w: Path, ckpt: Path, paths: list[str], text: str) -> tuple[np.ndarray, np.ndarray]:
    """What open_clip itself computes from the checkpoint (fp32), independent of our code."""
    register_tiny()
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(ckpt))
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(read_rgb(w / p)) for p in paths])
        img = model.encode_image(pixels, normalize=True).numpy()
        txt = model.encode_text(open_clip.get_tokenizer("tiny-clip")([text]), normalize=True)[0].numpy()
    return img, txt


def test_features_clip_renders_and_embeds_only_what_is_missing(workdir: Path, ckpt: Path):
    w = workdir
    slices = read_manifest(w / "manifests/slices.parquet")
    one = slices[slices["volume_id"] == slices["volume_id"].iloc[0]]
    # embed one volume's slices first (as a partial earlier run would have)
    pre = ClipRankFeatures(w, w / "checkpoints/clip/final.pt", device="cpu", render_size=SIZE)
    emb_one = pre.image_embeddings(one)
    assert pre.stats.pngs_rendered == len(one) and pre.stats.images_computed > 0
    fp = pre.stats.fingerprint
    assert len(read_table(w, fp, "image")) == pre.stats.images_computed

    res = _rank_cli(w, "--features", "clip")  # default checkpoint: checkpoints/clip/final.pt
    assert res.exit_code == 0, res.output
    png_dir = w / "cache/png" / str(SIZE)
    n_png = sum(1 for _ in png_dir.rglob("*.png"))
    assert n_png == len(slices)
    stored = read_table(w, fp, "image")
    rendered = read_manifest(w / "manifests/slices.parquet")
    _check_full_ranking(w)
    assert len(rendered) == len(slices)
    computed_now = len(stored) - pre.stats.images_computed
    assert computed_now > 0
    assert f"{len(slices) - len(one)} / {len(one)}" in res.output  # PNGs rendered / reused
    assert f"{computed_now} / {pre.stats.images_computed}" in res.output  # embeddings computed / reused
    meta = pq.read_metadata(w / "manifests/slices.parquet").metadata
    assert meta[b"rank_features"] == b"clip"

    # what the store holds is what open_clip computes from the PNGs
    paths = [f"cache/png/{SIZE}/{v}/{p}_{int(i):03d}.png" for v, p, i in zip(one["volume_id"], one["plane"], one["index"])]
    direct, _ = _direct_embeddings(w, w / "checkpoints/clip/final.pt", paths[:6], QUERY)
    np.testing.assert_allclose(emb_one[:6], direct, atol=3e-3)

    # a rerun renders nothing, embeds nothing, and ranks alike
    before = read_manifest(w / "manifests/slices.parquet")
    res = _rank_cli(w, "--features", "clip")
    assert res.exit_code == 0, res.output
    assert f"0 / {len(slices)}" in res.output  # PNGs
    assert f"0 / {len(stored)}" in res.output  # embeddings
    after = read_manifest(w / "manifests/slices.parquet")
    assert before.equals(after)


def test_query_weight_one_ranks_each_pool_by_image_text_similarity(workdir: Path):
    w = workdir
    ck = w / "checkpoints/clip/final.pt"
    feats = ClipRankFeatures(w, ck, device="cpu", render_size=SIZE)
    cfg = RankConfig(workdir=w, query=QUERY, query_weight=1.0, min_relative_foreground=0.0, edge_margin=0.0)
    s = run_rank(cfg, query_scores=feats.query_scores(QUERY))
    assert s.slices > 0
    df = read_manifest(w / "manifests/slices.parquet")
    _check_full_ranking(w)
    paths = [f"cache/png/{SIZE}/{v}/{p}_{int(i):03d}.png" for v, p, i in zip(df["volume_id"], df["plane"], df["index"])]
    img, txt = _direct_embeddings(w, ck, paths, QUERY)
    cos = img @ txt / np.linalg.norm(img, axis=1) / np.linalg.norm(txt)
    spread = []
    for _, g in df.groupby(["volume_id", "plane"]):
        c = cos[g.index]
        first = g["vote_rank"].to_numpy().argmin()
        # the first pick is the slice whose image matches the text best (within float16 storage)
        assert c[first] >= c.max() - 3e-3
        # and the whole pool goes by decreasing similarity (vote_score = the stored cosine)
        order = g.sort_values("vote_rank")
        assert np.all(np.diff(order["vote_score"].to_numpy()) <= 0)
        np.testing.assert_allclose(g["vote_score"], c, atol=3e-3)
        spread.append(c.max() - c.min())
    assert max(spread) > 1e-2  # the check above had something to tell apart
    # the global order still round-robins: the first 9 picks cover every (volume, plane) with its best match
    head = df.sort_values("selection_order").head(9)
    assert len(set(zip(head["volume_id"], head["plane"]))) == 9 and (head["vote_rank"] == 0).all()

    # a W close to 1 mixes into vote-k and gives the same first pick per pool
    run_rank(RankConfig(workdir=w, query=QUERY, query_weight=0.999, min_relative_foreground=0.0, edge_margin=0.0),
             query_scores=feats.query_scores(QUERY))
    mixed = read_manifest(w / "manifests/slices.parquet")
    best = df.groupby(["volume_id", "plane"])["vote_score"].transform("max")
    assert (df.loc[mixed["vote_rank"] == 0, "vote_score"] == best[mixed["vote_rank"] == 0]).all()
    # W = 0 is the plain voter, the query ignored
    run_rank(RankConfig(workdir=w, query=QUERY, query_weight=0.0), query_scores=feats.query_scores(QUERY))
    w0 = read_manifest(w / "manifests/slices.parquet")
    run_rank(RankConfig(workdir=w))
    plain = read_manifest(w / "manifests/slices.parquet")
    assert w0.equals(plain)
    # deferred (near-empty, edge) slices stay last with W = 1
    run_rank(RankConfig(workdir=w, query=QUERY), query_scores=feats.query_scores(QUERY))
    d = read_manifest(w / "manifests/slices.parquet")
    from curation.ranking.informativeness import defer_mask

    deferred = defer_mask(d)
    assert deferred.any()
    for _, g in d.assign(deferred=deferred).groupby(["volume_id", "plane"]):
        kept = g.loc[~g["deferred"], "vote_rank"]
        if len(kept) and g["deferred"].any():
            assert kept.max() < g.loc[g["deferred"], "vote_rank"].min()


def test_query_prior_and_mixing_are_well_defined():
    import pandas as pd

    frame = pd.DataFrame({"volume_id": ["a"] * 4 + ["b"] * 2, "plane": ["axial"] * 6})
    q = query_prior(np.array([0.30, 0.10, 0.20, 0.20, -1.0, np.nan]), frame)
    np.testing.assert_allclose(q, [1.0, 0.0, 0.5, 0.5, 1.0, 0.0])  # per pool; NaN is the worst
    prior, weight = mixed_prior(None, 0.0, q, 0.75)
    assert weight == pytest.approx(3.0) and np.allclose(prior, q)  # repr + 3 q  ~  0.25 repr + 0.75 q
    atyp = np.array([0.0, 1.0, 0.2, 0.6, 0.0, 0.0])
    prior, weight = mixed_prior(atyp, 2.0, q, 0.5)
    # (1 - W)(repr + min(1, a atyp)) + W q  ~  repr + min(1, a atyp) + q, scaled into [0, 1]
    assert weight == pytest.approx(2.0)
    np.testing.assert_allclose(weight * prior, np.minimum(1, 2 * atyp) + q)
    assert mixed_prior(None, 0.0, None, 0.5) == (None, 0.0)


def test_cli_query_and_errors(workdir: Path, tmp_path: Path):
    w = workdir
    res = _rank_cli(w, "--query", QUERY, "--query-weight", "0.5", "--clip", str(w / "checkpoints/clip/final.pt"))
    assert res.exit_code == 0, res.output
    assert "text-guided, weight 0.5" in res.output
    _check_full_ranking(w)
    meta = pq.read_metadata(w / "manifests/slices.parquet").metadata
    assert meta[b"rank_query"] == b"yes" and meta[b"rank_query_weight"] == b"0.5"
    assert QUERY.encode() not in (w / "manifests/slices.parquet").read_bytes()  # the text is not kept

    def one_line_error(res, code: int, text: str) -> None:
        assert res.exit_code == code, res.output
        assert text in res.output and "Traceback" not in res.output
        assert sum("error:" in line for line in res.output.splitlines()) == 1, res.output

    one_line_error(_rank_cli(w, "--features", "clip", "--clip", "nowhere.pt"), 2, "no such CLIP checkpoint")
    bare = tmp_path / "bare"
    shutil.copytree(w / "manifests", bare / "manifests")
    one_line_error(_rank_cli(bare, "--query", QUERY), 2, "checkpoints/clip/final.pt: no such CLIP checkpoint")
    one_line_error(_rank_cli(w, "--query", QUERY, "--query-weight", "1.5"), 2, "outside [0, 1]")
    one_line_error(_rank_cli(w, "--query-weight", "0.5"), 2, "--query-weight needs --query")
    one_line_error(_rank_cli(w, "--query", "  "), 2, "--query is empty")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    one_line_error(_rank_cli(w, "--features", "clip", "--clip", str(bad)), 2, "not a readable CLIP checkpoint")
    # a display volume gone: one line naming it
    vols = read_manifest(w / "manifests/volumes.parquet")
    shutil.rmtree(w / "cache/png")
    (w / vols["display_path"].iloc[0]).unlink()
    one_line_error(_rank_cli(w, "--features", "clip"), 2, "display volume is missing")
