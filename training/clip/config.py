"""The config of `train clip` and how a resume treats each of its fields (no torch: the command
line takes its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.loop.resume import ResumePolicy

# How a resume treats config fields that differ from the checkpoint's: the checkpoint names the
# model it continues (a different --model is overridden, with a warning); operational fields
# change freely; any other change (lr, epochs, ...) applies with a warning.
RESUME_POLICY = ResumePolicy(
    adopt=("model",),
    allow=("workdir", "pretrained", "workers", "precision", "resume", "device", "stop_after", "grad_clip_norm", "name",
           "log_every", "report_to", "progress", "save_frequency"),
)


@dataclass
class ClipTrainConfig:
    """Options of `train clip` (flag names follow open_clip's trainer)."""

    workdir: Path = Path(".")
    manifest: Path = Path("manifests/v1.parquet")
    model: str = "ViT-B-16"  # open_clip name, config JSON, or hf-hub: id
    pretrained: str | None = None  # open_clip tag, hf-hub: id, or checkpoint path; None = random init
    steps: int | None = None  # total optimizer steps; overrides epochs
    epochs: int = 10
    stop_after: int | None = None  # end this invocation at this step (schedule unchanged)
    batch_size: int = 64
    lr: float = 1e-5
    wd: float = 0.1
    warmup: int = 100  # optimizer steps
    workers: int = 2
    precision: str = "amp"  # amp (fp32 off CUDA) | bf16 | fp32
    resume: str | None = None  # "latest" or a checkpoint path
    seed: int = 0
    lock_image: bool = False
    lock_text: bool = False
    accum_freq: int = 1
    device: str = "auto"  # auto: cuda when available
    grad_clip_norm: float = 0.0  # 0 disables clipping (open_clip's default)
    name: str | None = None  # run folder checkpoints/clip/<name>/; None: checkpoints/clip/
    log_every: int = 10  # a training line every N steps (validation still once per epoch)
    save_frequency: int = 1  # epoch_N.pt every N epochs; 0: none (open_clip's --save-frequency)
    report_to: str = ""  # tensorboard and/or wandb, comma-separated
    progress: bool = True
