"""The `train` command line: parses, prints, and calls plain functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Train on curated slice-caption data: clip, embed, pretrain, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

WorkdirOpt = typer.Option(Path("."), "--workdir", help="Where manifests/, checkpoints/, embeddings/ ... live.")
ManifestOpt = typer.Option(Path("manifests/v1.parquet"), "--manifest", help="Release manifest (relative to --workdir or absolute).")


def _manifest(workdir: Path, manifest: Path) -> Path:
    path = manifest if manifest.is_absolute() or manifest.exists() else workdir / manifest
    if not path.exists():
        console.print(f"[red]error:[/red] {path}: no such manifest (run `curate caption` first)")
        raise typer.Exit(2)
    return path


def _metrics_line(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


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
    accum_freq: int = typer.Option(1, "--accum-freq", help="Gradient accumulation (batches per step)."),
    device: Optional[str] = typer.Option(None, "--device"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (resume later)."),
    grad_clip_norm: Optional[float] = typer.Option(None, "--grad-clip-norm"),
) -> None:
    """Fine-tune CLIP (open_clip) on the manifest's train split; recall@1/5/10 on val each epoch.

    Writes checkpoints/clip/{epoch_N,latest,final}.pt; final.pt loads with
    open_clip.create_model_and_transforms(NAME, pretrained="checkpoints/clip/final.pt").
    """
    from .clip_train import ClipTrainConfig, train_clip

    cfg = ClipTrainConfig(
        workdir=workdir, manifest=_manifest(workdir, manifest), model=model, pretrained=pretrained, epochs=epochs,
        batch_size=batch_size, lr=lr, wd=wd, warmup=warmup, workers=workers, precision=precision, resume=resume,
        seed=seed, lock_image=lock_image, lock_text=lock_text, accum_freq=accum_freq, device=device,
        max_steps=max_steps, grad_clip_norm=grad_clip_norm,
    )
    try:
        res = train_clip(cfg, log=console.print)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
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
    clip: Path = typer.Option(Path("checkpoints/clip/final.pt"), "--clip", help="CLIP checkpoint from `train clip`."),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name/config when the checkpoint does not say."),
    workers: int = typer.Option(0, "--workers"),
) -> None:
    """Embed every slice PNG and caption once with the frozen CLIP; only missing keys are computed.

    Stored float16, L2-normalised, under embeddings/<fingerprint>/ (image.parquet, text.parquet).
    """
    from .embed import embed_manifest

    ckpt = clip if clip.is_absolute() or clip.exists() else workdir / clip
    if not ckpt.exists():
        console.print(f"[red]error:[/red] {ckpt}: no such CLIP checkpoint (run `train clip` first)")
        raise typer.Exit(2)
    try:
        s = embed_manifest(workdir, _manifest(workdir, manifest), ckpt, batch_size=batch_size, device=device,
                           model=model, workers=workers, log=console.print)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    table = Table(title="train embed", show_header=False)
    table.add_row("fingerprint", s.fingerprint)
    table.add_row("model / dim", f"{s.model} / {s.dim}")
    table.add_row("images computed / reused", f"{s.images_computed} / {s.images_reused}")
    table.add_row("texts computed / reused", f"{s.texts_computed} / {s.texts_reused}")
    table.add_row("time", f"{s.seconds:.1f} s")
    table.add_row("store", str(workdir / "embeddings" / s.fingerprint))
    out.print(table)


@app.callback()
def main() -> None:
    """Training stages of med3dinsight."""


if __name__ == "__main__":  # pragma: no cover
    app()
