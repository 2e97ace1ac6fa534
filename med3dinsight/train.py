"""The `train` app: parses, prints, and calls plain functions of `training`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from curation.store.layout import Workdir
from curation.store.manifest import resolve_manifest
from med3dinsight.common import WorkdirOpt, console, fail, new_app, out, run_console
from training.loop.errors import TrainingError

app = new_app("Train on curated slice-caption data: clip, embed, pretrain, export, finetune.")

ManifestOpt = typer.Option(Path("manifests/v1.parquet"), "--manifest", help="Release manifest (path, or name under manifests/).")


def _manifest(workdir: Path, manifest: Path) -> Path:
    try:
        return resolve_manifest(workdir, manifest)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None


class _ConsoleHandler(logging.Handler):
    """The training loggers' lines on the console: info as is, warnings as ``warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        text = escape(record.getMessage())
        # soft_wrap: one log line stays one line (greppable), however narrow the terminal.
        console.print(f"[yellow]warning:[/yellow] {text}" if record.levelno >= logging.WARNING else text,
                      highlight=False, soft_wrap=True)


def _show_training_log() -> Callable[[], None]:
    """Route the training loggers to the console for one command; returns the undo."""
    logger = logging.getLogger("training")
    before = logger.level, logger.propagate
    handler = _ConsoleHandler()
    logger.addHandler(handler)
    # Not to the root logger too: a library's logging.warning() may have given it a stderr handler.
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def undo() -> None:
        logger.removeHandler(handler)
        logger.level, logger.propagate = before

    return undo


def _metrics_line(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.3f}"
        return str(v)

    return ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items())


