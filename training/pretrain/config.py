"""The config of `train pretrain` and how a resume treats each of its fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.loop.resume import ResumePolicy

if TYPE_CHECKING:
    from training.models.align_model import AlignSpec

# How a resume treats each config field. The encoder is compared through its resolved config
# (equivalent spellings are fine) and a different one is refused; the projection head's shape
# comes from the checkpoint; the embedding store too unless --embeddings names one; operational
# fields change freely; any other change (lr, batch size, ...) applies with a warning.
RESUME_POLICY = ResumePolicy(
    refuse=("encoder", "encoder_config"),
    adopt=("use_psat", "use_pspe", "num_queries", "psat_width", "psat_layers", "psat_heads"),
    inherit=("embeddings",),
    allow=("encoder_kwargs", "img_size", "workdir", "name", "resume", "stop_after", "workers", "log_every", "ckpt_every",
           "eval_every", "device", "progress", "report_to"),
)


@dataclass
class PretrainConfig:
    """Everything `train pretrain` needs; defaults follow the paper (§3.1) where it says."""

    workdir: Path
    manifest: str = "v1"  # release manifest: a path, or a name under <workdir>/manifests
    encoder: str = "vit"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None  # encoder input side; None = the manifest grid
    epochs: int = 300
    steps: int | None = None  # total optimizer steps; overrides epochs
    stop_after: int | None = None  # end this invocation at this step (schedule unchanged)
    batch_size: int = 32  # per rank
    lr: float = 1e-4
    wd: float = 0.05
    warmup: int = 500
    grad_clip_norm: float = 1.0  # 0 disables clipping
    accum_freq: int = 1
    # matched: every volume of a step's contrastive batch (all micro-batches, all ranks) at one
    # plane and slice index, so only the volume's content tells the candidates apart; random: a
    # random captioned slice per volume (the paper's sampling; an ablation: position alone then
    # solves the objective).
    position_sampling: str = "matched"
    precision: str = "amp"  # fp32 | amp (fp16 + grad scaler, CUDA) | bf16
    resume: str | Path | None = None  # "latest" or a checkpoint path
    seed: int = 0
    workers: int = 2
    name: str | None = None  # run folder checkpoints/pretrain/<name>/; None: checkpoints/pretrain/
    use_psat: bool = True  # False = ablation Ex1 (--no-psat): mean-pool + linear
    use_pspe: bool = True
    num_queries: int = 300
    psat_width: int = 512
    psat_layers: int = 2
    psat_heads: int = 8
    image_weight: float = 1.0
    text_weight: float = 1.0
    init_temperature: float = 0.07
    log_every: int = 10
    ckpt_every: int = 500
    eval_every: int = 0  # 0 = retrieval only when training finishes
    splits: str = "train"  # the release splits pretraining learns from, comma-separated (e.g. "train,val")
    val_split: str = "val"  # the retrieval holdout; falls back to "test" when it has no rows or is trained on
    device: str = "auto"
    embeddings: str | None = None  # embedding-store fingerprint; None = latest (or the checkpoint's)
    progress: bool = True
    report_to: str = ""  # tensorboard and/or wandb, comma-separated

    def align_spec(self) -> AlignSpec:
        """The model-side fields, for `training.models.align_model.build_model`."""
        from training.models.align_model import AlignSpec  # torch: not for the command line's defaults

        return AlignSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AlignSpec)})
