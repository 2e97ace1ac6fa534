"""`train finetune`: does pretraining help downstream? Fine-tune a MONAI network from scratch or
from a pretrained encoder on the curated volumes and score it on the test subjects: the release's
hash split, or the user's (``--split-file``, ``--folds N --fold k``; metrics.json's ``split``).

seg: DiceCE loss, Dice per class on the test split (a class predicted on a volume that lacks it
counts as 0; ``training.finetune.evaluate``); a seg run that ends with no Dice is an error. cls:
cross-entropy, accuracy and AUC. Outputs in ``checkpoints/finetune/<name>/``: ``step_N.pt`` / ``latest.pt``
(``--resume latest``), ``final.pt`` (the network's state dict), ``final.json`` (class path and
constructor args: ``training.finetune.nets.load_final`` rebuilds it strictly), ``metrics.json``
and ``metrics.jsonl``. ``steps=0`` scores the initial network. The toolkit (precision, optim,
rng, checkpoint, runlog, errors) is the one `train pretrain` uses.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.store.fsutil import atomic_write_text
from curation.store.layout import Workdir
from training.finetune.config import RESUME_POLICY, FinetuneConfig
from training.finetune.data import (
    VolumeSet,
    batch_indices,
    case_strata,
    choose_split,
    label_values,
    read_labels,
    seg_classes,
    select_volumes,
    train_subset,
)
from training.finetune.evaluate import evaluate_cls, evaluate_seg, seg_loss
from training.finetune.nets import build_net, encoder_config_for, final_description, load_encoder, net_spec, read_init
from training.loop.checkpoint import config_dict, resolve_resume, save, warn_if_overwriting
from training.loop.distributed import resolve_device
from training.loop.errors import TrainingError
from training.loop.optim import adamw, warmup_cosine
from training.loop.precision import resolve_precision
from training.loop.prefetch import step_batches
from training.loop.progress import StepProgress
from training.loop.rng import rng_state, seed_all, set_rng_state
from training.loop.runlog import MetricsLog
from training.loop.state import optimizer_state, restore_optimizer, save_step, scheduled_lr

log = logging.getLogger(__name__)

CKPT_FORMAT = "med3dinsight-finetune-state/1"

@dataclass
class FinetuneResult:
    """What a `finetune` call did."""

    name: str
    directory: Path
    start_step: int
    step: int
    total_steps: int
    n_train: int
    n_test: int
    metrics: dict[str, Any]  # metrics.json's content ({"test": {...}, ...}); {} when stopped early
    losses: list[float]
    seconds: float


def run_name(cfg: FinetuneConfig) -> str:
    """The run's folder name under ``checkpoints/finetune``."""
    if cfg.name:
        try:
            Workdir(cfg.workdir).run_dir("finetune", cfg.name)  # the one check of a run name
        except ValueError as e:
            raise TrainingError(str(e)) from None
        return cfg.name
    tag = "scratch" if cfg.init == "scratch" else Path(cfg.init).stem
    return f"{cfg.task}-{cfg.encoder}-{tag}"


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run (or resume) a fine-tuning and score it on the test split. TrainingError on bad input."""
    return Finetuner(cfg).run()


def _resolve_init(cfg: FinetuneConfig) -> Path | None:
    if cfg.init == "scratch":
        return None
    p = Path(cfg.init)
    if p.exists() or p.is_absolute():
        return p
    return Path(cfg.workdir) / p


class Finetuner:
    """A fine-tuning run, set up from its config (and the checkpoint it resumes) on construction."""

    def __init__(self, cfg: FinetuneConfig):
        self.t0 = time.time()
        self.name = run_name(cfg)
        self.dir = Workdir(cfg.workdir).finetune_checkpoints / self.name
        self.last_ckpt, ckpt = resolve_resume(cfg.resume, self.dir, CKPT_FORMAT)
        warn_if_overwriting(self.dir, resuming=ckpt is not None)
        if ckpt is not None:
            cfg = replace(cfg, **RESUME_POLICY.reconcile(ckpt["config"], config_dict(cfg)))
        self.cfg = cfg
        if cfg.task not in ("seg", "cls"):
            raise TrainingError(f"--task {cfg.task}: choose seg or cls")
        if cfg.batch_size < 1 or (cfg.steps is not None and cfg.steps < 0) or cfg.epochs < 0:
            raise TrainingError("--batch-size must be >= 1 and --steps / --epochs >= 0")
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)

        rows = select_volumes(cfg.workdir, cfg.where)
        if rows.empty:
            raise TrainingError(f"no usable volumes{self._selection_hint()}")
        self.classes, targets, per_row = self._targets(rows)
        if targets is not None:
            keep = targets.notna().to_numpy()
            rows = rows[keep].reset_index(drop=True)
            per_row = [v for v, k in zip(per_row, keep) if k]
        strata = case_strata(rows, per_row)
        rows, self.split_info = choose_split(rows, cfg.split_file, cfg.fold, cfg.folds, strata)
        init_path = _resolve_init(cfg)
        self.init = read_init(init_path) if init_path is not None else None
        grid = int(rows["grid_size"].iloc[0]) if len(rows) else 128
        enc_cfg = encoder_config_for(cfg.encoder, self.init, cfg.img_size or grid, cfg.encoder_kwargs)
        if self.init is not None and cfg.img_size and cfg.img_size != enc_cfg.img_size:
            raise TrainingError(f"--img-size {cfg.img_size}: {self.init.path} was pretrained at {enc_cfg.img_size}")
        self.img_size = enc_cfg.img_size
        self.spec = net_spec(cfg.task, cfg.encoder, enc_cfg, len(self.classes), cfg.feature_size)

        train = train_subset(rows, cfg.train_fraction, cfg.seed, strata)
        test = rows[rows["split"] == "test"].reset_index(drop=True)
        if train.empty:
            raise TrainingError(f"no train volumes{self._selection_hint()}{self._split_hint()}")
        if test.empty:
            raise TrainingError(f"no test volumes: none of the {rows['case_id'].nunique()} selected cases falls in the "
                                f"test split{self._selection_hint()}{self._split_hint()}")
        self.split_info.update(n_train_cases=int(train["case_id"].nunique()), n_test_cases=int(test["case_id"].nunique()),
                               test_cases=sorted(test["case_id"].astype(str).unique()))
        self.train, self.test = self._set(train), self._set(test)

        seed_all(cfg.seed)  # the same scratch init (and decoder init) for the same seed
        self.net = build_net(self.spec).to(self.device)
        if self.init is not None:
            load_encoder(self.net, self.spec, self.init)
        self.optimizer = adamw(self.net, cfg.lr, cfg.wd)
        self.scaler = self.precision.grad_scaler()
        self.loss_fn = seg_loss(cfg.batch_dice) if cfg.task == "seg" else torch.nn.CrossEntropyLoss()
        self.per_epoch = max(1, len(self.train) // cfg.batch_size)
        self.total = cfg.steps if cfg.steps is not None else cfg.epochs * self.per_epoch
        self.step = 0
        self.resumed = ckpt is not None
        if ckpt is not None:
            self._restore(ckpt)

    def _selection_hint(self) -> str:
        return f" among the volumes --where {self.cfg.where!r} selects" if self.cfg.where else ""

    def _split_hint(self) -> str:
        if self.cfg.split_file or self.cfg.folds:
            return f" ({self.split_info['source']} split)"
        return ("; the release's hash split gives few test cases in a small collection: choose them with "
                "--split-file F (CSV case_id,split, or nnU-Net's splits_final.json with --fold k) or "
                "cross-validate with --folds N --fold k")

    def _targets(self, rows) -> tuple[list[str], Any, list[Any]]:
        """(class names, per-row target or None for seg, per-row stratum source: the label values
        of a seg volume, the label of a cls case); unlabelled rows get NaN and are dropped."""
        if self.cfg.task == "seg":
            labelled = rows["label_volume_path"].notna()
            if not labelled.any():
                raise TrainingError(f"no volumes with a label volume{self._selection_hint()}")
            if (~labelled).any():
                log.info("%d selected volumes have no label volume; left out", int((~labelled).sum()))
            values = label_values(self.cfg.workdir, rows[labelled])
            it = iter(values)
            per_row = [next(it) if ok else () for ok in labelled]
            return seg_classes(rows[labelled], values), labelled.map({True: 1.0, False: np.nan}), per_row
        if not self.cfg.labels:
            raise TrainingError("--task cls needs --labels CSV (case_id,label)")
        labels = read_labels(self.cfg.labels)
        classes = sorted(set(labels.values()))
        if len(classes) < 2:
            raise TrainingError(f"{self.cfg.labels}: needs at least two classes, found {classes}")
        index = {c: i for i, c in enumerate(classes)}
        targets = rows["case_id"].astype(str).map(lambda c: index.get(labels.get(c), np.nan))
        missing = int(targets.isna().sum())
        if missing:
            log.info("%d selected volumes have no label in %s; left out", missing, self.cfg.labels)
        return classes, targets, [labels.get(str(c)) for c in rows["case_id"]]

    def _set(self, rows) -> VolumeSet:
        if self.cfg.task == "seg":
            return VolumeSet(Path(self.cfg.workdir), rows, self.img_size)
        labels = read_labels(self.cfg.labels)
        index = {c: i for i, c in enumerate(self.classes)}
        return VolumeSet(Path(self.cfg.workdir), rows, self.img_size,
                         [index[labels[str(c)]] for c in rows["case_id"]])

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.net.load_state_dict(ckpt["model"])
        self.step = int(ckpt["step"])
        restore_optimizer(ckpt, self.optimizer, self.scaler, self._lr(), self.cfg.wd, self.last_ckpt)
        set_rng_state(ckpt["rng"])
        log.info("resumed %s at step %d/%d", self.last_ckpt, self.step, self.total)

    def _lr(self) -> float:
        return self.cfg.lr * warmup_cosine(self.step, self.cfg.warmup, self.total)

    def _save(self) -> Path:
        ckpt = {"format": CKPT_FORMAT, "step": self.step, "total_steps": self.total, "model": self.net.state_dict(),
                **optimizer_state(self.optimizer, self.scaler), "rng": rng_state(), "config": config_dict(self.cfg),
                "spec": json.loads(json.dumps(self.spec))}
        return save_step(ckpt, self.dir, self.step)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of optimizer step ``step`` (a function of seed and step alone)."""
        return self.train.batch(batch_indices(len(self.train), self.cfg.batch_size, self.cfg.seed, step))

    def _train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        cfg = self.cfg
        x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            out = self.net(x)
        loss = self.loss_fn(out.float(), y)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss.item()}) at step {self.step + 1}: lower --lr or use "
                                f"--precision fp32" + (f"; the last checkpoint is {self.last_ckpt}" if self.last_ckpt else ""),
                                step=self.step + 1)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip_norm if cfg.grad_clip_norm > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def evaluate(self) -> dict[str, Any]:
        """Test-split metrics of the current network."""
        if self.cfg.task == "seg":
            return evaluate_seg(self.net, self.test, self.classes, self.device, self.precision)
        return evaluate_cls(self.net, self.test, self.classes, self.device, self.precision)

    def run(self) -> FinetuneResult:
        """Train to the end (or ``stop_after``); then score the test split and write the finals."""
        cfg = self.cfg
        start = self.step
        end = min(self.total, cfg.stop_after) if cfg.stop_after is not None else self.total
        losses: list[float] = []
        progress = StepProgress(f"finetune {self.name}", self.total, start, enabled=cfg.progress)
        metrics: dict[str, Any] = {}
        with progress, MetricsLog(self.dir, resume_step=start if self.resumed else None,
                                  report_to=cfg.report_to, run_name=f"finetune/{self.name}",
                                  config=config_dict(cfg)) as mlog:
            batches = step_batches(self._batch, start, end, cfg.workers, pin_memory=self.device.type == "cuda")
            for batch in batches:
                lr = scheduled_lr(self.optimizer, cfg.lr, self.step, cfg.warmup, self.total)
                loss = self._train_step(batch)
                self.step += 1
                losses.append(loss)
                progress.update(self.step, loss)
                if self.step % cfg.log_every == 0 or self.step == end:
                    mlog.write({"step": self.step, "epoch": (self.step - 1) // self.per_epoch, "loss": loss, "lr": lr})
                if self.step % cfg.ckpt_every == 0 or self.step == end:
                    self.last_ckpt = self._save()
            if self.step >= self.total:
                metrics = self._finish(mlog)
        return FinetuneResult(name=self.name, directory=self.dir, start_step=start, step=self.step,
                              total_steps=self.total, n_train=len(self.train), n_test=len(self.test),
                              metrics=metrics, losses=losses, seconds=time.time() - self.t0)

    def _finish(self, mlog: MetricsLog) -> dict[str, Any]:
        test = self.evaluate()
        mlog.write({"step": self.step, **{f"test/{k}": v for k, v in _flat(test).items()}})
        self.dir.mkdir(parents=True, exist_ok=True)
        save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, self.dir / "final.pt")
        init = "scratch" if self.init is None else str(self.init.path)
        desc = final_description(self.spec, self.cfg.task, self.classes, self.img_size, init)
        atomic_write_text(self.dir / "final.json", json.dumps(desc, indent=2) + "\n")
        metrics = {"test": test, "step": self.step, "task": self.cfg.task, "encoder": self.cfg.encoder,
                   "init": init, "train_fraction": self.cfg.train_fraction, "n_train": len(self.train),
                   "n_test": len(self.test), "seed": self.cfg.seed, "split": self.split_info}
        atomic_write_text(self.dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if self.cfg.task == "seg" and test.get("dice_mean") is None:
            raise TrainingError(f"no Dice: none of the {len(self.test)} test volumes holds a class of "
                                f"{self.classes[1:]} and the network predicts none ({self.dir / 'metrics.json'})")
        return metrics


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in v.items() if vv is not None})
        elif isinstance(v, (int, float)) and v is not None:
            out[k] = v
    return out
