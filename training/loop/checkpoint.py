"""Checkpoint files of both trainers: atomic save, checked load, `--resume`, config and its policy.

A trainer keeps its checkpoints in one folder (``Workdir.clip_checkpoints``,
``Workdir.pretrain_checkpoints``): numbered files (``step_N.pt`` / ``epoch_N.pt``) and
``latest.pt``, the one ``--resume latest`` continues from. Every file is written to a temporary
name and renamed, and loads under ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from curation.store.fsutil import atomic_path
from training.loop.errors import TrainingError
from training.loop.resume import ResumePolicy  # noqa: F401  (re-exported: the trainers' configs name it)

log = logging.getLogger(__name__)

LATEST = "latest.pt"
_NUMBERED = re.compile(r"(?:step|epoch)_(\d+)\.pt")


def save(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file, then rename: a kill never leaves a half-written file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def point_latest(target: Path) -> Path:
    """Make ``latest.pt`` beside ``target`` the same file, atomically (a hard link, which costs
    nothing; a copy where the filesystem has no links)."""
    latest = target.with_name(LATEST)
    with atomic_path(latest) as tmp:
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
    return latest


def load(path: str | os.PathLike, fmt: str | None = None) -> dict[str, Any]:
    """A checkpoint dict (``weights_only=True``, on CPU); TrainingError naming the file when it
    cannot be read or its ``format`` is not ``fmt``."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...: torch raises many kinds
        raise TrainingError(f"{path}: unreadable checkpoint ({_first_line(e)})") from e
    if fmt is not None and (not isinstance(ckpt, dict) or ckpt.get("format") != fmt):
        raise TrainingError(f"{path}: not a {fmt} checkpoint")
    return ckpt


def resolve_resume(resume: str | os.PathLike | None, directory: Path, fmt: str | None = None,
                   main: bool = True) -> tuple[Path, dict[str, Any]] | tuple[None, None]:
    """The checkpoint ``--resume`` names, loaded: ``(path, checkpoint)``, or ``(None, None)`` to start fresh.

    ``"latest"`` is ``directory/latest.pt``; none there yet means a fresh start. When it cannot be
    read (truncated, corrupt), the newest readable ``step_N.pt`` / ``epoch_N.pt`` is used instead,
    with one log line naming the bad file. Any other value is a path that must exist and load.
    ``main`` is False on the ranks that should not log.
    """
    if resume is None or str(resume) == "":
        return None, None
    if str(resume) != "latest":
        path = Path(resume)
        if not path.is_file():
            raise TrainingError(f"--resume {path}: no such checkpoint")
        return path, load(path, fmt)
    latest = directory / LATEST
    if not latest.exists():
        if main:
            log.info("--resume latest: no checkpoint in %s yet, starting fresh", directory)
        return None, None
    try:
        return latest, load(latest, fmt)
    except TrainingError as bad:
        skipped = []
        for path in sorted(_numbered(directory), key=lambda p: -int(_NUMBERED.fullmatch(p.name)[1])):
            try:
                ckpt = load(path, fmt)
            except TrainingError:
                skipped.append(path.name)
                continue
            if main:
                also = f" ({', '.join(skipped)} unreadable too)" if skipped else ""
                log.warning("%s; resuming from %s instead%s", bad, path.name, also)
            return path, ckpt
        raise TrainingError(f"{bad}, and no readable step_N.pt / epoch_N.pt beside it; "
                            "remove it to start fresh") from bad


def warn_if_overwriting(directory: Path, resuming: bool) -> None:
    """A fresh run in a folder that holds a ``latest.pt`` overwrites it: say so once."""
    if not resuming and (directory / LATEST).exists():
        log.warning("%s already holds checkpoints; this run starts from scratch and overwrites them "
                    "(pass --resume latest to continue)", directory)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain values (Paths as strings, tuples as lists), so configs saved in
    a checkpoint compare by value with the current one."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _numbered(directory: Path) -> list[Path]:
    return [p for p in directory.glob("*.pt") if _NUMBERED.fullmatch(p.name)]


def _first_line(e: BaseException) -> str:
    """A short reason: the first sentence of the first line (torch's can be a paragraph)."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return text.split(". ")[0][:120]
