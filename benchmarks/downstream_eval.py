"""Evaluation and statistics of ``bench_downstream.py``: per-case fine-tuning Dice, linear probes of
a frozen encoder, paired differences with two-way bootstrap intervals, the table and the plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from training.finetune.data import VolumeSet, select_volumes
from training.finetune.evaluate import dice_per_class
from training.finetune.nets import load_final, read_init
from training.loop.rng import seed_all
from training.models.encoders import build_encoder_from_config, encoder_config


def downstream_rows(w: Path):
    """The downstream cohort's volumes (one row per case) with a ``lesion`` column (label has class 1)."""
    rows = select_volumes(w, None).drop_duplicates("case_id").reset_index(drop=True)
    return rows


@torch.no_grad()
def load_all(w: Path, rows, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N,1,D,H,W), labels (N,D,H,W)) of ``rows`` through the fine-tuning loader."""
    vs = VolumeSet(Path(w), rows, img_size)
    xs, ys = zip(*(vs.load(i) for i in range(len(vs))))
    return torch.stack(xs), torch.stack([y[0] for y in ys]).long()


@torch.no_grad()
def per_case_dice(final_json: Path, x: torch.Tensor, y: torch.Tensor, device: str = "cpu") -> np.ndarray:
    """Dice of the lesion class per test case: false positives on a lesion-free case count (0);
    a lesion-free case with no lesion predicted scores 1 (the counted rule leaves it out: NaN)."""
    net = load_final(final_json).eval().to(device)
    out = np.empty(len(x))
    for i in range(0, len(x), 8):
        pred = net(x[i:i + 8].to(device)).argmax(1).cpu()
        for j in range(len(pred)):
            counted, _ = dice_per_class(pred[j], y[i + j], 2)
            out[i + j] = 1.0 if np.isnan(counted[0]) else counted[0]
    return out


def encoder_for(init: str, seed: int, img_size: int, vit: dict):
    """The frozen encoder of an export (``init``) or a fresh one (``"scratch"``, seeded)."""
    if init == "scratch":
        seed_all(seed)
        return build_encoder_from_config(encoder_config("vit", img_size=img_size, **vit)).eval()
    it = read_init(init)
    enc = build_encoder_from_config(it.config)
    enc.monai_module.load_state_dict(it.state, strict=True)
    return enc.eval()


@torch.no_grad()
def tokens(enc, x: torch.Tensor, device: str = "cpu") -> np.ndarray:
    enc = enc.to(device)
    return torch.cat([enc(x[i:i + 16].to(device)).cpu() for i in range(0, len(x), 16)]).float().numpy()  # (N, T, C)


def token_labels(y: torch.Tensor, patch: int = 16) -> np.ndarray:
    """Per case and token (MONAI's patch order d, h, w): 1 when the patch holds a lesion voxel."""
    n, d, h, ww = y.shape
    blocks = y.reshape(n, d // patch, patch, h // patch, patch, ww // patch, patch)
    return (blocks.amax(dim=(2, 4, 6)) > 0).reshape(n, -1).numpy().astype(int)


def linear_probes(feat: np.ndarray, tok_y: np.ndarray, case_y: np.ndarray, train: np.ndarray,
                  test: np.ndarray) -> dict[str, np.ndarray]:
    """Logistic regressions on frozen tokens, fit on ``train`` cases, scored per ``test`` case:
    ``token_ll`` the mean log-likelihood of the token lesion labels (a 1x1x1 linear lesion head at
    token resolution), ``case_p`` the probability given to the true present/absent label from
    mean-pooled tokens. Higher is better for both."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    _, t, c = feat.shape
    out = {}
    xt = feat[train].reshape(-1, c)
    sc = StandardScaler().fit(xt)
    if len(set(tok_y[train].ravel())) > 1:
        lr = LogisticRegression(C=1.0, max_iter=2000).fit(sc.transform(xt), tok_y[train].ravel())
        p = lr.predict_proba(sc.transform(feat[test].reshape(-1, c)))[:, 1].reshape(len(test), t)
    else:
        p = np.full((len(test), t), 0.5)
    p = p.clip(1e-6, 1 - 1e-6)
    yt = tok_y[test]
    out["token_ll"] = (yt * np.log(p) + (1 - yt) * np.log(1 - p)).mean(1)
    pooled = feat.mean(1)
    sc2 = StandardScaler().fit(pooled[train])
    if len(set(case_y[train])) > 1:
        lr2 = LogisticRegression(C=1.0, max_iter=2000).fit(sc2.transform(pooled[train]), case_y[train])
        q = lr2.predict_proba(sc2.transform(pooled[test]))[:, 1]
    else:
        q = np.full(len(test), 0.5)
    out["case_p"] = np.where(case_y[test] == 1, q, 1 - q)
    return out


def paired_bootstrap(diff: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a (seeds x cases) matrix of paired differences and its 95% interval from a two-way
    bootstrap (seeds and cases resampled independently)."""
    diff = np.asarray(diff, float)
    if diff.ndim == 1:
        diff = diff[None]
    rng = np.random.default_rng(seed)
    s, c = diff.shape
    # resampling with replacement = multinomial counts per seed and per case
    ws = rng.multinomial(s, np.full(s, 1 / s), size=reps) / s
    wc = rng.multinomial(c, np.full(c, 1 / c), size=reps) / c
    means = np.einsum("rs,sc,rc->r", ws, diff, wc)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def fmt_ci(d: dict) -> str:
    star = "" if d["lo"] <= 0 <= d["hi"] else " *"
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{star}"


def table(summary: dict, arms: list[str]) -> str:
    """Markdown: one row per evaluation, scratch's mean and each arm's paired difference."""
    lines = ["| evaluation | scratch | " + " | ".join(f"{a} - scratch" for a in arms if a != "scratch") + " |",
             "|---|---|" + "---|" * (len(arms) - 1)]
    for ev, by in summary.items():
        cells = [f"{by['scratch']['mean']:.3f}"] + [fmt_ci(by[a]["diff"]) if a in by else "-"
                                                     for a in arms if a != "scratch"]
        lines.append(f"| {ev} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CONTRASTS = (("psat-labels", "shuffled"), ("psat-metadata", "shuffled"), ("psat-labels", "psat-metadata"))


def contrasts(per_case: dict, arms: list[str]) -> dict:
    """Paired differences between pretrained arms: what the caption-volume pairing adds beyond any
    pretraining (arm - shuffled) and what lesion-aware text adds (labels - metadata)."""
    out: dict = {}
    for ev, by in per_case.items():
        for a, b in CONTRASTS:
            if a in by and b in by:
                mean, lo, hi = paired_bootstrap(np.asarray(by[a], float) - np.asarray(by[b], float))
                out.setdefault(ev, {})[f"{a} - {b}"] = {"mean": mean, "lo": lo, "hi": hi}
    return out


def contrast_table(con: dict) -> str:
    names = list(dict.fromkeys(n for by in con.values() for n in by))
    lines = ["| evaluation | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for ev, by in con.items():
        lines.append(f"| {ev} | " + " | ".join(fmt_ci(by[n]) if n in by else "-" for n in names) + " |")
    return "\n".join(lines)


def plot(summary: dict, arms: list[str], path: Path, title: str) -> Path:
    """A forest plot of the paired differences (PIL: matplotlib is not installed here)."""
    from PIL import Image, ImageDraw

    others = [a for a in arms if a != "scratch"]
    evs = list(summary)
    row_h, left, width = 18, 330, 420
    h = 40 + len(evs) * (len(others) * row_h + 30)
    img = Image.new("RGB", (left + width + 30, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black")
    y = 32
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for ev in evs:
        vals = [summary[ev][a]["diff"] if a in summary[ev] else None for a in others]
        span = max(1e-3, max(max(abs(v["lo"]), abs(v["hi"])) for v in vals if v)) * 1.1
        x0 = left + width / 2

        def px(v: float, x0: float = x0, span: float = span) -> float:
            return x0 + v / span * (width / 2)
        d.text((10, y), f"{ev} (axis +-{span:.3f}; 0 = scratch)", fill="black")
        y += 16
        d.line([(x0, y), (x0, y + len(others) * row_h)], fill="gray")
        for k, (a, v) in enumerate(zip(others, vals)):
            yy = y + k * row_h + row_h / 2 + 2
            d.text((30, yy - 6), a if v else f"{a} (not run)", fill=colors[k % len(colors)])
            if not v:
                continue
            d.line([(px(v["lo"]), yy), (px(v["hi"]), yy)], fill=colors[k % len(colors)], width=2)
            d.ellipse([px(v["mean"]) - 3, yy - 3, px(v["mean"]) + 3, yy + 3], fill=colors[k % len(colors)])
        y += len(others) * row_h + 14
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def summarize(per_case: dict, arms: list[str]) -> dict:
    """``per_case[eval][arm]`` = (seeds x cases) array (paired: same seeds, same cases across arms)
    -> ``{eval: {arm: {"mean", "diff": {mean, lo, hi}}}}``; an arm an evaluation lacks (not
    fine-tuned) is left out of it."""
    out: dict = {}
    for ev, by in per_case.items():
        base = np.asarray(by["scratch"], float)
        out[ev] = {}
        for a in (a for a in arms if a in by):
            m = np.asarray(by[a], float)
            mean, lo, hi = paired_bootstrap(m - base) if a != "scratch" else (0.0, 0.0, 0.0)
            out[ev][a] = {"mean": float(m.mean()), "diff": {"mean": mean, "lo": lo, "hi": hi},
                          "n_seeds": int(m.shape[0]), "n_cases": int(m.shape[1])}
            if not math.isfinite(out[ev][a]["mean"]):
                out[ev][a]["mean"] = None
    return out
