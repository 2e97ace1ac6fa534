"""End to end: at one caption budget, does captioning the voter's picks give a better CLIP than random picks?

Cohorts (``bench_lesions.build_task``: warped MNI152 brains, ``--lesions`` synthetic lesions each), disjoint
by subject: a selection cohort (cases s000...) that is sliced and ranked, and a held-out cohort (cases
h000..., another seed) that no arm ever trains on.

Budget B (``--budget``, default ``--budget-frac`` of the selection cohort's eligible slices, i.e. those
`curate rank` does not defer as near-empty or edge slices). Arms, each B slices of the selection cohort:

- ``voter``: the first B of the selection order, exactly what `curate caption --budget B` picks;
- ``random_eligible``: per (volume, plane) pool as many slices as the voter took there, drawn at random from
  the pool's eligible slices (the like-for-like baseline; per-pool counts matched, so only the choice
  within a pool differs);
- ``random_all``: the same counts drawn from all the pool's slices (what random picking without the
  voter's deferral would buy).

A random arm is written as a copy of the ranked workdir whose ``selection_order`` puts its picks first, so
`curate caption` (``captions.release.run_release``, offline captioner, ``--context labels``: an oracle
that names the lesion, its side and size) captions each arm's picks through the same path and budget.
Then `train clip` (``training.clip.train.train_clip``, the tiny open_clip config, random init, the same
steps and batch for every arm) on all of an arm's pairs. Seeds are paired: seed s trains every arm with
seed s, and the random arms' draws change with s.

Held-out evaluation, on every eligible slice of the held-out cohort captioned the same way (queries:
slices; candidates: the distinct held-out captions):

- ``i2t_R@1`` / ``i2t_R@5``: the slice's own caption among the top 1 / 5 (ties broken at random);
- ``group_R@1``: the top caption says the right plane, third of the volume and lesion status (many
  captions differ only in wording or in the lesion's exact area, so exact recall is strict);
- ``lesion_zs_bacc``: zero-shot lesion detection, the top caption's lesion status, balanced accuracy;
- ``probe_bacc``: a lesion / no-lesion logistic probe on the frozen image embeddings, 5-fold cross-fitted
  by held-out subject, balanced accuracy;
- ``t2i_R@1`` / ``t2i_R@5``: per distinct caption (not per subject, so no interval); ``probe_auc``: the
  probe's cross-fitted AUC (no interval).

The untrained model (random init, as every arm starts) is evaluated the same way: the floor.

Differences voter - random_eligible and voter - random_all per metric, with 95% percentile intervals from a
bootstrap that resamples held-out subjects and seeds together (paired: the same draws for both arms).

    .venv/bin/python benchmarks/bench_selection.py [--quick] [--subjects 40] [--held-out 30] [--grid 64]
        [--budget-frac 0.12] [--seeds 5] [--steps 300] [--json out.json] [--keep DIR]

The default size takes about 11 CPU-minutes on one core (torch on one thread); ``--quick`` (3 + 2
subjects, grid 24, 2 seeds, 4 steps) about 20 CPU-seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np
import pandas as pd
import torch
from bench_lesions import build_task

from captions.options import CaptionOptions
from captions.release import run_release
from curation.ranking.config import RankConfig
from curation.ranking.informativeness import defer_mask
from curation.ranking.rank import run_rank
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice
from curation.store.layout import Workdir
from curation.store.manifest import RELEASE_SCHEMA, SLICES_SCHEMA, read_manifest, write_manifest
from training.clip.config import ClipTrainConfig
from training.clip.retrieval import embed_images, embed_texts, hit_probability
from training.clip.train import train_clip
from training.models.clip_models import TINY_CONFIG, create_clip

ARMS = ("voter", "random_eligible", "random_all")
PAIRS = (("voter", "random_eligible"), ("voter", "random_all"))
METRICS = ("i2t_R@1", "i2t_R@5", "group_R@1", "lesion_zs_bacc", "probe_bacc")  # per held-out slice
POINT_METRICS = ("t2i_R@1", "t2i_R@5", "probe_auc")  # not per slice: means over seeds only
LESION = "lesion"


@dataclass(frozen=True)
class Size:
    subjects: int
    held_out: int
    grid: int
    seeds: int
    steps: int
    batch: int
    png: int


SIZES = {
    "default": Size(subjects=40, held_out=30, grid=64, seeds=5, steps=300, batch=32, png=64),
    "quick": Size(subjects=3, held_out=2, grid=24, seeds=2, steps=4, batch=8, png=32),
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --- cohorts ---------------------------------------------------------------------------------------


def sliced_cohort(root: Path, n: int, lesions: int, seed: int, prefix: str, grid: int) -> Path:
    task = build_task(root / f"data-{prefix}", n, lesions, seed, prefix=prefix)
    w = root / f"w-{prefix}"
    run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=grid)), log=lambda *_: None)
    return w


def eligible_mask(slices: pd.DataFrame) -> np.ndarray:
    """What `curate rank` would not defer (its defaults): the slices the voter can pick first."""
    cfg = RankConfig(workdir=Path("."))
    return ~defer_mask(slices, cfg.min_relative_foreground, cfg.edge_margin)


def ok_slices(w: Path) -> pd.DataFrame:
    wd = Workdir(w)
    volumes = read_manifest(wd.volumes_manifest)
    ok = set(volumes.loc[volumes["status"] == "ok", "volume_id"])
    slices = read_manifest(wd.slices_manifest)
    return slices[slices["volume_id"].isin(ok)].reset_index(drop=True)


def has_lesion(labels: Any) -> bool:
    return labels is not None and not isinstance(labels, float) and LESION in [str(x) for x in labels]


# --- arms ------------------------------------------------------------------------------------------


def random_picks(slices: pd.DataFrame, counts: pd.Series, eligible: np.ndarray, rng: np.random.Generator,
                 from_eligible: bool) -> np.ndarray:
    """Row positions: per pool, ``counts[pool]`` slices at random from its eligible slices (then, if too
    few, from its deferred ones) or from all of them."""
    picks = []
    for pool, rows in slices.groupby(["volume_id", "plane"], sort=True).indices.items():
        c = int(counts.get(pool, 0))
        if c == 0:
            continue
        rows = np.asarray(rows)
        if from_eligible:
            first, rest = rng.permutation(rows[eligible[rows]]), rng.permutation(rows[~eligible[rows]])
            picks.append(np.concatenate([first, rest])[:c])
        else:
            picks.append(rng.choice(rows, size=min(c, len(rows)), replace=False))
    return np.concatenate(picks) if picks else np.zeros(0, int)


def arm_workdir(ranked: Path, dest: Path, slices: pd.DataFrame, picks: np.ndarray | None) -> Path:
    """A copy of the ranked workdir (volumes linked) whose selection order puts ``picks`` first
    (``None``: the voter's order, unchanged)."""
    src, wd = Workdir(ranked), Workdir(dest)
    wd.manifests.mkdir(parents=True, exist_ok=True)
    if (ranked / "volumes").exists() and not (dest / "volumes").exists():
        (dest / "volumes").symlink_to((ranked / "volumes").resolve())
    shutil.copy2(src.volumes_manifest, wd.volumes_manifest)
    full = read_manifest(src.slices_manifest)
    if picks is not None:
        order = np.full(len(full), np.nan)
        pos = pd.Series(np.arange(len(full)), index=full["slice_id"].to_numpy())
        chosen = slices["slice_id"].to_numpy()[picks]
        order[pos[chosen].to_numpy()] = np.arange(len(chosen))
        rest = np.flatnonzero(np.isnan(order) & full["selection_order"].notna().to_numpy())
        order[rest] = len(chosen) + np.arange(len(rest))
        full = full.copy()
        full["selection_order"] = pd.array(np.where(np.isnan(order), pd.NA, order), dtype="Int64")
    write_manifest(full, wd.slices_manifest, SLICES_SCHEMA)
    return dest


def caption(w: Path, png: int, budget: int | None) -> pd.DataFrame:
    """`curate caption --provider offline --context labels [--budget B | --all]`; the release rows."""
    opts = CaptionOptions(provider="offline", context="labels", budget=budget, all_slices=budget is None, size=png)
    res = run_release(w, opts)
    if res.out is None:
        raise SystemExit(f"{w}: no release written ({res.held})")
    return read_manifest(res.out)


def training_manifest(w: Path, release: pd.DataFrame) -> Path:
    """All of an arm's pairs as the train split (the subject-wise 7:1:2 split would drop a third)."""
    rows = release.copy()
    rows["split"] = "train"
    rel = Path("manifests") / "train-all.parquet"
    write_manifest(rows, w / rel, RELEASE_SCHEMA)
    return rel


def train(w: Path, manifest: Path, size: Size, seed: int, lr: float) -> Path:
    cfg = ClipTrainConfig(workdir=w, manifest=manifest, model=str(TINY_CONFIG), steps=size.steps,
                          batch_size=size.batch, lr=lr, wd=0.1, warmup=max(1, size.steps // 10), workers=0,
                          precision="fp32", seed=seed, device="cpu", name=f"seed{seed}",
                          log_every=max(1, size.steps), progress=False, save_frequency=0)
    res = train_clip(cfg)
    if res.final_checkpoint is None:
        raise SystemExit(f"{w}: training did not complete")
    return res.final_checkpoint


# --- held-out evaluation -----------------------------------------------------------------------------


def _hits(sim: torch.Tensor, pos: np.ndarray, k: int) -> np.ndarray:
    """Per query: P(a positive among the top k), ties broken at random (training.clip.retrieval)."""
    p = torch.from_numpy(pos)
    best = torch.where(p, sim, torch.full_like(sim, -torch.inf)).max(1).values[:, None]
    greater = ((sim > best) & ~p).sum(1)
    tied_neg = ((sim == best) & ~p).sum(1)
    tied_pos = ((sim == best) & p).sum(1).clamp(min=1)
    return (hit_probability(greater, tied_neg, tied_pos, k) * p.any(1)).numpy().astype(np.float64)


class HeldOut:
    """The held-out slices, their captions and the positives each metric uses."""

    def __init__(self, w: Path, release: pd.DataFrame):
        elig_ids = set(ok_slices(w).loc[lambda d: eligible_mask(d), "slice_id"])
        rows = release[release["slice_id"].isin(elig_ids) & release["caption"].notna()].reset_index(drop=True)
        self.rows = rows
        self.paths = [str(w / p) for p in rows["image_path"]]
        self.subjects = rows["case_id"].astype(str).to_numpy()
        self.lesion = np.array([has_lesion(v) for v in rows["labels_present"]])
        third = np.minimum((rows["position"].to_numpy(np.float64) * 3).astype(int), 2)
        groups = [f"{p}|{t}|{int(le)}" for p, t, le in zip(rows["plane"], third, self.lesion)]
        self.texts = sorted(set(rows["caption"]))
        t_index = {t: i for i, t in enumerate(self.texts)}
        cap = np.array([t_index[c] for c in rows["caption"]])
        n, m = len(rows), len(self.texts)
        self.exact = np.zeros((n, m), bool)
        self.exact[np.arange(n), cap] = True
        g_names = sorted(set(groups))
        g_index = np.array([g_names.index(g) for g in groups])
        text_groups = np.zeros((m, len(g_names)), bool)
        text_groups[cap, g_index] = True
        self.group = text_groups.T[g_index]  # image i, text t: t was written for a slice of i's group
        text_lesion = np.zeros(m, bool)
        text_lesion[cap[self.lesion]] = True
        self.same_status = self.lesion[:, None] == text_lesion[None, :]
        share = self.lesion.mean()
        # balanced accuracy = mean over the two classes: each class weighs one half
        self.balanced = np.where(self.lesion, 0.5 / max(share, 1e-12), 0.5 / max(1 - share, 1e-12)) / n

    def weights(self, metric: str) -> np.ndarray:
        return self.balanced if metric.endswith("bacc") else np.full(len(self.rows), 1.0 / len(self.rows))

    def evaluate(self, checkpoint: Path | None, folds: int = 5, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
        """Per-slice values of METRICS and the POINT_METRICS of one trained model (``None``: the
        untrained model `train clip` starts from with ``seed``, the floor each arm should clear)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import GroupKFold

        if checkpoint is None:
            torch.manual_seed(seed)
            clip = create_clip(str(TINY_CONFIG), None, "cpu")
        else:
            clip = create_clip("tiny-clip", str(checkpoint), "cpu")
        clip.model.eval()
        img = embed_images(clip.model, self.paths, clip.preprocess_val, torch.device("cpu"))
        txt = embed_texts(clip.model, self.texts, clip.tokenizer, torch.device("cpu"))
        sim = img @ txt.T
        per = {
            "i2t_R@1": _hits(sim, self.exact, 1),
            "i2t_R@5": _hits(sim, self.exact, 5),
            "group_R@1": _hits(sim, self.group, 1),
            "lesion_zs_bacc": _hits(sim, self.same_status, 1),
        }
        x, y = img.numpy().astype(np.float64), self.lesion.astype(int)
        prob = np.full(len(y), np.nan)
        n_groups = len(set(self.subjects))
        for tr, te in GroupKFold(n_splits=min(folds, n_groups)).split(x, y, self.subjects):
            if len(set(y[tr])) < 2:
                prob[te] = y[tr].mean()
                continue
            clf = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed).fit(x[tr], y[tr])
            prob[te] = clf.predict_proba(x[te])[:, 1]
        per["probe_bacc"] = ((prob >= 0.5) == self.lesion).astype(np.float64)
        point = {
            "t2i_R@1": float(_hits(sim.T, self.exact.T, 1).mean()),
            "t2i_R@5": float(_hits(sim.T, self.exact.T, 5).mean()),
            "probe_auc": float(roc_auc_score(y, prob)) if 0 < y.sum() < len(y) else float("nan"),
        }
        return per, point


def bootstrap_diff(diff: np.ndarray, weights: np.ndarray, subjects: np.ndarray, reps: int = 2000,
                   seed: int = 0) -> dict[str, Any]:
    """Weighted mean of ``diff`` [seeds, slices] and its 95% percentile interval over resampled held-out
    subjects x seeds (a subject's slices together)."""
    names, inv = np.unique(subjects, return_inverse=True)
    a = np.zeros((diff.shape[0], len(names)))  # per seed, subject: sum of w * d
    for s in range(diff.shape[0]):
        np.add.at(a[s], inv, weights * diff[s])
    c = np.zeros(len(names))
    np.add.at(c, inv, weights)
    point = float(a.sum() / (c.sum() * diff.shape[0]))
    rng = np.random.default_rng(seed)
    ms = rng.multinomial(diff.shape[0], np.full(diff.shape[0], 1 / diff.shape[0]), size=reps).astype(float)
    mj = rng.multinomial(len(names), np.full(len(names), 1 / len(names)), size=reps).astype(float)
    stats = np.einsum("rs,sj,rj->r", ms, a, mj) / (ms.sum(1) * (mj @ c))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"diff": point, "ci95": [float(lo), float(hi)]}


# --- the run ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    size = SIZES["quick" if args.quick else "default"]
    size = Size(subjects=args.subjects or size.subjects, held_out=args.held_out or size.held_out,
                grid=args.grid or size.grid, seeds=args.seeds or size.seeds, steps=args.steps or size.steps,
                batch=args.batch or size.batch, png=size.png)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sel = sliced_cohort(root, size.subjects, args.lesions, args.seed, "s", size.grid)
    run_rank(RankConfig(workdir=sel))
    held = sliced_cohort(root, size.held_out, args.lesions, args.seed + 1, "h", size.grid)
    t_cohorts = time.perf_counter() - t0
    slices = ok_slices(sel)
    eligible = eligible_mask(slices)
    budget = args.budget or max(1, round(args.budget_frac * int(eligible.sum())))
    log(f"cohorts: selection {size.subjects} subjects ({len(slices)} slices, {int(eligible.sum())} eligible), "
        f"held-out {size.held_out} subjects, grid {size.grid}; budget {budget}; {t_cohorts:.0f} s")

    t = time.perf_counter()
    ho = HeldOut(held, caption(held, size.png, None))
    log(f"held-out: {len(ho.rows)} eligible slices captioned, {len(ho.texts)} distinct captions, "
        f"{ho.lesion.mean():.3f} show a lesion; {time.perf_counter() - t:.0f} s")
    sel_volumes = read_manifest(Workdir(sel).volumes_manifest)
    sel_case = set(sel_volumes.loc[sel_volumes["volume_id"].isin(slices["volume_id"]), "case_id"].astype(str))
    held_case = set(ho.subjects)
    if sel_case & held_case:
        raise SystemExit(f"cohorts share subjects: {sorted(sel_case & held_case)}")

    init_per, init_point = ho.evaluate(None, seed=args.seed)
    untrained = {m: float(np.sum(ho.weights(m) * v)) for m, v in init_per.items()} | init_point
    log("untrained (random init): " + " ".join(f"{k} {v:.3f}" for k, v in untrained.items()))
    voter_w = arm_workdir(sel, root / "arm-voter", slices, None)
    voter_rel = caption(voter_w, size.png, budget)
    pool_key = list(zip(voter_rel["volume_id"], voter_rel["plane"]))
    counts = pd.Series(pool_key).value_counts()
    results: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    per_slice: dict[str, list[dict[str, np.ndarray]]] = {a: [] for a in ARMS}
    picks_info: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    voter_manifest = training_manifest(voter_w, voter_rel)
    for seed in range(size.seeds):
        for arm in ARMS:
            t = time.perf_counter()
            if arm == "voter":
                w, rel, manifest = voter_w, voter_rel, voter_manifest
            else:
                rng = np.random.default_rng([args.seed, seed, ARMS.index(arm)])
                picks = random_picks(slices, counts, eligible, rng, from_eligible=arm == "random_eligible")
                w = arm_workdir(sel, root / f"arm-{arm}-{seed}", slices, picks)
                rel = caption(w, size.png, len(picks))
                manifest = training_manifest(w, rel)
            elig_ids = set(slices.loc[eligible, "slice_id"])
            info = {"pairs": len(rel), "distinct_captions": int(rel["caption"].nunique()),
                    "lesion_share": float(np.mean([has_lesion(v) for v in rel["labels_present"]])),
                    "eligible_share": float(rel["slice_id"].isin(elig_ids).mean())}
            ckpt = train(w, manifest, size, seed, args.lr)
            per, point = ho.evaluate(ckpt, seed=seed)
            for f in ckpt.parent.glob("*.pt"):  # no epoch_N.pt (--save-frequency 0); latest.pt goes too
                if f != ckpt:
                    f.unlink()
            per_slice[arm].append(per)
            summary = {m: float(np.sum(ho.weights(m) * v)) for m, v in per.items()} | point
            results[arm].append({"seed": seed, **summary})
            picks_info[arm].append(info)
            if arm != "voter":
                shutil.rmtree(w / "cache", ignore_errors=True)  # this arm's PNGs are not needed again
            log(f"seed {seed} {arm:<15} pairs {info['pairs']} (lesion {info['lesion_share']:.3f}, "
                f"{info['distinct_captions']} captions): " + " ".join(f"{k} {v:.3f}" for k, v in summary.items()
                                                                      if k != "seed")
                + f"  [{time.perf_counter() - t:.0f} s]")
    differences = {}
    for a, b in PAIRS:
        differences[f"{a}-{b}"] = {
            m: bootstrap_diff(np.stack([p[m] for p in per_slice[a]]) - np.stack([p[m] for p in per_slice[b]]),
                              ho.weights(m), ho.subjects, seed=args.seed)
            for m in METRICS
        }
    means = {a: {m: float(np.mean([r[m] for r in results[a]])) for m in METRICS + POINT_METRICS} for a in ARMS}
    return {
        "size": size.__dict__, "budget": budget, "lesions": args.lesions, "seed": args.seed, "lr": args.lr,
        "threads": args.threads,
        "selection_subjects": sorted(sel_case), "held_out_subjects": sorted(held_case),
        "selection_slices": len(slices), "selection_eligible": int(eligible.sum()),
        "held_out_slices": len(ho.rows), "held_out_captions": len(ho.texts),
        "held_out_lesion_share": float(ho.lesion.mean()),
        "arms": list(ARMS), "seeds": list(range(size.seeds)), "metrics": list(METRICS),
        "point_metrics": list(POINT_METRICS), "untrained": untrained, "picks": picks_info, "per_seed": results,
        "means": means,
        "differences": differences,
        "bootstrap": {"unit": "held-out subject x seed", "resamples": 2000, "interval": "95% percentile"},
        "seconds": time.perf_counter() - t0,
    }


def table(out: dict[str, Any]) -> str:
    lines = ["| metric | untrained | " + " | ".join(out["arms"]) + " | " + " | ".join(
        f"{a} - {b} [95% CI]" for a, b in PAIRS) + " |", "|---" * (2 + len(out["arms"]) + len(PAIRS)) + "|"]
    for m in out["metrics"] + out["point_metrics"]:
        cells = [f"{out['untrained'][m]:.3f}"] + [f"{out['means'][a][m]:.3f}" for a in out["arms"]]
        for a, b in PAIRS:
            d = out["differences"][f"{a}-{b}"].get(m)
            if d is None:
                cells.append("-")
            else:
                lo, hi = d["ci95"]
                cells.append(f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]" + ("*" if lo > 0 or hi < 0 else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    picks = " / ".join(f"{np.mean([p['lesion_share'] for p in out['picks'][a]]):.3f}" for a in out["arms"])
    caps = " / ".join(f"{np.mean([p['distinct_captions'] for p in out['picks'][a]]):.0f}" for a in out["arms"])
    elig = " / ".join(f"{np.mean([p['eligible_share'] for p in out['picks'][a]]):.3f}" for a in out["arms"])
    lines.append(f"\nTraining pairs per arm: {out['budget']}; lesion share {picks}; distinct captions {caps}; "
                 f"eligible share {elig} ({' / '.join(out['arms'])}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny size for tests (about a minute)")
    ap.add_argument("--subjects", type=int, default=None, help="selection cohort (default 40; --quick 3)")
    ap.add_argument("--held-out", type=int, default=None, help="held-out cohort (default 30; --quick 2)")
    ap.add_argument("--grid", type=int, default=None, help="slicing grid (default 64; --quick 24)")
    ap.add_argument("--lesions", type=int, default=1)
    ap.add_argument("--budget", type=int, default=None, help="caption budget B (default: --budget-frac x eligible)")
    ap.add_argument("--budget-frac", type=float, default=0.12)
    ap.add_argument("--seeds", type=int, default=None, help="paired seeds (default 5; --quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="CLIP optimizer steps per run (default 300)")
    ap.add_argument("--batch", type=int, default=None, help="CLIP batch size (default 32)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="cohort seed (held-out: seed + 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder (default: a temp one)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # random init is the design here: silence `train clip`'s and open_clip's warnings about it
    # (restored afterwards: a caller in the same process, e.g. a test, keeps its own logging)
    quiet = [logging.getLogger("training.clip.train"), logging.getLogger()]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.keep or Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            out = run(args, root)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    log("\n" + table(out))
    log(f"\ntotal {out['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
