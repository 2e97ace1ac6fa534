"""`train pretrain`: the loop that aligns a 3D encoder + PSAT with cached CLIP slice-image and
caption embeddings.

One optimizer step = ``accum_freq`` micro-batches of ``batch_size`` volumes per rank; each volume
contributes one captioned slice, whose frozen CLIP embeddings come from the store written by
`train embed` (no CLIP forward here). Checkpoints in ``Workdir.pretrain_checkpoints``
(``step_N.pt``, ``latest.pt``) hold everything needed to continue bit-for-bit: model, loss
(temperature), optimizer, grad scaler, every rank's RNG states, the step, the config.
Sampling is a pure function of (seed, step) (``data.StepBatchSampler``; by default every step's
batch shares one plane-slice position), so a resumed run sees the same batches. The config is in
``config.py``, the model in ``training.models.align_model``, one step in ``step.py`` (on
``training.loop.accumulate``), the held-out retrieval with its controls in ``retrieval.py``, the
collapse probe in ``probe.py``; the toolkit the trainers share in ``training.loop``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from curation.store.layout import Workdir
from curation.store.manifest import resolve_manifest
from training.loop.checkpoint import config_dict, resolve_resume, warn_if_overwriting
from training.loop.distributed import DistInfo, barrier, gather_objects, init_distributed, teardown, wrap_ddp
from training.loop.errors import TrainingError, input_errors
from training.loop.optim import warmup_cosine
from training.loop.precision import resolve_precision
from training.loop.progress import StepProgress
from training.loop.rng import rng_state, seed_all, set_rng_state
from training.loop.runlog import MetricsLog, val_metrics, warn_few_captions
from training.loop.state import optimizer_state, restore_optimizer, save_step, scheduled_lr
from training.models.align_model import CKPT_FORMAT, describe, model_encoder_config
from training.pretrain.config import RESUME_POLICY, PretrainConfig
from training.pretrain.data import StepBatchSampler, VolumeSliceDataset, grid_of, load_split
from training.pretrain.probe import probe_encoder
from training.pretrain.retrieval import evaluate_volumes
from training.pretrain.step import TrainState, nonfinite_error, train_step

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What a `pretrain` call did (rank 0's view)."""

    start_step: int
    step: int
    total_steps: int
    checkpoint: Path | None
    losses: list[float]  # one per step run here
    retrieval: dict[str, float] | None  # held-out v2t_R@k / v2i_R@k with controls (training.pretrain.retrieval)
    metrics_path: Path
    world_size: int
    probe: dict[str, Any] | None = None  # between-volume share of token variance (training.pretrain.probe)


OnStep = Callable[[int, dict[str, Any]], None]


def pretrain(cfg: PretrainConfig, on_step: OnStep | None = None) -> PretrainResult:
    """Run (or resume) pretraining; under torchrun every rank calls this with the same config.

    Args:
        cfg: the run's config.
        on_step: called after every optimizer step with the step and its metrics row.

    Returns:
        rank 0's summary. Raises TrainingError on bad input, a refused resume or a non-finite
        loss (naming the step).
    """
    info = init_distributed(cfg.device)
    try:
        return Pretrainer(cfg, info).run(on_step)
    finally:
        teardown(info)


def reconcile_config(cfg: PretrainConfig, ckpt: dict[str, Any], warn: bool = True) -> PretrainConfig:
    """The config to resume ``ckpt`` with, by ``RESUME_POLICY``."""
    enc_new = config_dict(model_encoder_config(cfg.align_spec(), ckpt["grid"]))
    saved = {**ckpt["config"], "encoder": ckpt["encoder"], "encoder_config": json.loads(json.dumps(ckpt["encoder_config"])),
             "embeddings": ckpt["embeddings"]}
    return replace(cfg, **RESUME_POLICY.reconcile(saved, {**config_dict(cfg), "encoder_config": enc_new}, warn=warn))


def train_splits(value: str) -> tuple[str, ...]:
    """``--splits`` ("train", "train,val", ...) as a tuple; TrainingError on an unknown name."""
    names = tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))
    bad = [n for n in names if n not in ("train", "val", "test")]
    if not names or bad:
        raise TrainingError(f"--splits {value!r}: comma-separated names among train, val, test")
    return names