@app.command("clip")
def clip_cmd(
    workdir: Path = WorkdirOpt,
    manifest: Path = ManifestOpt,
    model: str = typer.Option("ViT-B-16", "--model", help="open_clip model name, or a model config JSON file."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip tag (e.g. openai), hf-hub:ID, or a local checkpoint."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(1e-5, "--lr"),
    wd: float = typer.Option(0.1, "--wd"),
    warmup: int = typer.Option(100, "--warmup", help="Warmup steps (linear), then cosine."),
    workers: int = typer.Option(4, "--workers"),
    precision: Optional[str] = typer.Option(None, "--precision", help="amp | bf16 | fp32 (default: amp on CUDA, fp32 on CPU)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="latest, or a checkpoint path."),
    seed: int = typer.Option(0, "--seed"),
    lock_image: bool = typer.Option(False, "--lock-image", help="Freeze the image tower."),
    lock_text: bool = typer.Option(False, "--lock-text", help="Freeze the text tower."),
    accum_freq: int = typer.Option(1, "--accum-freq", help="Batches per step; the contrastive batch is all of them "
                                   "(features cached, as open_clip)."),
    device: Optional[str] = typer.Option(None, "--device"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (resume later)."),
    grad_clip_norm: Optional[float] = typer.Option(None, "--grad-clip-norm"),
) -> None:
    """Fine-tune CLIP (open_clip) on the manifest's train split; recall@1/5/10 on val each epoch.

    Writes checkpoints/clip/{epoch_N,latest,final}.pt; final.pt loads with
    open_clip.create_model_and_transforms(NAME, pretrained="checkpoints/clip/final.pt").
    """
    from training.clip.train import ClipTrainConfig, train_clip

    cfg = ClipTrainConfig(
        workdir=workdir, manifest=_manifest(workdir, manifest), model=model, pretrained=pretrained, epochs=epochs,
        batch_size=batch_size, lr=lr, wd=wd, warmup=warmup, workers=workers, precision=precision, resume=resume,
        seed=seed, lock_image=lock_image, lock_text=lock_text, accum_freq=accum_freq, device=device,
        max_steps=max_steps, grad_clip_norm=grad_clip_norm,
    )
    try:
        res = train_clip(cfg)
    except TrainingError as exc:
        raise fail(str(exc), 2) from None
    table = Table(title="train clip", show_header=False)
    table.add_row("model", res.model)
    table.add_row("steps", f"{res.step} / {res.total_steps}" + ("" if res.completed else " (stopped early; --resume latest)"))
    table.add_row("val before", _metrics_line(res.base_metrics))
    table.add_row("val after", _metrics_line(res.val_metrics))
    table.add_row("time", f"{res.seconds:.1f} s")
    table.add_row("latest checkpoint", str(res.latest_checkpoint))
    table.add_row("final checkpoint", str(res.final_checkpoint))
    out.print(table)


@app.command("embed")
def embed_cmd(
    workdir: Path = WorkdirOpt,
    manifest: Path = ManifestOpt,
    clip: Optional[Path] = typer.Option(None, "--clip", help="CLIP checkpoint from `train clip` (default: checkpoints/clip/final.pt)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name/config when the checkpoint does not say."),
    workers: int = typer.Option(0, "--workers"),
) -> None:
    """Embed every slice PNG and caption once with the frozen CLIP; only missing keys are computed.

    Stored float16, L2-normalised, under embeddings/<fingerprint>/ (image.parquet, text.parquet).
    """
    from training.clip.embed import embed_manifest

    if clip is None:
        ckpt = Workdir(workdir).clip_checkpoints / "final.pt"
    else:
        ckpt = clip if clip.is_absolute() or clip.exists() else workdir / clip
    if not ckpt.exists():
        raise fail(f"{ckpt}: no such CLIP checkpoint (run `train clip` first)")
    try:
        s = embed_manifest(workdir, _manifest(workdir, manifest), ckpt, batch_size=batch_size, device=device,
                           model=model, workers=workers)
    except TrainingError as exc:
        raise fail(str(exc), 2) from None
    table = Table(title="train embed", show_header=False)
    table.add_row("fingerprint", s.fingerprint)
    table.add_row("model / dim", f"{s.model} / {s.dim}")
    table.add_row("images computed / reused", f"{s.images_computed} / {s.images_reused}")
    table.add_row("texts computed / reused", f"{s.texts_computed} / {s.texts_reused}")
    table.add_row("time", f"{s.seconds:.1f} s")
    table.add_row("store", str(Workdir(workdir).embedding_store(s.fingerprint)))
    out.print(table)


def _parse_kwargs(items: list[str]) -> dict:
    """--encoder-arg hidden_size=64 -> {"hidden_size": 64} (values parsed as JSON when they can be)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--encoder-arg takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


@app.command("pretrain")
def pretrain_cmd(
    workdir: Path = WorkdirOpt,
    manifest: str = typer.Option("manifests/v1.parquet", "--manifest", help="Release manifest (path, or name under manifests/)."),
    encoder: str = typer.Option("vit", "--encoder", help="vit (MONAI ViT / UNETR encoder) | swin (SwinUNETR Swin-ViT) | cnn (3D ResNet)."),
    encoder_arg: list[str] = typer.Option([], "--encoder-arg", help="Encoder size overrides, KEY=VALUE (e.g. hidden_size=384)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Encoder input side (default: the manifest grid, 128)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total optimizer steps (overrides --epochs)."),
    epochs: int = typer.Option(300, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size", help="Per process."),
    lr: float = typer.Option(1e-4, "--lr"),
    wd: float = typer.Option(0.05, "--wd"),
    warmup: int = typer.Option(500, "--warmup"),
    grad_clip: float = typer.Option(1.0, "--grad-clip"),
    accum_freq: int = typer.Option(1, "--accum-freq", help="Micro-batches per step; the contrastive batch is all of "
                                   "them (features cached, as open_clip), at one micro-batch's memory."),
    precision: str = typer.Option("amp", "--precision", help="amp | bf16 | fp32 (amp falls back to fp32 on CPU)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="latest, or a checkpoint path."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(2, "--workers"),
    no_psat: bool = typer.Option(False, "--no-psat", help="Ablation Ex1: mean-pool + linear projection instead of PSAT."),
    no_pspe: bool = typer.Option(False, "--no-pspe", help="Ablation Ex2: no plane-slice position embedding."),
    num_queries: int = typer.Option(300, "--num-queries"),
    psat_width: int = typer.Option(512, "--psat-width"),
    psat_layers: int = typer.Option(2, "--psat-layers"),
    image_weight: float = typer.Option(1.0, "--image-weight"),
    text_weight: float = typer.Option(1.0, "--text-weight"),
    log_every: int = typer.Option(10, "--log-every"),
    ckpt_every: int = typer.Option(500, "--ckpt-every"),
    device: str = typer.Option("auto", "--device"),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="Embedding fingerprint (default: latest `train embed`)."),
    splits: str = typer.Option("train", "--splits", help="Release splits to learn from, e.g. train,val; the "
                               "retrieval metric uses val, or test when val is trained on."),
) -> None:
    """Align a 3D encoder to frozen CLIP slice/text embeddings through PSAT (Med3DInsight).

    No CLIP forward per step: embeddings come from `train embed`. Works under
    `torchrun --nproc-per-node N train pretrain ...` (gloo on CPU, nccl on GPU). Checkpoints in
    checkpoints/pretrain/ (step_N.pt, latest.pt), metrics in checkpoints/pretrain/metrics.jsonl.
    """
    from training.pretrain.train import PretrainConfig, pretrain

    cfg = PretrainConfig(
        workdir=workdir, manifest=manifest, encoder=encoder, encoder_kwargs=_parse_kwargs(encoder_arg), img_size=img_size,
        epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, wd=wd, warmup=warmup, grad_clip=grad_clip,
        accum_freq=accum_freq, precision=precision, resume=resume, seed=seed, workers=workers, use_psat=not no_psat,
        use_pspe=not no_pspe, num_queries=num_queries, psat_width=psat_width, psat_layers=psat_layers,
        image_weight=image_weight, text_weight=text_weight, log_every=log_every, ckpt_every=ckpt_every, device=device,
        embeddings=embeddings, splits=splits,
    )
    try:
        res = pretrain(cfg)
    except TrainingError as exc:
        raise fail(str(exc).strip(), 2) from None
    table = Table(title="train pretrain", show_header=False)
    table.add_row("steps", f"{res.start_step} -> {res.step} of {res.total_steps}")
    if res.losses:
        k = max(1, min(5, len(res.losses) // 2))
        table.add_row("loss (first / last)", f"{sum(res.losses[:k]) / k:.3f} / {sum(res.losses[-k:]) / k:.3f}")
    table.add_row("held-out retrieval", _metrics_line(res.retrieval))
    table.add_row("processes", str(res.world_size))
    table.add_row("checkpoint", str(res.checkpoint))
    table.add_row("metrics", str(res.metrics_path))
    out.print(table)


@app.command("export")
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
    if "snippet" in info:
        out.print(info["snippet"])


def _metric_text(test: dict) -> str:
    if "dice" in test:
        per = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in test["dice"].items())
        mean = "-" if test["dice_mean"] is None else f"{test['dice_mean']:.3f}"
        return f"Dice mean {mean} ({per})"
    auc = "-" if test.get("auc") is None else f"{test['auc']:.3f}"
    return f"accuracy {test['accuracy']:.3f}, AUC {auc}"


@app.command("finetune")
def finetune_cmd(
    workdir: Path = WorkdirOpt,
    task: str = typer.Option("seg", "--task", help="seg (UNETR / SwinUNETR, Dice per class) | cls (encoder + linear head)."),
    encoder: str = typer.Option("vit", "--encoder", help="vit | swin | cnn (cnn: --task cls only)."),
    init: str = typer.Option("scratch", "--init", help="scratch, an export of `train export` (exports/<enc>_encoder.json) "
                             "or a `train pretrain` checkpoint."),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition over volumes.parquet, e.g. \"subset = 'Task09_Spleen'\"."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="cls: CSV with a header case_id,label."),
    train_fraction: float = typer.Option(1.0, "--train-fraction", help="Share of the train cases used (data efficiency)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (overrides --epochs); 0 scores the initial network."),
    epochs: int = typer.Option(100, "--epochs"),
    batch_size: int = typer.Option(2, "--batch-size"),
    lr: float = typer.Option(1e-4, "--lr"),
    wd: float = typer.Option(1e-5, "--wd"),
    warmup: int = typer.Option(0, "--warmup"),
    precision: str = typer.Option("amp", "--precision", help="amp | bf16 | fp32 (amp falls back to fp32 on CPU)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="latest, or a checkpoint path."),
    seed: int = typer.Option(0, "--seed"),
    name: Optional[str] = typer.Option(None, "--name", help="Run folder under checkpoints/finetune/ (default: TASK-ENCODER-INIT)."),
    encoder_arg: list[str] = typer.Option([], "--encoder-arg", help="Encoder size overrides for --init scratch, KEY=VALUE."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Network input side (default: the init's, else the volumes' grid)."),
    feature_size: int = typer.Option(16, "--feature-size", help="UNETR decoder width."),
    log_every: int = typer.Option(10, "--log-every"),
    ckpt_every: int = typer.Option(500, "--ckpt-every"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Downstream fine-tuning: does pretraining help? Scores the release's test subjects.

    Writes checkpoints/finetune/<name>/: final.pt (the MONAI network's state dict), final.json
    (class and constructor args; training.finetune.nets.load_final rebuilds it strictly),
    metrics.json ({"test": {"dice_mean", "dice": {class: x}}} or accuracy/auc), metrics.jsonl.
    """
    from training.finetune.train import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        workdir=workdir, task=task, encoder=encoder, init=init, where=where, labels=str(labels) if labels else None,
        train_fraction=train_fraction, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, wd=wd, warmup=warmup,
        precision=precision, resume=resume, seed=seed, name=name, encoder_kwargs=_parse_kwargs(encoder_arg),
        img_size=img_size, feature_size=feature_size, log_every=log_every, ckpt_every=ckpt_every, device=device,
    )
    try:
        res = finetune(cfg)
    except TrainingError as exc:
        raise fail(str(exc).strip(), 2) from None
    table = Table(title=f"train finetune ({task}, {encoder}, init {init})", show_header=False)
    table.add_row("steps", f"{res.start_step} -> {res.step} of {res.total_steps}")
    table.add_row("volumes train / test", f"{res.n_train} / {res.n_test}")
    if res.losses:
        table.add_row("loss (first / last)", f"{res.losses[0]:.3f} / {res.losses[-1]:.3f}")
    table.add_row("test", _metric_text(res.metrics["test"]) if res.metrics else "(stopped early; --resume latest)")
    table.add_row("time", f"{res.seconds:.1f} s")
    out.print(table)
    # On its own line: a table cell truncates long paths in a narrow terminal.
    out.print(f"outputs: {res.directory}", soft_wrap=True, highlight=False)


@app.callback()
def main(ctx: typer.Context) -> None:
    """Training stages of med3dinsight."""
    ctx.call_on_close(_show_training_log())


def run() -> None:
    """Console script `train`: one line per fault, tracebacks with --debug."""
    run_console(app)


if __name__ == "__main__":  # pragma: no cover
    run()
