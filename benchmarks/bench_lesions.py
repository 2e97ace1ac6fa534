"""Does the default order find lesions? Synthetic lesions in package-shipped brains, run by hand.

Subjects: nilearn's MNI152 T1 template (via ``curation.sample.sample_data``'s source), each warped by
a seeded random affine (scale 0.9-1.1 per axis, rotation up to 6 degrees, shift up to 6 mm),
given a smooth multiplicative bias field, a gamma change and noise, so no two are alike.
Lesions: ``--lesions`` per subject, ellipsoids of radius 4-12 mm, contrast +-25-60 % of the
local intensity (bright or dark), centred at a random voxel of the brain mask; the label
holds the lesions only (class "lesion"). Then `curate slice` + `curate rank --evaluate`
for each setting. Like for like: the voter never picks near-empty or edge slices first, so its
baseline is random k of the same eligible slices (``random_eligible``, exact expectation); random
over all slices and the central slice are shown too. Per setting and k = 1, 3, 5: the lesion hit
rate (a lesion slice among the first k of a (volume, plane) pool), the coverage distance in
raw-thumbnail space (what the voter is for: representative coverage; lower is better) and the
near-empty share, then the differences voter - random_eligible and voter - central with 95%
intervals from `curate rank --evaluate`'s bootstrap over subjects; a Markdown table at the end.

    .venv/bin/python benchmarks/bench_lesions.py [--subjects 110] [--lesions 1] [--grid 64] [--json out.json]

``--pretrain`` instead runs the pretraining ablation of docs/pretraining.md on such a cohort:
`curate slice`, offline captions of every slice (label context: "... lesion ..." or "no annotated
structures"), and stand-in "CLIP" embeddings (no CLIP model on CPU in minutes): a slice image's is a
fixed random projection of its 16x16 thumbnail, a caption's a fixed random vector per distinct
caption. Then `train pretrain` (a small ViT + PSAT) for each variant (psat with matched positions,
psat with random positions, --no-pspe, --no-psat) and, per variant, held-out same-position and
all-slices v2t R@1 with the true volume, an all-zero one and another subject's, and the
between-volume share of token variance (trained vs fresh init).

    .venv/bin/python benchmarks/bench_lesions.py --pretrain [--subjects 32] [--grid 32] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from curation.ranking.rank import RankConfig, run_rank
from curation.slicing.preprocess import PreprocessConfig
from curation.slicing.stage import SliceConfig, run_slice


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    r = np.eye(3)
    for axes in ((0, 1), (0, 2), (1, 2)):
        a = np.deg2rad(rng.uniform(-max_deg, max_deg))
        m = np.eye(3)
        m[np.ix_(axes, axes)] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
        r = r @ m
    return r


def make_subject(t1: np.ndarray, brain: np.ndarray, vox_mm: float, rng: np.random.Generator, n_lesions: int):
    """One warped, bias-corrupted copy of the template with lesions; returns (image, label)."""
    shape = np.array(t1.shape)
    centre = (shape - 1) / 2
    mat = _rotation(rng, 6.0) @ np.diag(rng.uniform(0.9, 1.1, 3))
    inv = np.linalg.inv(mat)
    offset = centre - inv @ centre + rng.uniform(-6, 6, 3) / vox_mm
    img = ndimage.affine_transform(t1, inv, offset=offset, order=1)
    br = ndimage.affine_transform(brain.astype(np.float32), inv, offset=offset, order=0) > 0.5
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    coef = rng.normal(0, 0.08, (3,))
    bias = np.exp(np.tensordot(coef, grid, axes=1) + rng.normal(0, 0.04) * (grid**2).sum(0))
    img = img * bias
    img = img.max() * (img / img.max()).clip(0, None) ** rng.uniform(0.85, 1.15)
    label = np.zeros(img.shape, dtype=np.uint8)
    inside = np.argwhere(ndimage.binary_erosion(br, iterations=2))
    for _ in range(n_lesions):
        c = inside[rng.integers(len(inside))]
        radii = rng.uniform(4, 12, 3) / vox_mm
        d = sum(((np.arange(n) - c[a]).reshape([-1 if i == a else 1 for i in range(3)]) / radii[a]) ** 2
                for a, n in enumerate(shape))
        blob = d <= 1.0
        contrast = rng.uniform(0.25, 0.6) * rng.choice([-1.0, 1.0])
        soft = np.clip(1.5 - d, 0, 1)  # soft edge
        local = float(np.median(img[blob])) if blob.any() else float(img[br].mean())
        img = img + contrast * local * soft
        label[blob] = 1
    img = img + rng.normal(0, 0.01 * img.max(), img.shape)
    return img.clip(0, None).astype(np.float32), label


def load_template(resolution: int = 2) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    """nilearn's MNI152 T1 template at ``resolution`` mm: the image, its float32 array, its brain mask."""
    from nilearn import datasets as nd

    t1img = nd.load_mni152_template(resolution=resolution)
    brain = np.asarray(nd.load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    return t1img, np.asarray(t1img.dataobj).astype(np.float32), brain


def write_case(task: Path, case: str, img: np.ndarray, lab: np.ndarray, affine: np.ndarray) -> dict[str, str]:
    """``imagesTr/<case>.nii.gz`` and ``labelsTr/<case>.nii.gz`` of an MSD task; its dataset.json entry."""
    for kind, arr in (("imagesTr", img), ("labelsTr", lab)):
        (task / kind).mkdir(parents=True, exist_ok=True)
        nimg = nib.Nifti1Image(arr, affine)
        nimg.set_qform(affine, code=1)
        nimg.set_sform(affine, code=1)
        nib.save(nimg, str(task / kind / f"{case}.nii.gz"))
    return {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}


def write_dataset_json(task: Path, name: str, training: list[dict[str, str]]) -> None:
    info = {"name": name, "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "lesion"},
            "training": training}
    (task / "dataset.json").write_text(json.dumps(info))


def build_task(root: Path, subjects: int, lesions: int, seed: int, resolution: int = 2, prefix: str = "s") -> Path:
    """An MSD-style task folder of ``subjects`` warped template brains with lesions, cases named
    ``<prefix>000``, ``<prefix>001``, ... (another prefix and seed give another, disjoint cohort)."""
    t1img, t1, brain = load_template(resolution)
    task = root / "Task97_Lesions"
    rng = np.random.default_rng(seed)
    training = []
    for s in range(subjects):
        img, lab = make_subject(t1, brain, float(resolution), rng, lesions)
        training.append(write_case(task, f"{prefix}{s:03d}", img, lab, t1img.affine))
    write_dataset_json(task, "Lesions", training)
    return task


SETTINGS = {
    "vote-k (w=0, default)": {},
    "vote-k + population (w=1)": {"atypicality_weight": 1.0},
    "vote-k + population (w=2)": {"atypicality_weight": 2.0},
    "default, no body mask in descriptor": {"body_mask": False},
}


EMB_DIM = 64
VARIANTS = {
    "psat, matched positions (default)": {},
    "psat, random positions (the paper's)": {"position_sampling": "random"},
    "no-pspe (matched)": {"use_pspe": False},
    "no-psat (matched)": {"use_psat": False},
}


def standin_embeddings(w: Path) -> None:
    """Write a stand-in embedding store for the release: image = random projection of the 16x16
    thumbnail of the slice PNG, text = a random vector per distinct caption (both L2-normalised)."""
    from PIL import Image

    from curation.store.embed_store import text_key, write_meta, write_table
    from curation.store.manifest import read_manifest

    df = read_manifest(w / "manifests" / "v1.parquet")
    proj = np.random.default_rng(123).normal(size=(16 * 16, EMB_DIM))
    shas, imgs = [], []
    for sha, path in df.drop_duplicates("image_sha256")[["image_sha256", "image_path"]].itertuples(index=False):
        px = np.asarray(Image.open(w / path).convert("L").resize((16, 16), Image.BILINEAR), np.float64) / 255.0
        e = (px.ravel() - 0.25) @ proj
        shas.append(sha)
        imgs.append(e / (np.linalg.norm(e) + 1e-8))
    caps = sorted(set(df["caption"].dropna()))
    txt = []
    for c in caps:
        e = np.random.default_rng(int(text_key(c)[:12], 16)).normal(size=EMB_DIM)
        txt.append(e / np.linalg.norm(e))
    write_table(w, "standin", "image", shas, np.stack(imgs))
    write_table(w, "standin", "text", [text_key(c) for c in caps], np.stack(txt))
    write_meta(w, "standin", model="stand-in", checkpoint="none", dim=EMB_DIM)


def pretrain_ablation(args: argparse.Namespace, root: Path) -> None:
    from typer.testing import CliRunner

    from med3dinsight.curate import app as curate
    from training.pretrain.train import PretrainConfig, pretrain

    t = time.perf_counter()
    w = root / "w"
    if not (w / "manifests" / "v1.parquet").exists():
        task = build_task(root / "data", args.subjects, args.lesions, args.seed)
        run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=args.grid)), log=lambda *_: None)
        res = CliRunner().invoke(curate, ["caption", "--workdir", str(w), "--provider", "offline", "--all"])
        if res.exit_code != 0:
            raise SystemExit(f"curate caption failed:\n{res.output}")
        standin_embeddings(w)
    print(f"{args.subjects} subjects x {args.lesions} lesion(s), grid {args.grid}: cohort, captions, embeddings in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    vit = {"patch_size": 8, "hidden_size": 64, "mlp_dim": 128, "num_layers": 2, "num_heads": 4}
    out = []
    for name, over in VARIANTS.items():
        t = time.perf_counter()
        vw = root / ("run-" + "".join(ch if ch.isalnum() else "-" for ch in name))
        vw.mkdir(exist_ok=True)
        for sub in ("volumes", "manifests", "embeddings", "cache"):
            if (w / sub).exists() and not (vw / sub).exists():
                (vw / sub).symlink_to(w / sub)
        cfg = PretrainConfig(workdir=vw, encoder="vit", encoder_kwargs=vit, steps=args.steps, batch_size=args.batch,
                             lr=args.lr, warmup=max(1, args.steps // 10), precision="fp32", workers=0, num_queries=16,
                             psat_width=64, psat_layers=1, psat_heads=4, seed=args.seed, splits="train,val",
                             val_split="test", log_every=max(1, args.steps // 5), ckpt_every=args.steps,
                             progress=False, **over)
        res = pretrain(cfg)
        r, p = res.retrieval or {}, res.probe or {}
        out.append((name, r, p, res.losses, time.perf_counter() - t))
        print(f"  {name}: loss {np.mean(res.losses[:10]):.3f} -> {np.mean(res.losses[-10:]):.3f}, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    r0 = out[0][1]
    print(f"\nheld-out: {int(r0.get('n_volumes', 0))} volumes; same-position queries v2t "
          f"{int(r0.get('v2t_n_queries', 0))}, v2i {int(r0.get('v2i_n_queries', 0))}; chance R@1: v2t same position "
          f"{r0.get('v2t_chance@1', float('nan')):.3f} (volume-blind prior {r0.get('v2t_prior@1', float('nan')):.3f}), "
          f"v2i same position {r0.get('v2i_chance@1', float('nan')):.3f}, "
          f"v2t all slices {r0.get('v2t_all_chance@1', float('nan')):.3f}\n")
    keys = ("v2t_R@1", "v2i_R@1", "v2t_all_R@1")
    print("| variant | " + " | ".join(f"{k} true / blank / shuffled" for k in keys)
          + " | between-volume share trained / init (per token position) | loss first / last |")
    print("|---" * (len(keys) + 3) + "|")
    for name, r, p, losses, _ in out:
        cells = [" / ".join(f"{r.get(k + s, float('nan')):.3f}" for s in ("", "_blank", "_shuffled")) for k in keys]
        share = (f"{p.get('between_volume_share', float('nan')):.3f} / "
                 f"{p.get('between_volume_share_init', float('nan')):.3f}"
                 f" ({p.get('between_volume_share_per_token', float('nan')):.3f} / "
                 f"{p.get('between_volume_share_per_token_init', float('nan')):.3f})"
                 + (" collapsed" if p.get("collapsed") else ""))
        print(f"| {name} | " + " | ".join(cells)
              + f" | {share} | {np.mean(losses[:10]):.3f} / {np.mean(losses[-10:]):.3f} |")


METHODS = ("voter", "random_eligible", "random", "central")
PAIRS = ("voter-random_eligible", "voter-central")


def _diff(res: dict, pair: str, k: int, metric: str) -> str:
    d = res["differences"][pair][str(k)].get(metric)
    if d is None:
        return "-"
    lo, hi = d["ci95"]
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}"


def print_setting(name: str, res: dict, seconds: float) -> None:
    """The like-for-like table of one setting: lesion hit rate, coverage distance and near-empty
    share per method and k, then the differences with their subject-bootstrap intervals."""
    lesion = res["classes"]["lesion"]
    print(f"\n{name}: {res['n_pools']} pools ({lesion['pools']} with a lesion) from {res['n_subjects']} subjects; "
          f"eligible slices {res['n_eligible_slices']} of {res['n_slices']}; rank {seconds:.1f} s")
    print(f"{'k':>2}  {'method':<16} {'lesion hit':>10} {'cover dist':>10} {'near-empty':>10}")
    for k in res["ks"]:
        for m in METHODS:
            row = res["methods"][m][str(k)]
            print(f"{k:>2}  {m:<16} {lesion[m][str(k)]:>10.3f} {row['coverage_distance']:>10.4f} "
                  f"{row['near_empty']:>10.3f}")
        for pair in PAIRS:
            print(f"{'':>2}  {pair:<22} hit {_diff(res, pair, k, 'hit_rate')}  "
                  f"cover dist {_diff(res, pair, k, 'coverage_distance')}")


def markdown(results: list[tuple[str, dict]]) -> str:
    """Markdown: per setting and k, hit rate voter / random-eligible / random-all / central,
    coverage distance voter / random-eligible, and the two differences with 95% intervals."""
    head = ("| setting | k | lesion hit: voter / random-eligible / random-all / central | voter - random-eligible "
            "[95% CI] | voter - central [95% CI] | cover dist: voter / random-eligible / central | voter - "
            "random-eligible cover dist [95% CI] |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, res in results:
        lesion, m = res["classes"]["lesion"], res["methods"]
        for k in res["ks"]:
            hits = " / ".join(f"{lesion[x][str(k)]:.3f}" for x in METHODS)
            cover = " / ".join(f"{m[x][str(k)]['coverage_distance']:.4f}"
                               for x in ("voter", "random_eligible", "central"))
            lines.append(f"| {name} | {k} | {hits} | {_diff(res, PAIRS[0], k, 'hit_rate')} | "
                         f"{_diff(res, PAIRS[1], k, 'hit_rate')} | {cover} | "
                         f"{_diff(res, PAIRS[0], k, 'coverage_distance')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--lesions", type=int, default=1)
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder (default: a temp one)")
    ap.add_argument("--json", type=Path, default=None, help="write every setting's evaluation here")
    ap.add_argument("--default-only", action="store_true", help="rank with the default setting only")
    ap.add_argument("--pretrain", action="store_true", help="run the pretraining ablation instead (docstring)")
    ap.add_argument("--steps", type=int, default=300, help="--pretrain: optimizer steps per variant")
    ap.add_argument("--batch", type=int, default=8, help="--pretrain: batch size")
    ap.add_argument("--lr", type=float, default=1e-3, help="--pretrain: peak learning rate")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        if args.pretrain:
            pretrain_ablation(args, root)
            return
        t = time.perf_counter()
        task = build_task(root / "data", args.subjects, args.lesions, args.seed)
        w = root / "w"
        run_slice("msd", task, SliceConfig(workdir=w, pre=PreprocessConfig(grid_size=args.grid)), log=lambda *_: None)
        print(f"{args.subjects} subjects x {args.lesions} lesion(s), grid {args.grid}: built and sliced in "
              f"{time.perf_counter() - t:.0f} s")
        print("hit: a lesion slice among a pool's first k; cover dist: mean cosine distance of a pool's slices to "
              "the nearest pick, raw 16x16 thumbnails (lower is better); random figures are exact expectations; "
              "[95% CI]: bootstrap over subjects, * excludes 0")
        results = []
        for name, over in SETTINGS.items():
            if args.default_only and over:
                continue
            s = run_rank(RankConfig(workdir=w, evaluate=True, **over))
            res = s.evaluation
            if set(res["classes"]) != {"lesion"}:  # hit_rate differences pool every class
                raise SystemExit(f"expected only the lesion class, got {sorted(res['classes'])}")
            print_setting(name, res, s.seconds)
            results.append((name, res))
        print("\n" + markdown(results))
        print(f"\ntotal {time.perf_counter() - t:.0f} s")
        if args.json:
            args.json.write_text(json.dumps({"subjects": args.subjects, "lesions": args.lesions, "grid": args.grid,
                                             "seed": args.seed, "settings": dict(results)}, indent=1))


if __name__ == "__main__":
    main()