class Pretrainer:
    """One rank's run: everything set up from the config (and the checkpoint it resumes) on
    construction; ``run`` trains to the end (or ``stop_after``)."""

    def __init__(self, cfg: PretrainConfig, info: DistInfo):
        self.info, self.device, self.main = info, info.device, info.main
        self.dir = Workdir(cfg.workdir).run_dir("pretrain", cfg.name)
        self.last_ckpt, ckpt = resolve_resume(cfg.resume, self.dir, CKPT_FORMAT, main=self.main)
        if self.main:
            warn_if_overwriting(self.dir, resuming=ckpt is not None)
        self.resumed = ckpt is not None
        if ckpt is not None:
            cfg = reconcile_config(cfg, ckpt, warn=self.main)
        self.cfg = cfg
        if cfg.batch_size < 1 or cfg.accum_freq < 1:
            raise TrainingError("--batch-size and --accum-freq must be >= 1")
        precision = resolve_precision(cfg.precision, self.device, warn=self.main)

        with input_errors():
            manifest = resolve_manifest(cfg.workdir, cfg.manifest)
            self.splits = train_splits(cfg.splits)
            train = load_split(cfg.workdir, manifest, self.splits, cfg.embeddings, cfg.seed, cfg.img_size)
            if train is None:
                raise TrainingError(f"{manifest}: no captioned, unrefused rows in --splits {cfg.splits}")
            self.data, self.fingerprint = train
            self.grid = grid_of(self.data.rows)
        self.val = self._val_split(manifest)
        if self.main:
            warn_few_captions(self.data.rows["caption"], self.val.rows["caption"] if self.val is not None else [])

        seed_all(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        self.state = TrainState.create(cfg, self.grid, self.data.image_emb.shape[1], self.device, precision)
        try:
            self.sampler = StepBatchSampler(self.data, cfg.batch_size, cfg.accum_freq, info.rank, info.world,
                                            seed=cfg.seed, mode=cfg.position_sampling)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        self.per_epoch = self.sampler.per_epoch
        self.total = cfg.steps if cfg.steps is not None else cfg.epochs * self.per_epoch
        self.step = 0
        if ckpt is not None:
            self._restore(ckpt)
        else:
            torch.manual_seed(cfg.seed + info.rank)  # per-rank streams (dropout) from here on
        self.state.ddp = wrap_ddp(self.state.model, info)
        self.loader = DataLoader(self.data, batch_sampler=self.sampler, num_workers=cfg.workers,
                                 pin_memory=self.device.type == "cuda")

    def _val_split(self, manifest: Path) -> VolumeSliceDataset | None:
        cfg = self.cfg
        # The holdout is never a split the run learns from (--splits train,val keeps test out).
        held = [s for s in dict.fromkeys([cfg.val_split, "test"] if cfg.val_split == "val" else [cfg.val_split])
                if s not in self.splits]
        if not held and self.main:
            log.warning("--splits %s trains on every split: no held-out retrieval metric", cfg.splits)
        for split in held:
            try:
                loaded = load_split(cfg.workdir, manifest, split, self.fingerprint, cfg.seed, cfg.img_size)
            except TrainingError as e:
                if self.main:
                    log.warning("no retrieval on %s: %s", split, e)
                return None
            if loaded is not None:
                return loaded[0]
        return None

    def _restore(self, ckpt: dict[str, Any]) -> None:
        s = self.state
        s.model.load_state_dict(ckpt["model"])
        s.loss_fn.load_state_dict(ckpt["loss"])
        self.step = int(ckpt["step"])
        restore_optimizer(ckpt, s.optimizer, s.scaler, self._lr(), self.cfg.wd, self.last_ckpt)
        states = ckpt["rng"]
        if len(states) == self.info.world:
            set_rng_state(states[self.info.rank])
        else:
            if self.main:
                log.warning("resume: checkpoint from %d rank(s), now %d; batches and RNG streams differ "
                            "from an uninterrupted run", len(states), self.info.world)
            torch.manual_seed(self.cfg.seed + self.info.rank + self.step)

    def _lr(self) -> float:
        return self.cfg.lr * warmup_cosine(self.step, self.cfg.warmup, self.total)

    def _save(self, metrics: dict[str, Any]) -> Path | None:
        states = gather_objects(rng_state(), self.info.world)
        if not self.main:
            return None
        s = self.state
        ckpt = {
            "format": CKPT_FORMAT,
            "step": self.step,
            "total_steps": self.total,
            "epoch": self.step // self.per_epoch,
            "model": s.model.state_dict(),
            "loss": s.loss_fn.state_dict(),
            **optimizer_state(s.optimizer, s.scaler),
            "rng": states,
            "world_size": self.info.world,
            "config": config_dict(self.cfg),
            **describe(s.model, self.cfg.encoder, self.grid, self.data.image_emb.shape[1]),
            "embeddings": self.fingerprint,
            "metrics": metrics,
            "torch_version": str(torch.__version__),
        }
        return save_step(ckpt, self.dir, self.step)

    def _evaluate(self) -> dict[str, float] | None:
        result = None
        if self.main and self.val is not None:
            result = evaluate_volumes(self.state.model, self.val, self.device, autocast=self.state.precision.autocast,
                                      seed=self.cfg.seed)
        barrier(self.info.world)
        return result

    def _probe(self) -> dict[str, Any] | None:
        """The collapse probe on the held-out volumes (train when none are held out), rank 0."""
        result = None
        if self.main:
            data, split = (self.val, "held-out") if self.val is not None else (self.data, "train")
            result = probe_encoder(self.state.model.encoder, self.state.model.encoder.config, self.cfg.seed,
                                   data.workdir, data.volume_paths, self.device, split)
        barrier(self.info.world)
        return result

    def _nonfinite(self, batch: dict[str, torch.Tensor], value: float) -> TrainingError:
        return nonfinite_error(self.step + 1, batch, self.data, value, self.last_ckpt)

    def run(self, on_step: OnStep | None = None) -> PretrainResult:
        """Train from the current step to the end (or ``stop_after``); rank 0's summary."""
        cfg = self.cfg
        start = self.step
        end = min(self.total, cfg.stop_after) if cfg.stop_after is not None else self.total
        progress = StepProgress("pretrain", self.total, start, enabled=self.main and cfg.progress)
        losses: list[float] = []
        retrieval = probe = None
        it = None
        metrics = MetricsLog(self.dir, resume_step=start if self.resumed else None, main=self.main,
                             report_to=cfg.report_to, run_name=f"pretrain/{cfg.name or 'default'}",
                             config=config_dict(cfg))
        with progress, metrics:
            while self.step < end:
                epoch = self.step // self.per_epoch
                if it is None:
                    self.sampler.start = self.step
                    it = iter(self.loader)
                lr = scheduled_lr(self.state.optimizer, cfg.lr, self.step, cfg.warmup, self.total)
                t0 = time.perf_counter()
                vals = train_step(self.state, cfg, it, self.step + 1, on_nonfinite=self._nonfinite)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.step += 1
                losses.append(vals["loss"])
                row = {"step": self.step, "epoch": epoch, **vals, "lr": lr, "step_time": dt,
                       "samples_per_s": vals["batch"] * self.info.world / dt}
                progress.update(self.step, vals["loss"])
                if self.step % cfg.log_every == 0 or self.step == end:
                    metrics.write(row)
                if on_step is not None:
                    on_step(self.step, row)
                if self.step % cfg.ckpt_every == 0 or self.step == end:
                    self.last_ckpt = self._save(row) or self.last_ckpt
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total:
                    retrieval = self._evaluate()
                    if retrieval is not None:
                        metrics.write({"step": self.step, **val_metrics(retrieval)})
                if self.step == self.total:
                    probe = self._probe()
                    if probe is not None:
                        metrics.write({"step": self.step, **{f"probe/{k}": v for k, v in probe.items()}})
        return PretrainResult(start_step=start, step=self.step, total_steps=self.total,
                              checkpoint=self.last_ckpt, losses=losses, retrieval=retrieval,
                              metrics_path=metrics.path, world_size=self.info.world, probe=probe)
