"""`train finetune`: downstream segmentation or classification, pretrained vs scratch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from med3dinsight.common import WorkdirOpt, fail, out
from med3dinsight.train_options import main_process, option, parse_kwargs
from training.finetune.config import FinetuneConfig as C
from training.loop.errors import TrainingError


def _metric_text(test: dict) -> str:
    if "dice" in test:
        per = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in test["dice"].items())
        mean = "-" if test["dice_mean"] is None else f"{test['dice_mean']:.3f}"
        return f"Dice mean {mean} ({per})"
    auc = "-" if test.get("auc") is None else f"{test['auc']:.3f}"
    return f"accuracy {test['accuracy']:.3f}, AUC {auc}"


def finetune_cmd(
    workdir: Path = WorkdirOpt,
    task: str = option(C, "task", help="seg (UNETR / SwinUNETR, Dice per class) | cls (encoder + linear head)."),
    encoder: str = option(C, "encoder", help="vit | swin | cnn (cnn: --task cls only)."),
    init: str = option(C, "init", help="scratch, an export of `train export` (exports/<enc>_encoder.json) "
                       "or a `train pretrain` checkpoint."),
    where: Optional[str] = option(C, "where", help="SQL condition over volumes.parquet, e.g. \"subset = 'Task09_Spleen'\"."),
    labels: Optional[str] = option(C, "labels", help="cls: CSV with a header case_id,label."),
    train_fraction: float = option(C, "train_fraction", help="Share of the train cases used (data efficiency)."),
    steps: Optional[int] = option(C, "steps", extra="0 scores the initial network."),
    epochs: int = option(C, "epochs"),
    stop_after: Optional[int] = option(C, "stop_after"),
    batch_size: int = option(C, "batch_size"),
    lr: float = option(C, "lr"),
    wd: float = option(C, "wd"),
    warmup: int = option(C, "warmup"),
    grad_clip_norm: float = option(C, "grad_clip_norm"),
    precision: str = option(C, "precision"),
    workers: int = option(C, "workers"),
    name: Optional[str] = option(C, "name", help="Run folder checkpoints/finetune/<name>/ (default: TASK-ENCODER-INIT)."),
    resume: Optional[str] = option(C, "resume"),
    seed: int = option(C, "seed"),
    log_every: int = option(C, "log_every"),
    report_to: str = option(C, "report_to"),
    device: str = option(C, "device"),
    encoder_arg: list[str] = typer.Option([], "--encoder-arg", help="Encoder size overrides for --init scratch, KEY=VALUE."),
    img_size: Optional[int] = option(C, "img_size", help="Network input side (default: the init's, else the volumes' grid)."),
    feature_size: int = option(C, "feature_size", help="UNETR decoder width."),
    ckpt_every: int = option(C, "ckpt_every", help="Write step_N.pt every N steps."),
) -> None:
    """Downstream fine-tuning: does pretraining help? Scores the release's test subjects.

    Writes checkpoints/finetune/<name>/: final.pt (the MONAI network's state dict), final.json
    (class and constructor args; training.finetune.nets.load_final rebuilds it strictly),
    metrics.json ({"test": {"dice_mean", "dice": {class: x}}} or accuracy/auc), metrics.jsonl.
    """
    from training.finetune.train import finetune

    cfg = C(
        workdir=workdir, task=task, encoder=encoder, init=init, where=where, labels=labels,
        train_fraction=train_fraction, steps=steps, epochs=epochs, stop_after=stop_after, batch_size=batch_size, lr=lr,
        wd=wd, warmup=warmup, grad_clip_norm=grad_clip_norm, precision=precision, workers=workers, resume=resume,
        seed=seed, name=name, encoder_kwargs=parse_kwargs(encoder_arg), img_size=img_size, feature_size=feature_size,
        log_every=log_every, report_to=report_to, ckpt_every=ckpt_every, device=device,
    )
    try:
        res = finetune(cfg)
    except TrainingError as exc:
        raise fail(str(exc).strip(), 2) from None
    if not main_process():
        return
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
