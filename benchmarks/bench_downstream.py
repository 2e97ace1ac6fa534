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
is pretrained once per pretraining seed.

Evaluations, all per test case and paired across arms (same cases, same seeds):
- probe token: a logistic regression on the frozen encoder's tokens (a 1x1x1 linear lesion head at
  token resolution), fit on the train pool; per case the mean log-likelihood of the token labels;
- probe case: a logistic regression on mean-pooled tokens for lesion present/absent; per case the
  probability of the true label;
- finetune n=N: `train finetune --task seg` (UNETR, the API) on N train cases (stratified subset of
  the pool, the fine-tuning seed picks it), per case the lesion Dice with false positives counted
  (a lesion-free case without predicted lesion scores 1). Fine-tuning seed j uses pretraining seed
  j mod P. Low and mid N come from ``--pilot``.
Differences arm - scratch, mean and 95% interval of a two-way bootstrap (seeds x test cases).

    .venv/bin/python benchmarks/bench_downstream.py --pilot            # scratch Dice vs train size, steps
    .venv/bin/python benchmarks/bench_downstream.py --size cpu --out results.json --plot downstream.png
    .venv/bin/python benchmarks/bench_downstream.py --size gpu ...      # ready for one GPU
    .venv/bin/python benchmarks/bench_downstream.py --size cpu --train-sizes none   # linear probes only (~10 min)
    .venv/bin/python benchmarks/bench_downstream.py --size tiny         # the test's (< ~90 s)

On the shared 2-core CPU the probes take ~10 min; fine-tuning from scratch stayed at the floor in the
pilot (lesion Dice 0 up to 40 cases x 300 steps), so the full --size cpu (96 fine-tuning runs of 300
steps, ~100 s each) takes hours: the fine-tuning comparison is sized for --size gpu. Results and the
pilot: benchmarks/README.md.
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
    ft_steps: int
    ft_batch: int
    ft_lr: float
    train_sizes: tuple[int, ...]  # low, mid (from --pilot)
    pre_seeds: int
    ft_seeds: int
    device: str


# --size cpu: the linear probes take ~10 min on the shared 2 cores (`--train-sizes none`); the pilot
# found scratch fine-tuning at the floor (lesion Dice 0) up to 40 cases x 300 steps at lesion scale 2
# and barely off it (0.02) at --lesion-scale 3.5, and a 300-step run takes ~100 s there, so the full
# 96 fine-tuning runs take hours on CPU: the fine-tuning comparison is for --size gpu.
SIZES = {
    "tiny": Size(pre_subjects=6, pool=6, n_test=6, grid=32, vit={"hidden_size": 16, "mlp_dim": 32, "num_heads": 2},
                 feature_size=4, pre_steps=3, pre_batch=4, ft_steps=2, ft_batch=2, ft_lr=1e-3, train_sizes=(4,),
                 pre_seeds=1, ft_seeds=2, device="cpu"),
    "cpu": Size(pre_subjects=32, pool=40, n_test=150, grid=32, vit={"hidden_size": 32, "mlp_dim": 64, "num_heads": 2},
                feature_size=8, pre_steps=150, pre_batch=8, ft_steps=300, ft_batch=2, ft_lr=1e-3, train_sizes=(16, 40),
                pre_seeds=3, ft_seeds=8, device="cpu"),
    # One GPU: untested (no GPU run yet); the CPU-side curation (rank, captions) of 64 subjects takes
    # ~7 min on one core, fine-tuning 96 runs of 400 steps at 64^3.
    "gpu": Size(pre_subjects=64, pool=80, n_test=160, grid=64, vit={"hidden_size": 192, "mlp_dim": 768, "num_heads": 6},
                feature_size=16, pre_steps=1000, pre_batch=16, ft_steps=400, ft_batch=4, ft_lr=1e-3,
                train_sizes=(16, 48), pre_seeds=3, ft_seeds=8, device="auto"),
}

ARMS = {
    "scratch": None,
    "psat-labels": {"captions": "labels"},
    "psat-metadata": {"captions": "metadata"},
    "no-pspe": {"captions": "labels", "use_pspe": False},
    "no-psat": {"captions": "labels", "use_psat": False},
    "shuffled": {"captions": "shuffled"},
}
PRE_SEED, DOWN_SEED = 1001, 2002  # cohort seeds: different subjects in each cohort
LESION_SCALE = [dd.LESION_SCALE]  # --lesion-scale
TEXT = ["random"]  # --text-embeddings


def eval_device(size: Size) -> str:
    """Where the per-case evaluation and the probes' forward passes run."""
    return "cuda" if size.device == "auto" and torch.cuda.is_available() else ("cpu" if size.device == "auto" else size.device)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def downstream(root: Path, size: Size):
    """The downstream workdir, its rows, a split file (test fixed, rest train) and the loaded volumes."""
    w = dd.build_cohort(root / "down", "d", size.pool + size.n_test, DOWN_SEED, size.grid, lesion_scale=LESION_SCALE[0])
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


