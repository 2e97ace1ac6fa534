"""`train clip`: fine-tune an open_clip model on the manifest's (slice PNG, caption) pairs.

Symmetric contrastive loss (open_clip's ClipLoss with duplicates as positives: the same caption
or the same image twice in a batch is not a negative; ``training.models.losses``; learnable logit scale), AdamW with linear
warmup + cosine decay, optional tower locking and gradient accumulation done the open_clip way
(features of the whole accumulated batch take part in every chunk's loss). Validation
retrieval recall (``i2t_R@k``, ``t2i_R@k``) is measured for the base model before the first
step and after every epoch.

Checkpoints in ``Workdir.clip_checkpoints``: ``epoch_N.pt`` and ``final.pt`` are portable
(weights + plain metadata), ``latest.pt`` also holds optimizer, scaler and RNG state for
``--resume latest``. Metrics go to ``metrics.jsonl`` (see ``training.loop.runlog``). Precision,
schedule, weight-decay groups, RNG state, checkpoint files and the resume policy come from the
toolkit `train pretrain` uses too.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from curation.store.layout import Workdir
from training.clip.config import RESUME_POLICY, ClipTrainConfig
from training.clip.data import ClipPairs, EpochSampler, read_pairs, warn_cut_captions
from training.clip.retrieval import evaluate
from training.loop.accumulate import accumulate_gradients, optimizer_step
from training.loop.checkpoint import LATEST, config_dict, resolve_resume, save, warn_if_overwriting
from training.loop.distributed import resolve_device, unwrap
from training.loop.errors import TrainingError, input_errors
from training.loop.optim import adamw
from training.loop.precision import Precision, resolve_precision
from training.loop.progress import StepProgress
from training.loop.rng import rng_state, seed_all, set_rng_state
from training.loop.runlog import MetricsLog, recall_line, val_metrics, warn_few_captions
from training.loop.state import optimizer_state, restore_optimizer, scheduled_lr
from training.models.clip_models import (
    CHECKPOINT_FORMAT,
    HF_HUB_PREFIX,
    checkpoint_dict,
    create_clip,
    write_config_sidecar,
)
from training.models.losses import ContrastiveLoss, duplicate_positives

log = logging.getLogger(__name__)

@dataclass
class ClipTrainResult:
    model: str
    step: int
    total_steps: int
    completed: bool  # the whole schedule ran (final.pt written)
    latest_checkpoint: Path
    final_checkpoint: Path | None
    fingerprint: str
    base_metrics: dict[str, float]
    val_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)  # this run's metrics.jsonl rows
    seconds: float = 0.0


def train_clip(cfg: ClipTrainConfig) -> ClipTrainResult:
    """Fine-tune CLIP on the manifest's train split, evaluating on its val split each epoch.

    Raises TrainingError on bad input (manifest, model, checkpoint) or a refused resume.
    """
    return ClipTrainer(cfg).run()


class ClipTrainer:
    """A `train clip` run: model, data, optimizer and resume state set up on construction."""

    def __init__(self, cfg: ClipTrainConfig):
        self.t0 = time.time()
        self.workdir = Path(cfg.workdir)
        self.dir = Workdir(cfg.workdir).run_dir("clip", cfg.name)
        self.device = resolve_device(cfg.device)
        self.precision: Precision = resolve_precision(cfg.precision, self.device)
        if cfg.accum_freq < 1:
            raise TrainingError("--accum-freq must be >= 1")
        if cfg.save_frequency < 0:
            raise TrainingError("--save-frequency must be >= 0 (0: no epoch_N.pt)")
        seed_all(cfg.seed)

        resume_path, state = resolve_resume(cfg.resume, self.dir, CHECKPOINT_FORMAT)
        warn_if_overwriting(self.dir, resuming=state is not None)
        with input_errors():
            if state is not None:
                cfg = replace(cfg, **RESUME_POLICY.reconcile(state.get("config", {}), config_dict(cfg)))
                clip = create_clip(state["model"], str(resume_path), self.device)
                clip.model_cfg = state.get("model_cfg") or clip.model_cfg
            else:
                hub = (cfg.pretrained or "").startswith(HF_HUB_PREFIX)
                if not cfg.pretrained and not cfg.model.startswith(HF_HUB_PREFIX):
                    log.warning(
                        "--model %s without --pretrained: CLIP starts from RANDOM weights, not a pretrained "
                        "model; pass --pretrained TAG (e.g. openai), hf-hub:ID (e.g. "
                        "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224, needs the network) "
                        "or a local checkpoint path (offline)", cfg.model)
                clip = create_clip(cfg.pretrained if hub else cfg.model, None if hub else cfg.pretrained, self.device)
            self.train_df = read_pairs(self.workdir, cfg.manifest, "train")
            self.val_df = read_pairs(self.workdir, cfg.manifest, "val")
        self.cfg, self.clip, self.model = cfg, clip, clip.model
        warn_few_captions(self.train_df["caption"], self.val_df["caption"])
        warn_cut_captions(clip.tokenizer, self.train_df["caption"], "train")
        if cfg.lock_image:
            self.model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
        if cfg.lock_text:
            self.model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)

        self.train_ds = ClipPairs(self.workdir, self.train_df, clip.preprocess_train, clip.tokenizer, seed=cfg.seed)
        self.steps_per_epoch = len(self.train_ds) // cfg.batch_size // cfg.accum_freq
        if self.steps_per_epoch < 1:
            raise TrainingError(
                f"{len(self.train_ds)} training pairs make no optimizer step with --batch-size {cfg.batch_size} "
                f"and --accum-freq {cfg.accum_freq}")
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        if self.total_steps < 1:
            raise TrainingError("--steps must be >= 1")
        self.epochs = -(-self.total_steps // self.steps_per_epoch)
        self.optimizer = adamw(self.model, cfg.lr, cfg.wd)
        self.scaler = self.precision.grad_scaler()
        self.loss_fn = ContrastiveLoss()

        self.step = 0
        self.resumed = state is not None
        self.base_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        if state is not None:
            self._restore(resume_path, state)

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.base_metrics = state.get("base_metrics", {})
        self.val_metrics = state.get("metrics", {})
        if "optimizer" in state:
            restore_optimizer(state, self.optimizer, self.scaler, self.cfg.lr, self.cfg.wd, path)
            set_rng_state(state["rng"])
        else:
            log.warning("%s holds no optimizer state; the optimizer starts fresh", path)
        log.info("resumed %s at step %d/%d", path, self.step, self.total_steps)

    def evaluate(self) -> dict[str, float]:
        """Validation retrieval recall of the current model ({} without a val split)."""
        if self.val_df.empty:
            return {}
        return evaluate(
            self.model, [str(self.workdir / p) for p in self.val_df["image_path"]], list(self.val_df["image_sha256"]),
            list(self.val_df["caption"]), self.clip.preprocess_val, self.clip.tokenizer, self.device,
            batch_size=self.cfg.batch_size, workers=self.cfg.workers, autocast_dtype=self.precision.dtype,
        )

    def save(self, path: Path, full: bool, epoch: int) -> dict[str, Any]:
        """Write a portable checkpoint (weights + metadata) to ``path``; ``full`` adds the
        optimizer, scaler and RNG state that ``--resume`` needs."""
        extra: dict[str, Any] = {
            "pretrained": self.cfg.pretrained, "config": config_dict(self.cfg),
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "base_metrics": self.base_metrics, "step": self.step, "epoch": epoch, "metrics": self.val_metrics,
        }
        if full:
            extra.update(**optimizer_state(self.optimizer, self.scaler), rng=rng_state())
        ckpt = checkpoint_dict(self.model, self.clip.name, self.clip.model_cfg, **extra)
        save(ckpt, path)
        return ckpt

    def _epoch(self, epoch: int, stop_at: int, bar: StepProgress) -> tuple[list[float], float]:
        """Train from the current step to the end of ``epoch`` (or ``stop_at``): (finite losses, last lr)."""
        cfg, spe = self.cfg, self.steps_per_epoch
        done_batches = (self.step % spe) * cfg.accum_freq
        sampler = EpochSampler(len(self.train_ds), cfg.seed, epoch, skip=done_batches * cfg.batch_size)
        loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                            drop_last=True, pin_memory=self.device.type == "cuda")
        batches = itertools.islice(iter(loader), spe * cfg.accum_freq - done_batches)
        losses: list[float] = []
        lr = cfg.lr
        while self.step < stop_at and self.step // spe == epoch:
            chunk = list(itertools.islice(batches, cfg.accum_freq))
            lr = scheduled_lr(self.optimizer, cfg.lr, self.step, cfg.warmup, self.total_steps)
            loss = train_step(self.model, chunk, self.loss_fn, self.optimizer, self.scaler, self.device,
                              self.precision, cfg.grad_clip_norm, step=self.step + 1)
            self.step += 1
            bar.update(self.step, loss)
            losses.append(loss)
            if cfg.log_every and self.step % cfg.log_every == 0:
                log.info("step %d/%d loss %.4f lr %.2e", self.step, self.total_steps, loss, lr)
        return losses, lr

    def run(self) -> ClipTrainResult:
        """Train to the end of the schedule (or ``stop_after``) and return what happened."""
        cfg, spe = self.cfg, self.steps_per_epoch
        stop_at = self.total_steps if cfg.stop_after is None else min(self.total_steps, cfg.stop_after)
        history: list[dict[str, Any]] = []
        with MetricsLog(self.dir, resume_step=self.step if self.resumed else None, report_to=cfg.report_to,
                        run_name=f"clip/{cfg.name or 'default'}", config=config_dict(cfg)) as metrics:
            def record(row: dict[str, Any]) -> None:
                history.append(row)
                metrics.write(row)

            if not self.resumed:
                self.base_metrics = self.evaluate()
                record({"step": 0, "epoch": 0, **val_metrics(self.base_metrics)})
                log.info("base model (%s, pretrained=%s): val %s", self.clip.name, cfg.pretrained,
                         recall_line(self.base_metrics) or "(no val split)")
            self.model.train()
            with StepProgress("train clip", self.total_steps, self.step, enabled=cfg.progress) as bar:
                while self.step < stop_at:
                    epoch, t_epoch = self.step // spe, time.time()
                    losses, lr = self._epoch(epoch, stop_at, bar)
                    if self.step % spe and self.step < self.total_steps:
                        continue  # stopped mid-epoch (stop_after)
                    self.val_metrics = self.evaluate()
                    n_epoch = -(-self.step // spe)  # a last, partial epoch (--steps) counts
                    loss = sum(losses) / len(losses) if losses else float("nan")
                    record({"step": self.step, "epoch": n_epoch, "loss": loss, "lr": lr,
                            "logit_scale": float(unwrap(self.model).logit_scale.detach().exp()),
                            "seconds": round(time.time() - t_epoch, 2), **val_metrics(self.val_metrics)})
                    log.info("epoch %d/%d step %d/%d loss %.4f lr %.2e val %s", n_epoch, self.epochs, self.step,
                             self.total_steps, loss, lr, recall_line(self.val_metrics))
                    if cfg.save_frequency > 0 and n_epoch % cfg.save_frequency == 0:
                        self.save(self.dir / f"epoch_{n_epoch}.pt", full=False, epoch=n_epoch)
                    if self.step < stop_at:
                        self.save(self.dir / LATEST, full=True, epoch=n_epoch)

        ckpt = self.save(self.dir / LATEST, full=True, epoch=self.step // spe)
        final = None
        if self.step >= self.total_steps:
            final = self.dir / "final.pt"
            self.save(final, full=False, epoch=self.epochs)
            sidecar = write_config_sidecar(self.clip.name, self.clip.model_cfg, self.dir)
            log.info("final checkpoint %s%s", final,
                     f" (register {sidecar} with open_clip.add_model_config to load it)" if sidecar else "")
        return ClipTrainResult(
            model=self.clip.name, step=self.step, total_steps=self.total_steps, completed=final is not None,
            latest_checkpoint=self.dir / LATEST, final_checkpoint=final, fingerprint=ckpt["fingerprint"],
            base_metrics=self.base_metrics, val_metrics=self.val_metrics, history=history,
            seconds=time.time() - self.t0,
        )


def _positives(chunk: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Same caption (equal tokens) or same image (equal image id, when the batch carries it)."""
    tokens = torch.cat([b[1] for b in chunk])
    ids = torch.cat([b[2] for b in chunk]) if all(len(b) > 2 for b in chunk) else None
    return duplicate_positives(tokens, ids)


