"""Downstream benchmark: does Med3DInsight pretraining help segmentation? (paper Table 1, Fig. 3, Table 3)

The whole pipeline on one collection of labelled phantom volumes (MSD layout; three structures
per volume, placed differently per case): `curate slice` -> offline captions -> tiny CLIP
(`train clip`, `train embed`) -> `train pretrain` once per variant (PSAT, --no-psat, --no-pspe)
-> `train export` -> `train finetune --task seg` (UNETR) from scratch and from each export, at
equal steps, for several --train-fraction values and seeds. Test Dice (mean over classes) on the
release's test subjects, reported as mean ± sd over seeds.

    .venv/bin/python benchmarks/bench_downstream.py                 # CPU, a few minutes
    .venv/bin/python benchmarks/bench_downstream.py --size gpu      # sized for ~15 minutes on one GPU
    ... --out results.json

Caveat, printed with the results: the phantoms are synthetic and tiny, the encoder too; this
checks the loop and measures what it measures, it does not reproduce the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # conftest's phantom writers
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import phantom_ras, ras_affine, write_msd_task  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from curation.slicing.preprocess import PreprocessConfig  # noqa: E402
from curation.slicing.stage import SliceConfig, run_slice  # noqa: E402
from med3dinsight.curate import app as curate  # noqa: E402
from med3dinsight.train import app as train  # noqa: E402
from training.finetune.train import FinetuneConfig, finetune  # noqa: E402
from training.pretrain.export import export_latest  # noqa: E402
from training.pretrain.train import PretrainConfig, pretrain  # noqa: E402

TINY_CLIP = str(REPO / "training" / "models" / "configs" / "tiny-clip.json")


@dataclass(frozen=True)
class Size:
    """One benchmark configuration."""

    cases: int
    grid: int
    vit: dict  # UNETR's ViT: patch 16 and 12 layers are fixed; width is ours
    feature_size: int
    pretrain_steps: int
    pretrain_batch: int
    finetune_steps: int
    finetune_batch: int
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    device: str


SIZES = {
    # CPU, 2 cores: a few minutes.
    "cpu": Size(cases=16, grid=32, vit=dict(hidden_size=32, mlp_dim=64, num_heads=2), feature_size=8,
                pretrain_steps=30, pretrain_batch=4, finetune_steps=15, finetune_batch=2,
                fractions=(0.25, 1.0), seeds=(0, 1, 2), variants=("scratch", "psat", "no-psat", "no-pspe"),
                device="cpu"),
    # One GPU (H200-class), ~15 minutes: more subjects, a real grid, a wider ViT.
    "gpu": Size(cases=60, grid=64, vit=dict(hidden_size=192, mlp_dim=768, num_heads=6), feature_size=16,
                pretrain_steps=400, pretrain_batch=8, finetune_steps=200, finetune_batch=4,
                fractions=(0.1, 0.25, 0.5, 1.0), seeds=(0, 1, 2), variants=("scratch", "psat", "no-psat", "no-pspe"),
                device="auto"),
}


def _ok(res) -> None:
    if res.exit_code != 0:
        raise SystemExit(f"stage failed:\n{res.output}")


def build_workdir(root: Path, size: Size) -> Path:
    """Phantom MSD task -> slice -> offline captions -> tiny CLIP -> embeddings."""
    rng = np.random.default_rng(0)
    cases = {}
    for k in range(size.cases):
        data, label = phantom_ras(seed=k)
        shift = rng.integers(-3, 4, size=3)
        data, label = (np.roll(a, tuple(shift), axis=(0, 1, 2)) for a in (data, label))
        cases[f"case{k:03d}"] = (data, ras_affine(), label)
    task = write_msd_task(root / "data", "Task90_Phantom", cases)
    w = root / "w"
    run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=size.grid)), log=lambda *_: None)
    runner = CliRunner()
    _ok(runner.invoke(curate, ["caption", "--workdir", str(w), "--provider", "offline", "--all"]))
    _ok(runner.invoke(train, ["clip", "--workdir", str(w), "--model", TINY_CLIP, "--epochs", "1", "--batch-size", "32",
                              "--warmup", "1", "--workers", "0", "--lr", "1e-3", "--precision", "fp32"]))
    _ok(runner.invoke(train, ["embed", "--workdir", str(w)]))
    return w


def pretrain_variant(w: Path, variant: str, size: Size) -> Path:
    """Pretrain in a sibling workdir sharing the inputs; returns the export's JSON."""
    vw = w.parent / f"pre-{variant}"
    vw.mkdir(exist_ok=True)
    for name in ("volumes", "manifests", "embeddings", "cache"):
        if not (vw / name).exists():
            (vw / name).symlink_to(w / name)
    cfg = PretrainConfig(workdir=vw, encoder="vit", encoder_kwargs=dict(size.vit), steps=size.pretrain_steps,
                         batch_size=size.pretrain_batch, lr=3e-4, warmup=max(1, size.pretrain_steps // 10),
                         precision="fp32" if size.device == "cpu" else "amp", workers=0, num_queries=16,
                         psat_width=64, psat_layers=1, psat_heads=4, use_psat=variant != "no-psat",
                         use_pspe=variant != "no-pspe", progress=False, device=size.device,
                         log_every=max(1, size.pretrain_steps // 5), ckpt_every=size.pretrain_steps)
    res = pretrain(cfg)
    print(f"  pretrain {variant}: loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}; held-out "
          f"v2t_R@1 {res.retrieval and res.retrieval.get('v2t_R@1')}", flush=True)
    return export_latest(vw, out_dir=vw / "exports")[1]


def run(size: Size, root: Path) -> dict:
    t0 = time.time()
    w = build_workdir(root, size)
    print(f"data + CLIP + embeddings: {time.time() - t0:.0f} s", flush=True)
    inits = {"scratch": "scratch"}
    for v in size.variants:
        if v != "scratch":
            inits[v] = str(pretrain_variant(w, v, size))
    results: dict = {}
    for frac in size.fractions:
        for v, init in inits.items():
            dice = []
            for seed in size.seeds:
                cfg = FinetuneConfig(workdir=w, task="seg", encoder="vit", init=init, train_fraction=frac,
                                     steps=size.finetune_steps, batch_size=size.finetune_batch, lr=3e-4,
                                     precision="fp32" if size.device == "cpu" else "amp", seed=seed,
                                     name=f"{v}-f{frac}-s{seed}", feature_size=size.feature_size,
                                     encoder_kwargs=dict(size.vit) if init == "scratch" else {},
                                     progress=False, device=size.device, log_every=size.finetune_steps)
                res = finetune(cfg)
                dice.append(res.metrics["test"]["dice_mean"])
            results.setdefault(str(frac), {})[v] = {"dice": dice, "n_train": res.n_train, "n_test": res.n_test}
            sd = statistics.stdev(dice) if len(dice) > 1 else 0.0
            print(f"  fraction {frac:<5} {v:<8} Dice {statistics.mean(dice):.3f} ± {sd:.3f} "
                  f"(train {res.n_train}, test {res.n_test} volumes)", flush=True)
    return {"results": results, "seconds": round(time.time() - t0, 1)}


def table(size: Size, out: dict) -> str:
    lines = [f"| train fraction | {' | '.join(size.variants)} |", "|---|" + "---|" * len(size.variants)]
    for frac, by in out["results"].items():
        cells = []
        for v in size.variants:
            d = by[v]["dice"]
            cells.append(f"{statistics.mean(d):.3f} ± {statistics.stdev(d) if len(d) > 1 else 0:.3f}")
        n = next(iter(by.values()))
        lines.append(f"| {frac} ({n['n_train']} train vols) | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--keep", type=Path, default=None, help="work here (kept) instead of a temp folder")
    args = ap.parse_args()
    size = SIZES[args.size]
    if size.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"bench_downstream --size {args.size}: {size.cases} phantom cases at {size.grid}^3, UNETR ViT {size.vit}, "
          f"pretrain {size.pretrain_steps} steps, finetune {size.finetune_steps} steps x seeds {size.seeds}", flush=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        out = run(size, args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = run(size, Path(tmp))
    out["size"] = args.size
    out["config"] = size.__dict__
    print(f"\ntest Dice (mean over classes), mean ± sd over {len(size.seeds)} seeds, equal steps; "
          f"{out['seconds']:.0f} s in all")
    print(table(size, out))
    print("synthetic phantoms and a tiny encoder: a check of the loop, not the paper's numbers")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