def pretrain_arm(root: Path, arm: str, seed: int, size: Size, caption_dirs: dict) -> str:
    spec = dict(ARMS[arm])
    src = caption_dirs[spec.pop("captions")]
    vw = root / f"pre-{arm}-s{seed}"
    out = vw / "exports"
    done = sorted(out.glob("*.json")) if out.exists() else []
    if done:
        return str(done[-1])
    vw.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name not in ("checkpoints", "exports") and not (vw / p.name).exists():
            (vw / p.name).symlink_to(p.resolve())
    cfg = PretrainConfig(workdir=vw, encoder="vit", encoder_kwargs=dict(size.vit), steps=size.pre_steps,
                         batch_size=size.pre_batch, lr=1e-3, warmup=max(1, size.pre_steps // 10),
                         precision="fp32" if size.device == "cpu" else "amp", workers=0, num_queries=16,
                         psat_width=64, psat_layers=1, psat_heads=4, seed=seed, splits="train,val", val_split="test",
                         log_every=max(1, size.pre_steps // 5), ckpt_every=size.pre_steps, progress=False,
                         device=size.device, **spec)
    res = pretrain(cfg)
    log(f"  pretrain {arm} seed {seed}: loss {np.mean(res.losses[:5]):.3f} -> {np.mean(res.losses[-5:]):.3f}")
    return str(export_latest(vw, out_dir=out)[1])


def run_finetune(w: Path, split: Path, init: str, n_train: int, n_pool: int, seed: int, size: Size, name: str,
                 steps: int | None = None):
    cfg = FinetuneConfig(workdir=w, task="seg", encoder="vit", init=init, train_fraction=min(1.0, n_train / n_pool),
                         split_file=str(split), steps=steps or size.ft_steps, batch_size=size.ft_batch, lr=size.ft_lr,
                         warmup=max(1, (steps or size.ft_steps) // 15),
                         precision="fp32" if size.device == "cpu" else "amp", seed=seed, name=name,
                         feature_size=size.feature_size, encoder_kwargs=dict(size.vit) if init == "scratch" else {},
                         workers=0 if size.device == "cpu" else 4, progress=False, device=size.device,
                         log_every=10**6, ckpt_every=10**6)
    res = finetune(cfg)
    return res, res.directory / "final.json"


def pilot(root: Path, size: Size, sizes: list[int], steps: list[int], seeds: int) -> None:
    w, _, split, x, y, test_idx, pool_idx = downstream(root, size)
    xt, yt = x[test_idx], y[test_idx]
    lesion = (yt.flatten(1).amax(1) > 0).numpy()
    log(f"pilot: scratch, {len(test_idx)} test cases ({int(lesion.sum())} with a lesion), pool {len(pool_idx)}")
    print("| train cases | steps | Dice (FP counted, per case) | Dice on lesion cases | `train finetune` dice_mean (its 4 monitor cases) | s/run |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        for st in steps:
            d, dl, dm, secs = [], [], [], []
            for s in range(seeds):
                t = time.time()
                res, fj = run_finetune(w, split, "scratch", n, len(pool_idx), s, size, f"pilot-n{n}-t{st}-s{s}", st)
                pc = de.per_case_dice(fj, xt, yt, eval_device(size))
                d.append(pc.mean())
                dl.append(pc[lesion].mean())
                dm.append(res.metrics["test"]["dice_mean"] or 0.0)
                secs.append(time.time() - t)
            print(f"| {n} | {st} | {np.mean(d):.3f} ({' '.join(f'{v:.2f}' for v in d)}) | {np.mean(dl):.3f} | "
                  f"{np.mean(dm):.3f} | {np.mean(secs):.0f} |", flush=True)


def run(root: Path, size: Size, arms: list[str]) -> dict:
    t0 = time.time()
    w, rows, split, x, y, test_idx, pool_idx = downstream(root, size)
    case_y = (y.flatten(1).amax(1) > 0).numpy().astype(int)
    tok_y = de.token_labels(y)
    log(f"downstream cohort: {len(rows)} cases ({int(case_y.sum())} with a lesion), test {len(test_idx)}, "
        f"pool {len(pool_idx)}; {time.time() - t0:.0f} s")
    pw = dd.build_cohort(root / "pre", "p", size.pre_subjects, PRE_SEED, size.grid, lesion_scale=LESION_SCALE[0])
    ranked = dd.ranked(pw, root / "pre-ranked")
    caption_dirs = {c: dd.caption_arm(ranked, root / f"pre-{c}", c, TEXT[0]) for c in ("labels", "metadata")}
    caption_dirs["shuffled"] = dd.shuffle_volumes(caption_dirs["labels"], root / "pre-shuffled")
    log(f"pretraining cohort: {size.pre_subjects} subjects, captioned twice; {time.time() - t0:.0f} s")
    inits = {(a, s): ("scratch" if ARMS[a] is None else pretrain_arm(root, a, s, size, caption_dirs))
             for s in range(size.pre_seeds) for a in arms}
    log(f"pretrained {len(arms) - 1} arms x {size.pre_seeds} seeds; {time.time() - t0:.0f} s")
    per_case: dict = {"probe token": {a: [] for a in arms}, "probe case": {a: [] for a in arms}}
    for s in range(size.pre_seeds):
        for a in arms:
            enc = de.encoder_for(inits[(a, s)], s, size.grid, size.vit)
            pr = de.linear_probes(de.tokens(enc, x, eval_device(size)), tok_y, case_y, pool_idx, test_idx)
            per_case["probe token"][a].append(pr["token_ll"].tolist())
            per_case["probe case"][a].append(pr["case_p"].tolist())
    log(f"linear probes done; {time.time() - t0:.0f} s")
    for ev in ("probe token", "probe case"):
        log(f"  {ev}: " + ", ".join(f"{a} {np.mean(per_case[ev][a]):.3f}" for a in arms))
    xt, yt = x[test_idx], y[test_idx]
    for n in size.train_sizes:
        ev = f"finetune n={n}"
        per_case[ev] = {a: [] for a in arms}
        for j in range(size.ft_seeds):
            for a in arms:
                _, fj = run_finetune(w, split, inits[(a, j % size.pre_seeds)], n, len(pool_idx), j, size,
                                     f"{a}-n{n}-s{j}")
                per_case[ev][a].append(de.per_case_dice(fj, xt, yt, eval_device(size)).tolist())
            log(f"  {ev} seed {j}: " + ", ".join(f"{a} {np.mean(per_case[ev][a][-1]):.3f}" for a in arms))
            (root / "partial.json").write_text(json.dumps({"arms": arms, "per_case": per_case}) + "\n")
    summary = de.summarize(per_case, arms)
    test_ids = rows["case_id"].iloc[test_idx].astype(str).tolist()
    return {"arms": arms, "summary": summary, "per_case": per_case, "test_cases": test_ids,
            "test_lesion": case_y[test_idx].tolist(), "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--pre-seeds", type=int, default=None)
    ap.add_argument("--ft-seeds", type=int, default=None)
    ap.add_argument("--ft-steps", type=int, default=None)
    ap.add_argument("--train-sizes", default=None, help="comma-separated train-case counts (default: the size's); none: linear probes only")
    ap.add_argument("--pilot", action="store_true", help="scratch only: Dice vs train size and steps")
    ap.add_argument("--pilot-sizes", default="8,16,40")
    ap.add_argument("--pilot-steps", default="100,300")
    ap.add_argument("--lesion-scale", type=float, default=dd.LESION_SCALE,
                    help="lesion size factor over bench_lesions' 4-12 mm radii (a new --keep folder per value)")
    ap.add_argument("--text-embeddings", choices=("random", "bow"), default="random",
                    help="stand-in caption embeddings: a random vector per caption (bench_lesions') or a bag of "
                         "words (a new --keep folder per value)")
    ap.add_argument("--out", type=Path, default=None, help="write every per-case result as JSON")
    ap.add_argument("--plot", type=Path, default=None, help="PNG forest plot of the paired differences")
    ap.add_argument("--keep", type=Path, default=None, help="work here (kept; reruns reuse cohorts, exports)")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    over = {k: v for k, v in (("pre_seeds", args.pre_seeds), ("ft_seeds", args.ft_seeds), ("ft_steps", args.ft_steps))
            if v is not None}
    if args.train_sizes:
        over["train_sizes"] = () if args.train_sizes == "none" else tuple(int(v) for v in args.train_sizes.split(","))
    size = replace(size, **over)
    LESION_SCALE[0] = args.lesion_scale
    TEXT[0] = args.text_embeddings
    arms = [a for a in args.arms.split(",") if a]
    if "scratch" not in arms or any(a not in ARMS for a in arms):
        raise SystemExit(f"--arms: a subset of {','.join(ARMS)} that includes scratch")
    if size.device == "cpu":
        # one thread: on the shared 2-core machine two threads ran a UNETR step 3-5x slower (contention)
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    command = "benchmarks/bench_downstream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"{command}\n  {asdict(size)}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.pilot:
            pilot(root, size, [int(v) for v in args.pilot_sizes.split(",")],
                  [int(v) for v in args.pilot_steps.split(",")], min(size.ft_seeds, 2))
            return None
        out = run(root, size, arms)
    out.update(size=args.size, config=asdict(size), command=command,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               load_average=os.getloadavg())
    print(f"\n{out['date']}, {out['seconds']:.0f} s, load average {out['load_average'][0]:.1f}: `{command}`")
    print(f"test cases: {len(out['test_cases'])} ({sum(out['test_lesion'])} with a lesion); seeds: pretraining "
          f"{size.pre_seeds}, fine-tuning {size.ft_seeds}; diff = arm - scratch, mean [95% two-way bootstrap "
          f"over seeds x cases], * = interval excludes 0")
    print("probe token: mean log-likelihood of token lesion labels; probe case: p(true present/absent); "
          "finetune: lesion Dice per case, false positives counted, empty-empty = 1")
    out["table"] = de.table(out["summary"], arms)
    print(out["table"])
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