def train_step(
    model: torch.nn.Module,
    chunk: list[tuple[torch.Tensor, ...]],
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    precision: Precision,
    grad_clip_norm: float | None = None,
    step: int = 0,
) -> float:
    """One optimizer step over ``len(chunk)`` batches of (images, tokens[, image ids]) at the
    optimizer's current lr; returns the loss of the whole batch. Duplicates across the whole
    accumulated batch are positives. The accumulation and its non-finite policy (a non-finite
    loss raises a TrainingError naming ``step``) are the toolkit's (``training.loop.accumulate``)."""
    chunk = [tuple(t.to(device, non_blocking=True) for t in b) for b in chunk]
    pos = _positives(chunk)
    optimizer.zero_grad(set_to_none=True)

    def forward(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(model(*batch[:2])[:3])  # image features, text features, logit scale

    def loss(feats: tuple[torch.Tensor, ...], rest: tuple[torch.Tensor, ...], first: bool) -> dict[str, torch.Tensor]:
        # The logit scale's gradient is counted once (first micro-batch), not once per chunk.
        scale = rest[0] if first else rest[0].detach()
        return {"loss": loss_fn(feats[0], feats[1], scale, positives=pos)}

    def nonfinite(value: float, _batches: object) -> TrainingError:
        return TrainingError(f"non-finite loss ({value}) at step {step}: lower --lr, raise --warmup or use "
                             "--precision fp32; --resume latest restarts from the last checkpoint", step=step)

    out = accumulate_gradients(chunk, forward, loss, step=step, precision=precision, scaler=scaler,
                               model=unwrap(model), concat=2, on_nonfinite=nonfinite)
    optimizer_step(optimizer, scaler, grad_clip_norm or 0.0, step)
    with torch.no_grad():  # as open_clip: keep exp(logit_scale) <= 100
        unwrap(model).logit_scale.clamp_(0, math.log(100))
    return float(out["loss"].detach())
