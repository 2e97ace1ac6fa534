"""Downstream benchmark: does Med3DInsight pretraining help lesion segmentation? (issue 25)

Two cohorts of warped MNI152 subjects with synthetic lesions in about half of them
(``bench_lesions.make_subject``; ``downstream_data``), disjoint by subject (other seeds, other ids):

- pretraining cohort: `curate slice` -> `curate rank` -> `curate caption --provider offline` with
  ``--context labels`` (an oracle captioner standing in for a VLM that sees the lesion; legitimate
  because no downstream case is described) or ``--context metadata`` (no pathology in the text) ->
  stand-in "CLIP" embeddings (``bench_lesions.standin_embeddings``; not `train embed`: no CLIP runs
  on CPU in minutes) -> `train pretrain` -> `train export`;
- downstream cohort: a fixed test set (>= 150 cases at ``--size cpu``) and a train pool; never
  captioned.

Arms: scratch; psat-labels; psat-metadata; no-pspe and no-psat (labels captions); shuffled (psat,
labels captions, each subject's slices paired with another subject's volume). Each pretrained arm
is pretrained once per pretraining seed; its collapse probe (``training.pretrain.probe``) is reported.

Evaluations, all per test case and paired across arms (same cases, same seeds):
- probe token: a logistic regression on the frozen encoder's tokens (a 1x1x1 linear lesion head at
  token resolution), fit on the train pool; per case the mean log-likelihood of the token labels;
- probe case: a logistic regression on mean-pooled tokens for lesion present/absent; per case the
  probability of the true label;
- finetune n=N: `train finetune --task seg` (UNETR, the API; batch Dice at tiny/cpu/gpu) on N train
  cases (stratified subset of the pool, the fine-tuning seed picks it), per case the lesion Dice with
  false positives counted (a lesion-free case without predicted lesion scores 1), and the same on the
  lesion cases alone. Fine-tuning seed j uses pretraining seed j mod P. Low and mid N come from
  ``--pilot``. Only the size's ``ft_arms`` are fine-tuned (cpu: scratch, psat-labels, psat-metadata,
  shuffled); runs go ``ft_workers`` at a time (cpu: 2 processes of one torch thread).
Differences arm - scratch, mean and 95% interval of a two-way bootstrap (seeds x test cases).

    .venv/bin/python benchmarks/bench_downstream.py --pilot            # scratch Dice at 8, 16, 40 cases x 150 steps
    .venv/bin/python benchmarks/bench_downstream.py --size cpu --out results.json --plot downstream.png
    .venv/bin/python benchmarks/bench_downstream.py --size gpu ...      # ready for one GPU
    .venv/bin/python benchmarks/bench_downstream.py --size cpu --train-sizes none   # linear probes only
    .venv/bin/python benchmarks/bench_downstream.py --size tiny         # the test's (~100 s)

--size cpu (the SIZES comment has the reasons): lesion scale 3.5, 150 pretraining steps, 4 arms x 2
train sizes (8, 16) x 8 seeds = 64 fine-tuning runs of 150 steps. On the shared 2-core machine (load
average 2-7, other jobs beside it) that took 37 min with cohorts and pretraining reused from --keep
(~5 min more from cold; 68 s a run, two at once); at load average ~1 a run took 35 s (two at once),
so ~20 min for the 64 runs. Scratch
fine-tuning there is barely off the floor (lesion-case Dice 0.01-0.02). Results and the pilot:
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import downstream_data as dd
import downstream_eval as de
import numpy as np
import torch

from training.finetune.config import FinetuneConfig
from training.finetune.train import finetune
from training.pretrain.config import PretrainConfig
from training.pretrain.export import export_latest
from training.pretrain.train import pretrain

ARMS = {
    "scratch": None,
    "psat-labels": {"captions": "labels"},
    "psat-metadata": {"captions": "metadata"},
    "no-pspe": {"captions": "labels", "use_pspe": False},
    "no-psat": {"captions": "labels", "use_psat": False},
    "shuffled": {"captions": "shuffled"},
}
ARM_NAMES = list(ARMS)
# The arms fine-tuned at --size tiny/cpu: the ones that answer the question (does aligned pretraining
# help, beyond any pretraining: the shuffled control; do lesion-aware captions matter: metadata).
FT_ARMS = ("scratch", "psat-labels", "psat-metadata", "shuffled")


@dataclass(frozen=True)
class Size:
    pre_subjects: int
    pool: int  # downstream train pool
    n_test: int  # downstream test cases (fixed across arms and seeds)
    grid: int
    vit: dict  # UNETR's ViT: patch 16, 12 layers (fixed by `train finetune --task seg`); width is ours
    feature_size: int
    pre_steps: int
    pre_batch: int
    pre_lr: float
    ft_steps: int
    ft_batch: int
    ft_lr: float
    train_sizes: tuple[int, ...]  # low, mid (from --pilot)
    pre_seeds: int
    ft_seeds: int
    device: str
    lesion_scale: float = dd.LESION_SCALE  # --lesion-scale
    ft_arms: tuple[str, ...] = tuple(ARM_NAMES)  # the arms that are fine-tuned (all arms get the probes)
    ft_workers: int = 1  # fine-tuning runs at once (processes of one torch thread each on the CPU)
    batch_dice: bool = False  # Dice over the batch in the fine-tuning loss (FinetuneConfig.batch_dice)


SIZES = {
    "tiny": Size(pre_subjects=6, pool=6, n_test=6, grid=32, vit={"hidden_size": 16, "mlp_dim": 32, "num_heads": 2},
                 feature_size=4, pre_steps=3, pre_batch=4, pre_lr=1e-3, ft_steps=2, ft_batch=2, ft_lr=1e-3,
                 train_sizes=(4,), pre_seeds=1, ft_seeds=2, device="cpu", ft_arms=FT_ARMS, ft_workers=2,
                 batch_dice=True),
    # --size cpu, for the shared 2-core machine (2026-12-07; benchmarks/README.md has the figures):
    # - lesion scale 3.5 (radii 14-42 mm, 90-650 voxels of 32^3): at scale 2 (15-120 voxels) scratch
    #   fine-tuning predicted no lesion at all at every CPU budget tried;
    # - 150 pretraining steps: the default (psat-labels) encoder did not collapse at this scale for any
    #   of the 3 seeds (between-volume share 0.31-0.47, init 0.50-0.61); 300 and 600 steps did (0.25, 0.09);
    # - fine-tuning 150 steps, lr 3e-3, batch 2, batch Dice (FinetuneConfig.batch_dice), 2 runs at once:
    #   64 runs took 37 min at load average 2-7 (68 s a run; 70-180 s while the load was 5-7); at
    #   load average ~1 a run took 35 s, two at once (150-case scoring included): ~20 min for the 64;
    # - train sizes 8 and 16 of the pool of 40 (--pilot: scratch at 40 cases predicted no lesion in
    #   both seeds; at 8 and 16 it predicts some, lesion-case Dice 0.02: barely off the floor);
    # - fine-tuned arms: scratch, psat-labels, psat-metadata, shuffled (no-pspe and no-psat: probes only).
    "cpu": Size(pre_subjects=32, pool=40, n_test=150, grid=32, vit={"hidden_size": 32, "mlp_dim": 64, "num_heads": 2},
                feature_size=8, pre_steps=150, pre_batch=8, pre_lr=1e-3, ft_steps=150, ft_batch=2, ft_lr=3e-3,
                train_sizes=(8, 16), pre_seeds=3, ft_seeds=8, device="cpu", lesion_scale=3.5,
                ft_arms=FT_ARMS, ft_workers=2, batch_dice=True),
    # One GPU: untested (no GPU run yet); the CPU-side curation (rank, captions) of 64 subjects takes
    # ~7 min on one core, fine-tuning 96 runs of 400 steps at 64^3.
    "gpu": Size(pre_subjects=64, pool=80, n_test=160, grid=64, vit={"hidden_size": 192, "mlp_dim": 768, "num_heads": 6},
                feature_size=16, pre_steps=1000, pre_batch=16, pre_lr=1e-3, ft_steps=400, ft_batch=4, ft_lr=1e-3,
                train_sizes=(16, 48), pre_seeds=3, ft_seeds=8, device="auto", batch_dice=True),
}

PRE_SEED, DOWN_SEED = 1001, 2002  # cohort seeds: different subjects in each cohort
TEXT = ["random"]  # --text-embeddings


def eval_device(size: Size) -> str:
    """Where the per-case evaluation and the probes' forward passes run."""
    if size.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return size.device


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def downstream(root: Path, size: Size):
    """The downstream workdir, its rows, a split file (test fixed, rest train) and the loaded volumes."""
    w = dd.build_cohort(root / "down", "d", size.pool + size.n_test, DOWN_SEED, size.grid,
                        lesion_scale=size.lesion_scale)
    rows = de.downstream_rows(w)
    order = np.random.default_rng(7).permutation(len(rows))
    test_idx, pool_idx = np.sort(order[:size.n_test]), np.sort(order[size.n_test:])
    x, y = de.load_all(w, rows, size.grid)
    # `train finetune` scores its own test split too; it gets 4 of the test cases (2 with a lesion) as a
    # monitor, and every test case is scored here per case (one forward pass each, not two).
    lesion = (y.flatten(1).amax(1) > 0).numpy()
    monitor = set([i for i in test_idx if lesion[i]][:2] + [i for i in test_idx if not lesion[i]][:2])
    split = root / "split.csv"
    with split.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["case_id", "split"])
        for i in sorted(set(pool_idx) | monitor):
            wr.writerow([rows["case_id"].iloc[i], "test" if i in monitor else "train"])
    return w, rows, split, x, y, test_idx, pool_idx


