"""`train pretrain` and `train export`: align a 3D encoder to CLIP, then hand it to MONAI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from med3dinsight.common import WorkdirOpt, fail, out
from med3dinsight.train_options import main_process, metrics_line, option, parse_kwargs, switch
from training.loop.errors import TrainingError
from training.pretrain.config import PretrainConfig as C


def pretrain_cmd(
    workdir: Path = WorkdirOpt,
    manifest: str = option(C, "manifest", help="Release manifest (path, or name under manifests/)."),
    encoder: str = option(C, "encoder", help="vit (MONAI ViT / UNETR encoder) | swin (SwinUNETR Swin-ViT) | cnn (3D ResNet)."),
    encoder_arg: list[str] = typer.Option([], "--encoder-arg", help="Encoder size overrides, KEY=VALUE (e.g. hidden_size=384)."),
    img_size: Optional[int] = option(C, "img_size", help="Encoder input side (default: the manifest grid, 128)."),
    steps: Optional[int] = option(C, "steps"),
    epochs: int = option(C, "epochs"),
    stop_after: Optional[int] = option(C, "stop_after"),
    batch_size: int = option(C, "batch_size"),
    lr: float = option(C, "lr"),
    wd: float = option(C, "wd"),
    warmup: int = option(C, "warmup"),
    grad_clip_norm: float = option(C, "grad_clip_norm"),
    accum_freq: int = option(C, "accum_freq", help="Micro-batches per step; the contrastive batch is all of "
                             "them (features cached, as open_clip), at one micro-batch's memory."),
    position_sampling: str = option(C, "position_sampling", help="matched: all volumes of a contrastive batch (and "
                                    "its micro-batches and ranks) at one plane and slice, so only the volume tells "
                                    "them apart | random: a random slice per volume (ablation; position alone then "
                                    "solves the objective)."),
    precision: str = option(C, "precision"),
    workers: int = option(C, "workers"),
    name: Optional[str] = option(C, "name"),
    resume: Optional[str] = option(C, "resume"),
    seed: int = option(C, "seed"),
    log_every: int = option(C, "log_every"),
    report_to: str = option(C, "report_to"),
    device: str = option(C, "device"),
    psat: bool = switch(C, "use_psat", "psat", "PSAT head (--no-psat: ablation Ex1, mean-pool + linear projection)."),
    pspe: bool = switch(C, "use_pspe", "pspe", "Plane-slice position embedding (--no-pspe: ablation Ex2)."),
    num_queries: int = option(C, "num_queries", help="PSAT learnable queries."),
    psat_width: int = option(C, "psat_width", help="Width of the PSAT queries, attention and projection input (paper: 512)."),
    psat_layers: int = option(C, "psat_layers", help="PSAT layers (self-attention, cross-attention to the volume tokens, feed-forward)."),
    image_weight: float = option(C, "image_weight", help="Weight of the loss against CLIP image embeddings."),
    text_weight: float = option(C, "text_weight", help="Weight of the loss against CLIP text embeddings."),
    ckpt_every: int = option(C, "ckpt_every", help="Write step_N.pt every N steps."),
    embeddings: Optional[str] = option(C, "embeddings", help="Embedding fingerprint (default: latest `train embed`)."),
    splits: str = option(C, "splits", help="Release splits to learn from, e.g. train,val; the retrieval metric "
                         "uses val, or test when val is trained on."),
) -> None:
    """Align a 3D encoder to frozen CLIP slice/text embeddings through PSAT (Med3DInsight).

    No CLIP forward per step: embeddings come from `train embed`. Works under
    `torchrun --nproc-per-node N train pretrain ...` (gloo on CPU, nccl on GPU). Checkpoints in
    checkpoints/pretrain/[<name>/] (step_N.pt, latest.pt), metrics in its metrics.jsonl.
    """
    from training.pretrain.train import pretrain

    cfg = C(
        workdir=workdir, manifest=manifest, encoder=encoder, encoder_kwargs=parse_kwargs(encoder_arg), img_size=img_size,
        epochs=epochs, steps=steps, stop_after=stop_after, batch_size=batch_size, lr=lr, wd=wd, warmup=warmup,
        grad_clip_norm=grad_clip_norm, accum_freq=accum_freq, position_sampling=position_sampling,
        precision=precision, resume=resume, seed=seed, workers=workers, name=name, report_to=report_to, use_psat=psat, use_pspe=pspe, num_queries=num_queries, psat_width=psat_width,
        psat_layers=psat_layers, image_weight=image_weight, text_weight=text_weight, log_every=log_every,
        ckpt_every=ckpt_every, device=device, embeddings=embeddings, splits=splits,
    )
    try:
        res = pretrain(cfg)
    except (TrainingError, ValueError) as exc:
        raise fail(str(exc).strip(), 2) from None
    if not main_process():
        return
    table = Table(title="train pretrain", show_header=False)
    table.add_row("steps", f"{res.start_step} -> {res.step} of {res.total_steps}")
    if res.losses:
        k = max(1, min(5, len(res.losses) // 2))
        table.add_row("loss (first / last)", f"{sum(res.losses[:k]) / k:.3f} / {sum(res.losses[-k:]) / k:.3f}")
    for label, value in retrieval_rows(res.retrieval):
        table.add_row(label, value)
    if res.probe:
        p = res.probe
        table.add_row("between-volume token variance", f"{p['between_volume_share']:.3f} (fresh init "
                      f"{p['between_volume_share_init']:.3f}){' COLLAPSED' if p['collapsed'] else ''}")
    table.add_row("processes", str(res.world_size))
    table.add_row("checkpoint", str(res.checkpoint))
    table.add_row("metrics", str(res.metrics_path))
    out.print(table)


def retrieval_rows(r: dict | None) -> list[tuple[str, str]]:
    """Summary-table rows of a held-out retrieval: each R@k beside its controls and chance."""
    if not r:
        return [("held-out retrieval", "-")]
    rows = []
    for key in [k for k in r if "_R@" in k and not k.endswith(("_blank", "_shuffled"))]:
        direction, at = key.split("_R@")
        cells = [f"{r[key]:.3f}"] + [f"{c} {r[key + '_' + c]:.3f}" for c in ("blank", "shuffled") if key + "_" + c in r]
        chance, prior = r.get(f"{direction}_chance@{at}"), r.get(f"{direction}_prior@{at}")
        label = f"{key} ({'all slices' if direction.endswith('_all') else 'same position'})"
        rows.append((label, ", ".join(cells) + (f", chance {chance:.3f}" if chance is not None else "")
                     + (f", volume-blind prior {prior:.3f}" if prior is not None else "")))
    counts = {k: r[k] for k in ("n_queries", "n_volumes", "n_texts", "n_images") if k in r}
    rows.append(("held-out queries", metrics_line(counts)))
    return rows


def export_cmd(
    workdir: Path = WorkdirOpt,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Default: checkpoints/pretrain/latest.pt."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Default: <workdir>/exports."),
) -> None:
    """Export the pretrained encoder as weights that load strict=True into MONAI.

    A state dict for the matching MONAI network (UNETR's vit, SwinUNETR's swinViT, ResNet) plus
    a JSON saying how to load it."""
    from training.pretrain.export import export_latest

    try:
        weights, meta = export_latest(workdir, checkpoint, out_dir)
    except TrainingError as exc:
        raise fail(str(exc), 2) from None
    info = json.loads(Path(meta).read_text())
    out.print(f"weights: {weights}\nhow to load: {meta}")
    probe = info.get("probe") or {}
    if "between_volume_share" in probe:
        out.print(f"between-volume share of token variance: {probe['between_volume_share']:.3f} "
                  f"(fresh init {probe['between_volume_share_init']:.3f})"
                  + (" -- the encoder collapsed" if probe["collapsed"] else ""))
    if "snippet" in info:
        out.print(info["snippet"])
