"""`train clip` (fine-tune open_clip on slice-caption pairs) and `train embed` (frozen CLIP
embeddings, computed once)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from curation.store.layout import Workdir
from med3dinsight.common import WorkdirOpt, fail, out
from med3dinsight.train_options import main_process, manifest_path, metrics_line, option, switch
from training.clip.config import ClipTrainConfig as C
from training.loop.errors import TrainingError

ManifestOpt = typer.Option(Path("manifests/v1.parquet"), "--manifest", help="Release manifest from `curate caption`: a name such as v2 (manifests/v2.parquet) or a path (relative: to the cwd, else the workdir).")


def clip_cmd(
    workdir: Path = WorkdirOpt,
    manifest: Path = ManifestOpt,
    model: str = option(C, "model", help="open_clip model name, or a model config JSON file."),
    pretrained: Optional[str] = option(C, "pretrained", help="open_clip tag (e.g. openai), hf-hub:ID, or a local checkpoint."),
    steps: Optional[int] = option(C, "steps"),
    epochs: int = option(C, "epochs"),
    stop_after: Optional[int] = option(C, "stop_after", "--stop-after", "--max-steps"),
    batch_size: int = option(C, "batch_size"),
    lr: float = option(C, "lr"),
    wd: float = option(C, "wd"),
    warmup: int = option(C, "warmup"),
    grad_clip_norm: float = option(C, "grad_clip_norm"),
    accum_freq: int = option(C, "accum_freq", help="Batches per step; the contrastive batch is all of them "
                             "(features cached, as open_clip)."),
    precision: str = option(C, "precision"),
    workers: int = option(C, "workers"),
    name: Optional[str] = option(C, "name"),
    resume: Optional[str] = option(C, "resume"),
    seed: int = option(C, "seed"),
    log_every: int = option(C, "log_every"),
    save_frequency: int = option(C, "save_frequency", help="Write epoch_N.pt every N epochs; 0 writes none "
                                 "(latest.pt and final.pt are always written). As open_clip's flag."),
    report_to: str = option(C, "report_to"),
    device: str = option(C, "device"),
    lock_image: bool = switch(C, "lock_image", "lock-image", "Freeze the image tower."),
    lock_text: bool = switch(C, "lock_text", "lock-text", "Freeze the text tower."),
) -> None:
    """Fine-tune CLIP (open_clip) on the manifest's train split; recall@1/5/10 on val each epoch.

    Writes checkpoints/clip/[<name>/]{epoch_N,latest,final}.pt (epoch_N every --save-frequency
    epochs); final.pt loads with
    open_clip.create_model_and_transforms(NAME, pretrained="checkpoints/clip/final.pt").
    """
    from training.clip.train import train_clip

    cfg = C(
        workdir=workdir, manifest=manifest_path(workdir, manifest), model=model, pretrained=pretrained, steps=steps,
        epochs=epochs, stop_after=stop_after, batch_size=batch_size, lr=lr, wd=wd, warmup=warmup,
        grad_clip_norm=grad_clip_norm, accum_freq=accum_freq, precision=precision, workers=workers, name=name,
        resume=resume, seed=seed, log_every=log_every, save_frequency=save_frequency, report_to=report_to, device=device, lock_image=lock_image, lock_text=lock_text,
    )
    try:
        res = train_clip(cfg)
    except (TrainingError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    if not main_process():
        return
    table = Table(title="train clip", show_header=False)
    table.add_row("model", res.model)
    table.add_row("steps", f"{res.step} / {res.total_steps}" + ("" if res.completed else " (stopped early; --resume latest)"))
    table.add_row("val before", metrics_line(res.base_metrics))
    table.add_row("val after", metrics_line(res.val_metrics))
    table.add_row("time", f"{res.seconds:.1f} s")
    table.add_row("latest checkpoint", str(res.latest_checkpoint))
    table.add_row("final checkpoint", str(res.final_checkpoint))
    out.print(table)


def embed_cmd(
    workdir: Path = WorkdirOpt,
    manifest: Path = ManifestOpt,
    clip: Optional[Path] = typer.Option(None, "--clip", help="CLIP checkpoint from `train clip` (default: checkpoints/clip/final.pt)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images or texts per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA when available) | cpu | cuda | cuda:N."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name/config when the checkpoint does not say."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes (0: load in the main process)."),
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
        s = embed_manifest(workdir, manifest_path(workdir, manifest), ckpt, batch_size=batch_size, device=device,
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
