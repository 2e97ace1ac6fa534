"""The metrics log of a run: ``metrics.jsonl`` (one JSON object a line, each with its ``step``),
mirrored to TensorBoard when asked and installed.

Row keys follow one naming: training values plain (``loss``, ``lr``, ``logit_scale``), held-out
retrieval under ``val/`` with ``{query}2{target}_R@{k}`` names (``i2t``/``t2i`` for CLIP,
``v2t``/``v2i`` for 3D volume -> caption / slice image); see ``training.clip.retrieval``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from curation.store.fsutil import atomic_write_text

METRICS = "metrics.jsonl"


class MetricsLog:
    """Append-only ``metrics.jsonl`` in a checkpoint folder.

    Args:
        directory: the trainer's checkpoint folder.
        resume_step: None for a fresh run (the old log is dropped); else the step resumed from,
            and rows a killed run wrote past it are dropped, so every step appears once.
        main: False on the ranks that must not write (nothing is touched there).
        tensorboard: also write every number to ``directory/tensorboard`` (when installed).
    """

    def __init__(self, directory: Path, resume_step: int | None, main: bool = True, tensorboard: bool = False):
        self.path = directory / METRICS
        self.main = main
        self._fh = None
        self._writer = None
        if not main:
            return
        directory.mkdir(parents=True, exist_ok=True)
        keep: list[str] = []
        if resume_step is not None and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        self._fh = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self._writer = SummaryWriter(log_dir=str(directory / "tensorboard"),
                                             purge_step=(resume_step or 0) + 1)

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (it must hold ``step``); numbers also go to TensorBoard as ``train/<key>``
        or, for ``val/`` keys, under their own name."""
        if not self.main:
            return
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(k if k.startswith("val/") else f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._writer is not None:
            self._writer.close()

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