def pretrain_arm(root: Path, arm: str, seed: int, size: Size, caption_dirs: dict) -> tuple[str, dict]:
    """The export of ``arm`` pretrained with ``seed`` (reused when there) and its collapse probe
    (``training.pretrain.probe``: between-volume share of token variance, trained and fresh init)."""
    spec = dict(ARMS[arm])
    src = caption_dirs[spec.pop("captions")]
    vw = root / f"pre-{arm}-s{seed}"
    out = vw / "exports"
    done = sorted(out.glob("*.json")) if out.exists() else []
    if done:
        return str(done[-1]), read_probe(vw)
    vw.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name not in ("checkpoints", "exports") and not (vw / p.name).exists():
            (vw / p.name).symlink_to(p.resolve())
    cfg = PretrainConfig(workdir=vw, encoder="vit", encoder_kwargs=dict(size.vit), steps=size.pre_steps,
                         batch_size=size.pre_batch, lr=size.pre_lr, warmup=max(1, size.pre_steps // 10),
                         precision="fp32" if size.device == "cpu" else "amp", workers=0, num_queries=16,
                         psat_width=64, psat_layers=1, psat_heads=4, seed=seed, splits="train,val", val_split="test",
                         log_every=max(1, size.pre_steps // 5), ckpt_every=size.pre_steps, progress=False,
                         device=size.device, **spec)
    res = pretrain(cfg)
    probe = read_probe(vw)
    log(f"  pretrain {arm} seed {seed}: loss {np.mean(res.losses[:5]):.3f} -> {np.mean(res.losses[-5:]):.3f}; "
        f"between-volume share {probe.get('between_volume_share', float('nan')):.3f} (init "
        f"{probe.get('between_volume_share_init', float('nan')):.3f}){' collapsed' if probe.get('collapsed') else ''}")
    return str(export_latest(vw, out_dir=out)[1]), probe


def read_probe(vw: Path) -> dict:
    """The last collapse-probe row of a pretraining run's metrics.jsonl (empty when none)."""
    probe: dict = {}
    for m in sorted(vw.glob("checkpoints/pretrain/**/metrics.jsonl")):
        for line in m.read_text().splitlines():
            row = json.loads(line)
            if any(k.startswith("probe/") for k in row):
                probe = {k[len("probe/"):]: v for k, v in row.items() if k.startswith("probe/")}
    return probe


def run_finetune(w: Path, split: Path, init: str, n_train: int, n_pool: int, seed: int, size: Size, name: str,
                 steps: int | None = None):
    steps = steps or size.ft_steps
    cfg = FinetuneConfig(workdir=w, task="seg", encoder="vit", init=init, train_fraction=min(1.0, n_train / n_pool),
                         split_file=str(split), steps=steps, batch_size=size.ft_batch, lr=size.ft_lr,
                         warmup=max(1, steps // 15), batch_dice=size.batch_dice,
                         precision="fp32" if size.device == "cpu" else "amp", seed=seed, name=name,
                         feature_size=size.feature_size, encoder_kwargs=dict(size.vit) if init == "scratch" else {},
                         workers=0 if size.device == "cpu" else 4, progress=False, device=size.device,
                         log_every=10**6, ckpt_every=10**6)
    res = finetune(cfg)
    return res, res.directory / "final.json"


# Fine-tuning runs in worker processes (--size cpu: two at once on the 2 cores, one torch thread each:
# two threads in one run were 3-5x slower per step there, contention). Each worker gets the test
# volumes once and scores every test case itself.
_WORKER: dict = {}


def _worker_init(xt: torch.Tensor, yt: torch.Tensor, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(xt=xt, yt=yt.long())


def _worker_run(job: dict) -> tuple[list[float], float, float]:
    """One fine-tuning run -> (per-test-case Dice, seconds, the run's last training loss)."""
    t = time.time()
    res, fj = run_finetune(**job)
    pc = de.per_case_dice(fj, _WORKER["xt"], _WORKER["yt"], eval_device(job["size"]))
    return pc.tolist(), time.time() - t, float(np.mean(res.losses[-10:])) if res.losses else float("nan")


def finetune_all(jobs: dict, xt: torch.Tensor, yt: torch.Tensor, size: Size, done=None) -> dict:
    """Run ``jobs`` ({key: run_finetune kwargs}) ``size.ft_workers`` at a time; ``done(key, result)``
    is called as each finishes; returns {key: (per-case Dice, seconds, last loss)}."""
    out = {}
    if size.ft_workers <= 1 or eval_device(size) != "cpu":
        _worker_init(xt, yt, torch.get_num_threads())
        for k, job in jobs.items():
            out[k] = _worker_run(job)
            if done:
                done(k, out[k])
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(size.ft_workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(xt, yt.to(torch.uint8), 1)) as ex:
        futs = {ex.submit(_worker_run, job): k for k, job in jobs.items()}
        for f in as_completed(futs):
            out[futs[f]] = f.result()
            if done:
                done(futs[f], out[futs[f]])
    return out


def pilot(root: Path, size: Size, sizes: list[int], steps: list[int], seeds: int) -> list[dict]:
    w, _, split, x, y, test_idx, pool_idx = downstream(root, size)
    xt, yt = x[test_idx], y[test_idx]
    lesion = (yt.flatten(1).amax(1) > 0).numpy()
    log(f"pilot: scratch, {len(test_idx)} test cases ({int(lesion.sum())} with a lesion), pool {len(pool_idx)}; "
        f"lr {size.ft_lr}, batch {size.ft_batch}, batch Dice {size.batch_dice}, lesion scale {size.lesion_scale}")
    jobs = {(n, st, s): {"w": w, "split": split, "init": "scratch", "n_train": n, "n_pool": len(pool_idx), "seed": s,
                         "size": size, "name": f"pilot-n{n}-t{st}-lr{size.ft_lr:g}-bd{int(size.batch_dice)}-s{s}",
                         "steps": st}
            for s in range(seeds) for n in sizes for st in steps}
    res = finetune_all(jobs, xt, yt, size, lambda k, r: log(f"  n={k[0]} steps={k[1]} seed {k[2]}: Dice "
                                                            f"{np.mean(r[0]):.3f}, lesion cases "
                                                            f"{np.asarray(r[0])[lesion].mean():.3f}, {r[1]:.0f} s"))
    rows = []
    print("| train cases | steps | Dice per case (FP counted; per seed) | Dice on lesion cases | lesion-free cases "
          "kept clean | s/run |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        for st in steps:
            pcs = np.asarray([res[(n, st, s)][0] for s in range(seeds)])
            secs = [res[(n, st, s)][1] for s in range(seeds)]
            row = {"n": n, "steps": st, "dice": float(pcs.mean()), "dice_lesion": float(pcs[:, lesion].mean()),
                   "clean": float(pcs[:, ~lesion].mean()), "seconds": float(np.mean(secs)),
                   "per_seed": pcs.mean(1).tolist()}
            rows.append(row)
            print(f"| {n} | {st} | {row['dice']:.3f} ({' '.join(f'{v:.2f}' for v in row['per_seed'])}) | "
                  f"{row['dice_lesion']:.3f} | {row['clean']:.3f} | {row['seconds']:.0f} |", flush=True)
    return rows


def run(root: Path, size: Size, arms: list[str]) -> dict:
    t0 = time.time()
    w, rows, split, x, y, test_idx, pool_idx = downstream(root, size)
    case_y = (y.flatten(1).amax(1) > 0).numpy().astype(int)
    tok_y = de.token_labels(y)
    log(f"downstream cohort: {len(rows)} cases ({int(case_y.sum())} with a lesion), test {len(test_idx)}, "
        f"pool {len(pool_idx)}; {time.time() - t0:.0f} s")
    pw = dd.build_cohort(root / "pre", "p", size.pre_subjects, PRE_SEED, size.grid, lesion_scale=size.lesion_scale)
    ranked = dd.ranked(pw, root / "pre-ranked")
    caption_dirs = {c: dd.caption_arm(ranked, root / f"pre-{c}", c, TEXT[0]) for c in ("labels", "metadata")}
    caption_dirs["shuffled"] = dd.shuffle_volumes(caption_dirs["labels"], root / "pre-shuffled")
    log(f"pretraining cohort: {size.pre_subjects} subjects, captioned twice; {time.time() - t0:.0f} s")
    inits, probes = {}, {}
    for s in range(size.pre_seeds):
        for a in arms:
            if ARMS[a] is None:
                inits[(a, s)] = "scratch"
            else:
                inits[(a, s)], probes[(a, s)] = pretrain_arm(root, a, s, size, caption_dirs)
    collapse = {a: [probes[(a, s)] for s in range(size.pre_seeds)] for a in arms if ARMS[a] is not None}
    log(f"pretrained {len(arms) - 1} arms x {size.pre_seeds} seeds; {time.time() - t0:.0f} s; collapsed: "
        + ", ".join(f"{a} {sum(bool(p.get('collapsed')) for p in ps)}/{len(ps)}" for a, ps in collapse.items()))
    per_case: dict = {"probe token": {a: [] for a in arms}, "probe case": {a: [] for a in arms}}
    for s in range(size.pre_seeds):
        for a in arms:
            enc = de.encoder_for(inits[(a, s)], s, size.grid, size.vit)
            pr = de.linear_probes(de.tokens(enc, x, eval_device(size)), tok_y, case_y, pool_idx, test_idx)
            per_case["probe token"][a].append(pr["token_ll"].tolist())
            per_case["probe case"][a].append(pr["case_p"].tolist())
    t_probe = time.time() - t0
    log(f"linear probes done; {t_probe:.0f} s")
    for ev in ("probe token", "probe case"):
        log(f"  {ev}: " + ", ".join(f"{a} {np.mean(per_case[ev][a]):.3f}" for a in arms))
    xt, yt = x[test_idx], y[test_idx]
    lesion = case_y[test_idx].astype(bool)
    ft_arms = [a for a in arms if a in size.ft_arms]
    jobs = {(n, j, a): {"w": w, "split": split, "init": inits[(a, j % size.pre_seeds)], "n_train": n,
                        "n_pool": len(pool_idx), "seed": j, "size": size, "name": f"{a}-n{n}-s{j}"}
            for j in range(size.ft_seeds) for n in size.train_sizes for a in ft_arms}  # seed-major: partials pair
    log(f"fine-tuning {len(jobs)} runs ({', '.join(ft_arms)} x train sizes {size.train_sizes} x {size.ft_seeds} "
        f"seeds), {size.ft_workers} at a time")
    partial: dict = {}

    def done(k, r):
        partial[k] = r
        n, j, a = k
        log(f"  finetune n={n} seed {j} {a}: Dice {np.mean(r[0]):.3f}, lesion cases "
            f"{np.asarray(r[0])[lesion].mean():.3f}, last loss {r[2]:.3f}, {r[1]:.0f} s")
        rows_done = {str(kk): v[0] for kk, v in partial.items()}
        (root / "partial.json").write_text(json.dumps({"arms": ft_arms, "per_case": rows_done}) + "\n")

    res = finetune_all(jobs, xt, yt, size, done)
    for n in size.train_sizes:
        per_case[f"finetune n={n}"] = {a: [res[(n, j, a)][0] for j in range(size.ft_seeds)] for a in ft_arms}
    ft_seconds = [r[1] for r in res.values()]
    summary = de.summarize(per_case, arms)
    lesion_only = {ev: {a: [np.asarray(r)[lesion].tolist() for r in by[a]] for a in by}
                   for ev, by in per_case.items() if ev.startswith("finetune") and lesion.any()}
    test_ids = rows["case_id"].iloc[test_idx].astype(str).tolist()
    return {"arms": arms, "ft_arms": ft_arms, "summary": summary, "per_case": per_case,
            "summary_lesion_cases": de.summarize(lesion_only, arms), "test_cases": test_ids,
            "test_lesion": case_y[test_idx].tolist(), "seconds": round(time.time() - t0, 1),
            "seconds_to_probes": round(t_probe, 1),
            "finetune_run_seconds_mean": float(np.mean(ft_seconds)) if ft_seconds else None,
            "pretrain_probe": {a: ps for a, ps in collapse.items()}}


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--ft-arms", default=None, help="the arms fine-tuned (default: the size's; all: every arm)")
    ap.add_argument("--pre-seeds", type=int, default=None)
    ap.add_argument("--pre-steps", type=int, default=None)
    ap.add_argument("--pre-lr", type=float, default=None)
    ap.add_argument("--ft-seeds", type=int, default=None)
    ap.add_argument("--ft-steps", type=int, default=None)
    ap.add_argument("--ft-lr", type=float, default=None)
    ap.add_argument("--ft-workers", type=int, default=None, help="fine-tuning runs at once (CPU: processes)")
    ap.add_argument("--batch-dice", choices=("on", "off"), default=None,
                    help="Dice over the batch in the fine-tuning loss (default: the size's)")
    ap.add_argument("--train-sizes", default=None,
                    help="comma-separated train-case counts (default: the size's); none: linear probes only")
    ap.add_argument("--pilot", action="store_true", help="scratch only: Dice vs train size and steps")
    ap.add_argument("--pilot-sizes", default="8,16,40")
    ap.add_argument("--pilot-steps", default="150")
    ap.add_argument("--pilot-seeds", type=int, default=2)
    ap.add_argument("--lesion-scale", type=float, default=None,
                    help="lesion size factor over bench_lesions' 4-12 mm radii (default: the size's; a new --keep "
                         "folder per value)")
    ap.add_argument("--text-embeddings", choices=("random", "bow", "clip"), default="random",
                    help="caption embeddings: stand-ins (a random vector per caption, bench_lesions'; a bag of "
                         "words) or clip (a small CLIP trained by `train clip` on the pretraining cohort, embedded "
                         "by `train embed`); a new --keep folder per value")
    ap.add_argument("--out", type=Path, default=None, help="write every per-case result as JSON")
    ap.add_argument("--plot", type=Path, default=None, help="PNG forest plot of the paired differences")
    ap.add_argument("--keep", type=Path, default=None, help="work here (kept; reruns reuse cohorts, exports)")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    over = {k: v for k, v in (("pre_seeds", args.pre_seeds), ("ft_seeds", args.ft_seeds), ("ft_steps", args.ft_steps),
                              ("pre_steps", args.pre_steps), ("pre_lr", args.pre_lr), ("ft_lr", args.ft_lr),
                              ("ft_workers", args.ft_workers),
                              ("lesion_scale", args.lesion_scale)) if v is not None}
    if args.batch_dice:
        over["batch_dice"] = args.batch_dice == "on"
    if args.ft_arms:
        over["ft_arms"] = tuple(ARMS) if args.ft_arms == "all" else tuple(a for a in args.ft_arms.split(",") if a)
    if args.train_sizes:
        over["train_sizes"] = () if args.train_sizes == "none" else tuple(int(v) for v in args.train_sizes.split(","))
    size = replace(size, **over)
    TEXT[0] = args.text_embeddings
    arms = [a for a in args.arms.split(",") if a]
    if "scratch" not in arms or any(a not in ARMS for a in arms + list(size.ft_arms)) or "scratch" not in size.ft_arms:
        raise SystemExit(f"--arms / --ft-arms: subsets of {','.join(ARMS)} that include scratch")
    if size.device == "cpu":
        # one thread: on the shared 2-core machine two threads ran a UNETR step 3-5x slower (contention)
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    command = "benchmarks/bench_downstream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"{command}\n  {asdict(size)}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.pilot:
            t0 = time.time()
            rows = pilot(root, size, [int(v) for v in args.pilot_sizes.split(",")],
                         [int(v) for v in args.pilot_steps.split(",")], args.pilot_seeds)
            log(f"pilot: {time.time() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")
            if args.out:
                args.out.write_text(json.dumps({"command": command, "config": asdict(size), "pilot": rows,
                                                "seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
            return None
        out = run(root, size, arms)
    out.update(size=args.size, config=asdict(size), command=command,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               load_average=os.getloadavg())
    print(f"\n{out['date']}, {out['seconds']:.0f} s, load average {out['load_average'][0]:.1f}: `{command}`")
    print(f"test cases: {len(out['test_cases'])} ({sum(out['test_lesion'])} with a lesion); seeds: pretraining "
          f"{size.pre_seeds}, fine-tuning {size.ft_seeds}; diff = arm - scratch, mean [95% two-way bootstrap "
          f"over seeds x cases], * = interval excludes 0; - = not fine-tuned")
    print("probe token: mean log-likelihood of token lesion labels; probe case: p(true present/absent); "
          "finetune: lesion Dice per case, false positives counted, empty-empty = 1")
    out["table"] = de.table(out["summary"], arms)
    print(out["table"])
    if out["summary_lesion_cases"]:
        out["table_lesion_cases"] = de.table(out["summary_lesion_cases"], arms)
        print("\nfine-tuning, lesion cases only (Dice of the lesion):\n" + out["table_lesion_cases"])
    print("\npretraining collapse probe (between-volume share of token variance, trained / fresh init; "
          "collapsed = under half the init's):")
    for a, ps in out["pretrain_probe"].items():
        print(f"  {a}: " + "; ".join(f"{p.get('between_volume_share', float('nan')):.3f} / "
                                    f"{p.get('between_volume_share_init', float('nan')):.3f}"
                                    f"{' collapsed' if p.get('collapsed') else ''}" for p in ps))
    out["contrasts"] = de.contrasts(out["per_case"], arms)
    if out["contrasts"]:
        out["contrast_table"] = de.contrast_table(out["contrasts"])
        print("\nbetween pretrained arms (same pairing):\n" + out["contrast_table"])
    if args.plot:
        out["plot"] = str(de.plot(out["summary"], arms, args.plot, f"arm - scratch, {out['date']}, --size {args.size}"))
        print(f"plot: {out['plot']}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return out


if __name__ == "__main__":
    main()
