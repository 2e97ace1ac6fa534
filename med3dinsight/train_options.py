"""The flags the three trainers share, spelled once, with defaults taken from each trainer's
config dataclass (`training.clip.config`, `training.pretrain.config`, `training.finetune.config`),
and the small helpers the `train` commands have in common."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import typer
from rich.markup import escape

from curation.store.manifest import resolve_manifest
from med3dinsight.common import console, default_of, fail, switch  # noqa: F401  (switch: re-exported)
from med3dinsight.common import option as _option

# One help text per shared flag; a trainer may add a sentence of its own (``extra``).
SHARED_HELP = {
    "steps": "Total optimizer steps; overrides --epochs.",
    "epochs": "Passes over the training data (when --steps is not given).",
    "stop_after": "End this invocation at this step; the schedule is unchanged, so --resume latest continues it.",
    "batch_size": "Samples per optimizer step (per process under torchrun).",
    "lr": "Peak learning rate (AdamW).",
    "wd": "Weight decay (not on norms, biases, embeddings and the temperature).",
    "warmup": "Linear warm-up steps, then cosine decay.",
    "grad_clip_norm": "Clip the global gradient norm to this; 0 disables.",
    "precision": "amp (fp16 + grad scaler; falls back to fp32 off CUDA) | bf16 | fp32.",
    "workers": "DataLoader worker processes (0: load in the main process).",
    "name": "Run folder checkpoints/<stage>/<name>/ (a second run with another --name keeps the first).",
    "resume": "latest (the run folder's newest readable checkpoint), or a checkpoint path.",
    "seed": "Seed of initialisation, sampling and augmentation.",
    "log_every": "Log a training line (and a metrics.jsonl row) every N optimizer steps.",
    "device": "auto (CUDA when available) | cpu | cuda | cuda:N.",
    "report_to": "Also log to tensorboard and/or wandb (comma-separated; optional installs; wandb offline "
                 "unless WANDB_MODE says otherwise).",
}


def main_process() -> bool:
    """False on the ranks of a torchrun job other than 0: one summary per job, not one per rank."""
    return os.environ.get("RANK", "0") in ("", "0")


def option(cls: type, name: str, *flags: str, help: str | None = None, extra: str = "", **kw: Any) -> Any:
    """A trainer option for config field ``name`` of ``cls`` (default from the dataclass), with the
    shared help text of SHARED_HELP unless ``help`` is given."""
    text = help if help is not None else SHARED_HELP.get(name, "")
    return _option(cls, name, *flags, help=f"{text} {extra}".strip(), **kw)


def manifest_path(workdir: Path, manifest: Path | str) -> Path:
    """The release manifest a command names, or one line saying what is missing."""
    try:
        return resolve_manifest(workdir, manifest)
    except FileNotFoundError as exc:  # names the path it stands for and the releases there are
        raise fail(str(exc)) from None


def parse_kwargs(items: list[str], flag: str = "--encoder-arg") -> dict:
    """--encoder-arg hidden_size=64 -> {"hidden_size": 64} (values parsed as JSON when they can be)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"{flag} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def metrics_line(metrics: dict | None) -> str:
    """``{"i2t_R@1": 0.5, ...}`` as one short line for a summary table."""
    if not metrics:
        return "-"

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.3f}"
        return str(v)

    return ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items())


class _ConsoleHandler(logging.Handler):
    """The training loggers' lines on the console: info as is, warnings as ``warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        text = escape(record.getMessage())
        # soft_wrap: one log line stays one line (greppable), however narrow the terminal.
        console.print(f"[yellow]warning:[/yellow] {text}" if record.levelno >= logging.WARNING else text,
                      highlight=False, soft_wrap=True)


def show_training_log() -> Callable[[], None]:
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
