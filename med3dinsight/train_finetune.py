"""`train finetune`: downstream segmentation or classification, pretrained vs scratch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from med3dinsight.common import WorkdirOpt, fail, out, switch
from med3dinsight.train_options import main_process, option, parse_kwargs
from training.finetune.config import FinetuneConfig as C
from training.loop.errors import TrainingError


def _metric_text(test: dict) -> str:
    if "dice" in test:
        per = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in test["dice"].items())
        mean = "-" if test["dice_mean"] is None else f"{test['dice_mean']:.3f}"
        text = f"Dice mean {mean} ({per})"
        if test.get("dice_mean_ignore_empty") is not None:
            text += f"; ignoring volumes that lack a class: {test['dice_mean_ignore_empty']:.3f}"
        return text
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
    train_fraction: float = option(C, "train_fraction", help="Share of the train cases used (data efficiency); "
                                   "stratified by class (seg: the label classes a case holds; cls: its label) and "
                                   "nested: the 25% subset lies inside the 50% one for the same --seed."),
    split_file: Optional[str] = option(C, "split_file", help="Choose the split: CSV case_id,split (train/val/test; "
                                       "ids: case_id, volume_id or the source file's name) or nnU-Net's "
                                       "splits_final.json (with --fold k; its val cases are scored). Default: the "
                                       "release's subject hash split."),
    fold: Optional[int] = option(C, "fold", help="The fold of --split-file (splits_final.json) or of --folds."),
    folds: Optional[int] = option(C, "folds", help="Cross-validation: deterministic subject-level N folds over the "
                                  "selected labelled cases, stratified by class; --fold k is scored, the rest train."),
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
    batch_dice: bool = switch(C, "batch_dice", "batch-dice", help="seg: the loss's Dice over the whole batch per "
                              "class (nnU-Net's batch Dice), for small structures that many volumes lack."),
    ckpt_every: int = option(C, "ckpt_every", help="Write step_N.pt every N steps."),
) -> None:
    """Downstream fine-tuning: does pretraining help? Scores the release's test subjects.

    Writes checkpoints/finetune/<name>/: final.pt (the MONAI network's state dict), final.json
    (class and constructor args; training.finetune.nets.load_final rebuilds it strictly),
    metrics.json ({"test": {"dice_mean", "dice": {class: x}}} or accuracy/auc, and the "split"
    used), metrics.jsonl. Dice: a class predicted on a volume that lacks it counts as 0; a class
    absent from both is not counted (MONAI's ignore-empty figure: dice_mean_ignore_empty).
    """
    from training.finetune.train import finetune

    cfg = C(
        workdir=workdir, task=task, encoder=encoder, init=init, where=where, labels=labels,
        train_fraction=train_fraction, split_file=split_file, fold=fold, folds=folds, steps=steps, epochs=epochs, stop_after=stop_after, batch_size=batch_size, lr=lr,
        wd=wd, warmup=warmup, grad_clip_norm=grad_clip_norm, precision=precision, workers=workers, resume=resume,
        seed=seed, name=name, encoder_kwargs=parse_kwargs(encoder_arg), img_size=img_size, feature_size=feature_size,
        batch_dice=batch_dice, log_every=log_every, report_to=report_to, ckpt_every=ckpt_every, device=device,
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
    if res.metrics:
        sp = res.metrics.get("split", {})
        where = {"file": f"--split-file {sp.get('file')}", "folds": f"--folds {sp.get('folds')} --fold {sp.get('fold')}"}
        fold = f" fold {sp['fold']}" if sp.get("source") == "file" and sp.get("fold") is not None else ""
        table.add_row("split", where.get(sp.get("source"), "release hash split") + fold)
    if res.losses:
        table.add_row("loss (first / last)", f"{res.losses[0]:.3f} / {res.losses[-1]:.3f}")
    table.add_row("test", _metric_text(res.metrics["test"]) if res.metrics else "(stopped early; --resume latest)")
    table.add_row("time", f"{res.seconds:.1f} s")
    out.print(table)
    # On its own line: a table cell truncates long paths in a narrow terminal.
    out.print(f"outputs: {res.directory}", soft_wrap=True, highlight=False)
