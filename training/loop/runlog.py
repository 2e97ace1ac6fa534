"""The metrics log of a run: ``metrics.jsonl`` (one JSON object a line, each with its ``step``),
mirrored to TensorBoard and/or Weights & Biases with ``--report-to`` (open_clip's flag; both are
optional installs: ``pip install tensorboard wandb``). wandb runs offline unless ``WANDB_MODE``
says otherwise (no network at run time; ``wandb sync`` uploads later).

Row keys follow one naming: training values plain (``loss``, ``lr``, ``logit_scale``), held-out
retrieval under ``val/`` with ``{query}2{target}_R@{k}`` names (``i2t``/``t2i`` for CLIP,
``v2t``/``v2i`` for 3D volume -> caption / slice image); see ``training.clip.retrieval``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from captions.offline.diversity import FEW_DISTINCT, caption_diversity
from curation.store.fsutil import atomic_write_text
from training.loop.errors import TrainingError

METRICS = "metrics.jsonl"
REPORT_TO = ("tensorboard", "wandb")
log = logging.getLogger(__name__)


def parse_report_to(value: str | None) -> tuple[str, ...]:
    """``--report-to tensorboard,wandb`` -> ("tensorboard", "wandb"); "" or None -> ()."""
    names = tuple(dict.fromkeys(v.strip().lower() for v in (value or "").split(",") if v.strip()))
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise TrainingError(f"--report-to {value}: choose from {', '.join(REPORT_TO)} (comma-separated)")
    return names


class MetricsLog:
    """Append-only ``metrics.jsonl`` in a checkpoint folder.

    Args:
        directory: the trainer's checkpoint folder.
        resume_step: None for a fresh run (the old log is dropped); else the step resumed from,
            and rows a killed run wrote past it are dropped, so every step appears once.
        main: False on the ranks that must not write (nothing is touched there).
        report_to: "tensorboard" and/or "wandb" (comma-separated): also send every number there;
            a requested one that is not installed is a TrainingError naming the install.
        run_name: the run's name for wandb (stage/name).
        config: the run's config (plain values), recorded by wandb.
    """

    def __init__(self, directory: Path, resume_step: int | None, main: bool = True, report_to: str | None = None,
                 run_name: str | None = None, config: dict[str, Any] | None = None):
        self.path = directory / METRICS
        self.main = main
        self._fh = None
        self._writer = None
        self._wandb = None
        targets = parse_report_to(report_to)
        if not main:
            return
        directory.mkdir(parents=True, exist_ok=True)
        keep: list[str] = []
        if resume_step is not None and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        self._fh = self.path.open("a")
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainingError("--report-to tensorboard: tensorboard is not installed (pip install tensorboard)") from None
            self._writer = SummaryWriter(log_dir=str(directory / "tensorboard"), purge_step=(resume_step or 0) + 1)
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise TrainingError("--report-to wandb: wandb is not installed (pip install wandb)") from None
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "med3dinsight"), name=run_name,
                                     dir=str(directory), config=config or {}, reinit=True,
                                     mode=os.environ.get("WANDB_MODE", "offline"), settings=wandb.Settings(silent=True))

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (it must hold ``step``); numbers also go to TensorBoard as ``train/<key>``
        or, for ``val/`` keys, under their own name."""
        if not self.main:
            return
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        numbers = {k if k.startswith(("val/", "test/")) else f"train/{k}": v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._writer is not None:
            for k, v in numbers.items():
                self._writer.add_scalar(k, v, row["step"])
        if self._wandb is not None and numbers:
            self._wandb.log(numbers, step=int(row["step"]))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def val_metrics(metrics: dict[str, float] | None) -> dict[str, float]:
    """``metrics`` with ``val/`` keys, as metrics.jsonl rows hold held-out results."""
    return {f"val/{k}": v for k, v in (metrics or {}).items()}


def recall_line(metrics: dict[str, float]) -> str:
    """The recall@k values of ``metrics`` for a log line: ``i2t_R@1=0.500 t2i_R@1=0.250 ...``."""
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "_R@" in k and not k.startswith("mean"))


def warn_few_captions(train: Any, val: Any) -> None:
    """Warn when the captions cannot teach or measure much: few distinct texts to learn from, or
    a held-out recall computed over fewer than ``FEW_DISTINCT`` distinct texts (R@10 of 9 texts is 1)."""
    tr, va = caption_diversity(train), caption_diversity(val)
    if tr["total"] and tr["distinct"] < FEW_DISTINCT:
        log.warning("the train split has %d distinct captions for %d pairs: a contrastive model learns little "
                    "from so few texts (richer captions: curate caption --provider openai, or more labels)",
                    tr["distinct"], tr["total"])
    if va["total"] and va["distinct"] < FEW_DISTINCT:
        log.warning("held-out recall is computed over %d distinct texts (fewer than %d): read R@k with that in "
                    "mind (chance R@1 is about 1/%d)", va["distinct"], FEW_DISTINCT, va["distinct"])
