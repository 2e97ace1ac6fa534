"""The config of `train finetune` and how a resume treats each of its fields (no torch: the
command line takes its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.loop.resume import ResumePolicy

# What a resume does with a changed field: the data and the network must stay; lr etc. warn.
RESUME_POLICY = ResumePolicy(
    refuse=("task", "encoder", "init", "where", "labels", "train_fraction", "encoder_kwargs", "img_size",
            "feature_size", "seed", "split_file", "fold", "folds"),
    allow=("workdir", "resume", "name", "workers", "log_every", "ckpt_every", "device", "progress", "report_to", "stop_after"),
)


@dataclass
class FinetuneConfig:
    """Options of `train finetune` (one place for the defaults)."""

    workdir: Path
    task: str = "seg"  # seg | cls
    encoder: str = "vit"  # vit | swin | cnn
    init: str = "scratch"  # scratch, an export (.json / .pt) or a pretrain checkpoint
    where: str | None = None  # DuckDB SQL condition over volumes.parquet
    labels: str | None = None  # cls: CSV case_id,label
    train_fraction: float = 1.0  # share of the train cases, stratified by class and nested across fractions
    split_file: str | None = None  # CSV case_id,split or nnU-Net's splits_final.json (default: the hash split)
    fold: int | None = None  # the fold of --split-file (splits_final.json) or of --folds
    folds: int | None = None  # subject-level k-fold over the selected cases; --fold k is scored
    steps: int | None = None  # overrides epochs
    epochs: int = 100
    stop_after: int | None = None  # end this invocation at this step (schedule unchanged)
    batch_size: int = 2
    lr: float = 1e-4
    wd: float = 1e-5
    warmup: int = 0
    grad_clip_norm: float = 1.0
    precision: str = "amp"
    workers: int = 2  # DataLoader processes that load and resize the next batches
    resume: str | None = None
    seed: int = 0
    name: str | None = None  # default: <task>-<encoder>-<scratch | init file stem>
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # scratch only
    img_size: int | None = None  # network input side; default: the init's, else the volumes' grid
    feature_size: int = 16  # UNETR decoder width
    batch_dice: bool = False  # seg: Dice over the whole batch per class (nnU-Net's batch Dice; evaluate.seg_loss)
    log_every: int = 10
    ckpt_every: int = 500
    device: str = "auto"
    progress: bool = True
    report_to: str = ""  # tensorboard and/or wandb, comma-separated
