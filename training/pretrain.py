"""`train pretrain`: align a 3D encoder + PSAT with cached CLIP slice-image and caption embeddings.

One optimizer step = ``accum_freq`` micro-batches of ``batch_size`` volumes per rank; each volume
contributes one captioned slice, whose frozen CLIP embeddings come from the store written by
`train embed` (no CLIP forward here). Checkpoints under ``<workdir>/checkpoints/pretrain``
(``step_N.pt``, ``latest.pt``) hold everything needed to continue bit-for-bit: model, loss
(temperature), optimizer, scheduler, grad scaler, every rank's RNG states, the step, the config.
Sampling is a pure function of (seed, epoch, volume), so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from training.embed_store import load_embeddings
from training.encoders import Encoder3D, build_encoder_from_config, encoder_config
from curation.fsutil import atomic_path
from training.export import export_encoder
from training.losses import AlignmentLoss
from training.pretrain_data import (
    ResumableSampler, VolumeSliceDataset, captioned_rows, grid_of, load_volume, resolve_manifest,
)
from training.psat import PSAT, LinearProjector, PSATConfig

log = logging.getLogger(__name__)

CKPT_FORMAT = "med3dinsight-pretrain/1"
# Fields that shape the projection head: on resume a mismatch warns and the checkpoint's value
# wins (nanoGPT's "resume forces the config"); an encoder mismatch is refused outright.
HEAD_FIELDS = ("use_psat", "use_pspe", "num_queries", "psat_width", "psat_layers", "psat_heads")
# Compared through the resolved encoder config instead (equivalent spellings are fine).
ENCODER_FIELDS = ("encoder", "encoder_kwargs", "img_size")
# Operational fields that may change freely between a run and its resumption.
FREE_FIELDS = ("workdir", "resume", "stop_after", "workers", "log_every", "ckpt_every",
               "eval_every", "device", "progress", "tensorboard", "embeddings")


class PretrainError(RuntimeError):
    """A pretraining run cannot continue; ``step`` is the 1-based step it failed on, if any."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class PretrainWarning(UserWarning):
    """Resume found a config that disagrees with the checkpoint, or precision fell back."""


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
    grad_clip: float = 1.0  # 0 disables clipping
    accum_freq: int = 1
    precision: str = "amp"  # fp32 | amp (fp16 + grad scaler, CUDA) | bf16
    resume: str | Path | None = None  # "latest" or a checkpoint path
    seed: int = 0
    workers: int = 2
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
    val_split: str = "val"  # falls back to "test" when the manifest has no val rows
    device: str = "auto"
    embeddings: str | None = None  # embedding-store fingerprint; None = latest (or the checkpoint's)
    progress: bool = True
    tensorboard: bool = True


@dataclass
class PretrainResult:
    """What a `pretrain` call did (rank 0's view)."""

    start_step: int
    step: int
    total_steps: int
    checkpoint: Path | None
    losses: list[float]  # one per step run here
    retrieval: dict[str, float] | None
    metrics_path: Path
    world_size: int


class AlignModel(nn.Module):
    """3D encoder -> tokens -> projection head (PSAT or linear) -> (B, clip_dim)."""

    def __init__(self, encoder: Encoder3D, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, volume: torch.Tensor, plane: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(volume), plane, index)


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "checkpoints" / "pretrain"


def build_model(cfg: PretrainConfig, grid: int, clip_dim: int) -> AlignModel:
    """Encoder from the registry plus the head; the PSAT position table has ``grid`` rows."""
    enc_cfg = encoder_config(cfg.encoder, img_size=cfg.img_size or grid, **cfg.encoder_kwargs)
    encoder = build_encoder_from_config(enc_cfg)
    if cfg.use_psat:
        head = PSAT(PSATConfig(in_dim=encoder.out_dim, width=cfg.psat_width, num_queries=cfg.num_queries,
                               num_layers=cfg.psat_layers, num_heads=cfg.psat_heads, out_dim=clip_dim,
                               grid=grid, use_pspe=cfg.use_pspe))
    else:
        head = LinearProjector(encoder.out_dim, clip_dim)
    # MONAI's TransformerBlock always builds norm_cross_attn but uses it only with cross-attention;
    # DDP (find_unused_parameters=False, the fast path) wants a gradient for every trainable one.
    for m in encoder.modules():
        if getattr(m, "with_cross_attention", None) is False and hasattr(m, "norm_cross_attn"):
            m.norm_cross_attn.requires_grad_(False)
    return AlignModel(encoder, head)


def param_groups(modules: dict[str, nn.Module], wd: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only, none on biases, norms, the logit scale,
    position embeddings and the PSAT queries (decaying those pulls them toward zero for no gain)."""
    decay, no_decay = [], []
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            exempt = p.ndim < 2 or any(k in name for k in ("pspe", "queries", "position_embeddings", "logit_scale"))
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


@torch.no_grad()
def retrieval_metrics(model: AlignModel, data: VolumeSliceDataset, device: torch.device,
                      ks: tuple[int, ...] = (1, 5),
                      autocast: Callable[[], Any] | None = None) -> dict[str, float]:
    """3D -> caption (and 3D -> slice image) retrieval over every captioned slice of ``data``.

    Each (volume, plane, index) query is ranked against all distinct captions (images) of the
    split; recall@k is the share of queries whose own caption ranks in the top k, next to the
    chance level k / candidates. The encoder runs once per volume; the head once per slice.
    """
    was_training = model.training
    model.eval()
    queries = []
    for vi in range(len(data)):
        rows = data.slices[vi]
        vol = load_volume(data.workdir, data.volume_paths[vi], data.img_size).unsqueeze(0).to(device)
        plane = torch.as_tensor(data.rows["plane_index"].to_numpy()[rows].astype(np.int64), device=device)
        index = torch.as_tensor(data.rows["index"].to_numpy()[rows].astype(np.int64), device=device)
        with autocast() if autocast else nullcontext():
            tokens = model.encoder(vol)
            for s in range(0, len(rows), 64):
                proj = model.head(tokens.expand(len(rows[s:s + 64]), -1, -1), plane[s:s + 64], index[s:s + 64])
                queries.append(F.normalize(proj.float(), dim=-1))
    model.train(was_training)
    q = torch.cat(queries)
    order = np.concatenate(data.slices)  # query i is row order[i]
    out: dict[str, float] = {"queries": float(len(q)), "volumes": float(len(data))}
    for kind, emb, keys in (("text", data.text_emb, data.rows["caption"]),
                            ("image", data.image_emb, data.rows["image_sha256"])):
        uniq, first, inverse = np.unique(keys.to_numpy().astype(str), return_index=True, return_inverse=True)
        cand = F.normalize(torch.from_numpy(emb[first].astype(np.float32)).to(device), dim=-1)
        sims = q @ cand.t()
        target = torch.as_tensor(inverse[order], device=device)
        correct = sims.gather(1, target[:, None])
        rank = (sims > correct).sum(1).float()
        n = len(uniq)
        out[f"{kind}_candidates"] = float(n)
        out[f"{kind}_median_rank"] = float(rank.median().item() + 1)
        for k in ks:
            out[f"{kind}_recall@{k}"] = float((rank < k).float().mean().item())
            out[f"{kind}_chance@{k}"] = min(k, n) / n
    return out


def _config_dict(cfg: PretrainConfig) -> dict[str, Any]:
    # JSON round trip: Paths become strings and tuples lists, so configs compare by value.
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _point_latest(target: Path, latest: Path) -> None:
    # A hard link is an atomic, free copy; a copy where the filesystem has no links.
    tmp = latest.with_name(f".{latest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        tmp.write_bytes(target.read_bytes())
    os.replace(tmp, latest)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A pretraining checkpoint (loads with ``weights_only=True``)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CKPT_FORMAT:
        raise PretrainError(f"{path}: not a {CKPT_FORMAT} checkpoint")
    return ckpt


def reconcile_config(cfg: PretrainConfig, ckpt: dict[str, Any], rank: int = 0) -> PretrainConfig:
    """The config to resume with: refuses another encoder, takes the checkpoint's head shape
    (warning), keeps new training hyperparameters (warning) and the checkpoint's embeddings."""
    old, new = ckpt["config"], _config_dict(cfg)
    grid = ckpt["grid"]
    enc_new = json.loads(json.dumps(dataclasses.asdict(
        encoder_config(cfg.encoder, img_size=cfg.img_size or grid, **cfg.encoder_kwargs))))
    enc_old = json.loads(json.dumps(ckpt["encoder_config"]))
    if cfg.encoder != ckpt["encoder"] or enc_new != enc_old:
        diff = {k: (enc_old.get(k), enc_new.get(k)) for k in enc_old.keys() | enc_new.keys() if enc_old.get(k) != enc_new.get(k)}
        raise PretrainError(
            f"cannot resume: the checkpoint's encoder is {ckpt['encoder']!r} but this run asks for "
            f"{cfg.encoder!r}" + (f" with different fields (checkpoint, now): {diff}" if diff else "")
            + "; pass the same --encoder flags or start in a new workdir")
    changes: dict[str, Any] = {}
    for name in HEAD_FIELDS:
        if name in old and old[name] != new[name]:
            changes[name] = old[name]
            if rank == 0:
                warnings.warn(f"resume: {name}={new[name]!r} differs from the checkpoint's "
                              f"{old[name]!r}; using the checkpoint's", PretrainWarning, stacklevel=3)
    for name, value in new.items():
        if name in HEAD_FIELDS or name in FREE_FIELDS or name in ENCODER_FIELDS or name not in old \
                or old[name] == value:
            continue
        if rank == 0:
            warnings.warn(f"resume: {name} changed from {old[name]!r} to {value!r}", PretrainWarning, stacklevel=3)
    if cfg.embeddings is None:
        changes["embeddings"] = ckpt["embeddings"]
    elif cfg.embeddings != ckpt["embeddings"] and rank == 0:
        warnings.warn(f"resume: embeddings {cfg.embeddings} differ from the checkpoint's {ckpt['embeddings']}",
                      PretrainWarning, stacklevel=3)
    return dataclasses.replace(cfg, **changes)


def _resume_path(cfg: PretrainConfig) -> Path | None:
    if cfg.resume is None:
        return None
    if str(cfg.resume) == "latest":
        path = checkpoint_dir(cfg.workdir) / "latest.pt"
        if not path.exists():
            log.info("--resume latest: no checkpoint in %s yet, starting fresh", path.parent)
            return None
        return path
    path = Path(cfg.resume)
    if not path.exists():
        raise PretrainError(f"--resume {path}: no such checkpoint")
    return path


def _init_distributed(cfg: PretrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, we_initialised_the_group) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device, owns


def _precision(cfg: PretrainConfig, device: torch.device, rank: int) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler)."""
    if cfg.precision == "fp32":
        return None, False
    if cfg.precision == "bf16":
        return torch.bfloat16, False  # CPU autocast supports bf16 too (slower than fp32 on most CPUs)
    if cfg.precision == "amp":
        if device.type == "cuda":
            return torch.float16, True
        if rank == 0:
            warnings.warn("--precision amp needs CUDA; training in fp32 on CPU", PretrainWarning, stacklevel=3)
        return None, False
    raise PretrainError(f"unknown precision {cfg.precision!r} (fp32, amp, bf16)")


def _load_split(cfg: PretrainConfig, manifest: Path, split: str, fingerprint: str | None,
                img_size: int | None) -> tuple[VolumeSliceDataset, str] | None:
    rows = captioned_rows(manifest, split)
    if rows.empty:
        return None
    try:
        image, text, fp = load_embeddings(cfg.workdir, rows, fingerprint)
    except (KeyError, FileNotFoundError) as e:
        raise PretrainError(f"{split} split: {e.args[0]}") from e
    return VolumeSliceDataset(cfg.workdir, rows, image, text, seed=cfg.seed, img_size=img_size), fp


def _nan_error(step: int, batch: dict[str, torch.Tensor], data: VolumeSliceDataset, value: float,
               last_ckpt: Path | None) -> PretrainError:
    bad = []
    for key, what in (("volume", "volume voxels"), ("image", "CLIP image embeddings"), ("text", "CLIP text embeddings")):
        finite = torch.isfinite(batch[key].flatten(1)).all(1)
        if not finite.all():
            ids = [data.rows["slice_id"].iloc[int(r)] for r in batch["row"][~finite]]
            bad.append(f"{what} of {ids}")
    cause = ("non-finite inputs: " + "; ".join(bad)) if bad else (
        "inputs are finite, so training diverged: lower --lr, raise --warmup or --grad-clip, or use --precision bf16/fp32")
    resume = f"; the last checkpoint is {last_ckpt}" if last_ckpt else ""
    return PretrainError(f"non-finite loss ({value}) at step {step}: {cause}{resume}", step=step)


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run (or resume) pretraining; under torchrun every rank calls this with the same config.

    Returns rank 0's summary; raises PretrainError on bad input, a refused resume or a
    non-finite loss (naming the step).
    """
    rank, world, device, owns_group = _init_distributed(cfg)
    try:
        return _Trainer(cfg, rank, world, device).run()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


class _Trainer:
    def __init__(self, cfg: PretrainConfig, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.main = rank == 0
        self.dir = checkpoint_dir(cfg.workdir)
        resume_path = _resume_path(cfg)
        self.ckpt = load_checkpoint(resume_path) if resume_path else None
        self.last_ckpt = resume_path
        if resume_path is None and self.main and (self.dir / "latest.pt").exists():
            warnings.warn(f"{self.dir} already holds checkpoints; this run starts from scratch and "
                          "overwrites them (pass --resume latest to continue)", PretrainWarning, stacklevel=3)
        if self.ckpt is not None:
            cfg = reconcile_config(cfg, self.ckpt, rank)
        self.cfg = cfg
        if cfg.batch_size < 1 or cfg.accum_freq < 1:
            raise PretrainError("--batch-size and --accum-freq must be >= 1")
        self.amp_dtype, use_scaler = _precision(cfg, device, rank)

        try:
            manifest = resolve_manifest(cfg.workdir, cfg.manifest)
            train = _load_split(cfg, manifest, "train", cfg.embeddings, cfg.img_size)
            if train is None:
                raise PretrainError(f"{manifest}: no captioned, unrefused train rows")
            self.data, self.fingerprint = train
            self.grid = grid_of(self.data.rows)
        except (FileNotFoundError, ValueError) as e:
            raise PretrainError(str(e)) from e
        self.val = self._val_split(manifest)
        clip_dim = self.data.image_emb.shape[1]

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        self.model = build_model(cfg, self.grid, clip_dim).to(device)
        self.loss_fn = AlignmentLoss(cfg.image_weight, cfg.text_weight, cfg.init_temperature).to(device)
        self.opt = torch.optim.AdamW(param_groups({"model": self.model, "loss": self.loss_fn}, cfg.wd),
                                     lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

        self.sampler = ResumableSampler(self.data, world, rank, seed=cfg.seed)
        per_epoch = len(self.sampler) // cfg.batch_size // cfg.accum_freq
        if per_epoch == 0:
            raise PretrainError(
                f"{len(self.data)} train volumes over {world} rank(s) cannot fill one step of "
                f"--batch-size {cfg.batch_size} x --accum-freq {cfg.accum_freq}")
        self.per_epoch = per_epoch
        self.total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(cfg.warmup, self.total))
        self.step = 0
        if self.ckpt is not None:
            self._restore(self.ckpt)
        else:
            torch.manual_seed(cfg.seed + rank)  # per-rank streams (dropout) from here on
        self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None) \
            if world > 1 else None
        self.loader = DataLoader(self.data, batch_size=cfg.batch_size, sampler=self.sampler,
                                 num_workers=cfg.workers, drop_last=True, pin_memory=device.type == "cuda")

    def _val_split(self, manifest: Path) -> VolumeSliceDataset | None:
        for split in dict.fromkeys([self.cfg.val_split, "test"] if self.cfg.val_split == "val" else [self.cfg.val_split]):
            try:
                loaded = _load_split(self.cfg, manifest, split, self.fingerprint, self.cfg.img_size)
            except PretrainError as e:
                log.warning("no retrieval on %s: %s", split, e)
                return None
            if loaded is not None:
                return loaded[0]
        return None

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.loss_fn.load_state_dict(ckpt["loss"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        # The optimizer state carries the old run's lr / wd; this run's config wins.
        lam = warmup_cosine(self.cfg.warmup, self.total)
        for group, wd in zip(self.opt.param_groups, (self.cfg.wd, 0.0)):
            group["initial_lr"], group["weight_decay"] = self.cfg.lr, wd
            group["lr"] = self.cfg.lr * lam(self.step)
        self.sched.base_lrs = [self.cfg.lr] * len(self.opt.param_groups)
        states = ckpt["rng"]
        if len(states) == self.world:
            _set_rng_state(states[self.rank])
        else:
            if self.main:
                warnings.warn(f"resume: checkpoint from {len(states)} rank(s), now {self.world}; "
                              "batches and RNG streams differ from an uninterrupted run", PretrainWarning)
            torch.manual_seed(self.cfg.seed + self.rank + self.step)

    def _save(self, metrics: dict[str, Any]) -> Path | None:
        states = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(states, _rng_state())
        else:
            states = [_rng_state()]
        if not self.main:
            return None
        enc = self.model.encoder
        head = self.model.head
        ckpt = {
            "format": CKPT_FORMAT,
            "step": self.step,
            "total_steps": self.total,
            "epoch": self.step // self.per_epoch,
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": states,
            "world_size": self.world,
            "config": _config_dict(self.cfg),
            "encoder": self.cfg.encoder,
            "encoder_config": dataclasses.asdict(enc.config),
            "head": "psat" if isinstance(head, PSAT) else "linear",
            "psat_config": dataclasses.asdict(head.config) if isinstance(head, PSAT) else None,
            "grid": self.grid,
            "clip_dim": self.data.image_emb.shape[1],
            "embeddings": self.fingerprint,
            "metrics": metrics,
            "torch_version": str(torch.__version__),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{self.step}.pt"
        _atomic_save(ckpt, path)
        _point_latest(path, self.dir / "latest.pt")
        return path

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _train_step(self, it) -> dict[str, float]:
        cfg = self.cfg
        net = self.ddp or self.model
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(cfg.accum_freq):
            batch = next(it)
            vol = batch["volume"].to(self.device, non_blocking=True)
            plane, index = batch["plane"].to(self.device), batch["index"].to(self.device)
            image = batch["image"].to(self.device) if cfg.image_weight else None
            text = batch["text"].to(self.device) if cfg.text_weight else None
            # Only the last micro-batch all-reduces gradients.
            sync = self.ddp.no_sync() if self.ddp is not None and micro < cfg.accum_freq - 1 else nullcontext()
            with sync:
                with self._autocast():
                    proj = net(vol, plane, index)
                out = self.loss_fn(proj, image=image, text=text)
                loss = out["loss"]
                # Every rank holds the same (gathered) loss, so every rank raises together.
                if not torch.isfinite(loss):
                    raise _nan_error(self.step + 1, batch, self.data, loss.item(), self.last_ckpt)
                self.scaler.scale(loss / cfg.accum_freq).backward()
            for k in ("loss", "image_loss", "text_loss"):
                if k in out:
                    sums[k] = sums.get(k, 0.0) + out[k].item() / cfg.accum_freq
            sums["logit_scale"] = out["logit_scale"].item()
        self.scaler.unscale_(self.opt)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not torch.isfinite(norm) and not self.scaler.is_enabled():
            raise PretrainError(f"non-finite gradient norm at step {self.step + 1}; lower --lr or use "
                                "--precision fp32", step=self.step + 1)
        self.scaler.step(self.opt)  # skipped by the scaler on inf/nan gradients under fp16
        self.scaler.update()
        self.sched.step()
        sums["grad_norm"] = norm.item()
        return sums

    def _open_metrics(self, start: int) -> Path:
        path = self.dir / "metrics.jsonl"
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if path.exists():  # drop rows a killed run wrote past the checkpoint we resume from
                keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text("".join(ln + "\n" for ln in keep))
                os.replace(tmp, path)
        return path

    def _evaluate(self) -> dict[str, float] | None:
        result = None
        if self.main and self.val is not None:
            result = retrieval_metrics(self.model, self.val, self.device, autocast=self._autocast)
        if self.world > 1:
            dist.barrier()
        return result

    def run(self) -> PretrainResult:
        cfg = self.cfg
        start = self.step
        end = min(self.total, cfg.stop_after) if cfg.stop_after is not None else self.total
        metrics_path = self._open_metrics(start)
        writer = None
        if self.main and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=start + 1)
            except ImportError:
                pass
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                            disable=not (self.main and cfg.progress))
        losses: list[float] = []
        retrieval = None
        row: dict[str, Any] = {}
        it = None
        with progress, open(metrics_path, "a") if self.main else nullcontext() as fh:
            task = progress.add_task("pretrain", total=self.total, completed=start, loss="-")
            while self.step < end:
                epoch, within = divmod(self.step, self.per_epoch)
                if it is None or within == 0:
                    self.sampler.set_epoch(epoch)
                    self.sampler.skip = within * cfg.accum_freq * cfg.batch_size
                    it = iter(self.loader)
                t0 = time.perf_counter()
                vals = self._train_step(it)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.step += 1
                losses.append(vals["loss"])
                row = {"step": self.step, "epoch": epoch, **vals, "lr": self.opt.param_groups[0]["lr"],
                       "step_time": dt, "samples_per_s": cfg.batch_size * cfg.accum_freq * self.world / dt}
                progress.update(task, completed=self.step, loss=f"{vals['loss']:.4f}")
                if self.main and (self.step % cfg.log_every == 0 or self.step == end):
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    if writer is not None:
                        for k, v in row.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, self.step)
                if self.step % cfg.ckpt_every == 0 or self.step == end:
                    self.last_ckpt = self._save(row) or self.last_ckpt
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total:
                    retrieval = self._evaluate()
                    if retrieval is not None and self.main:
                        fh.write(json.dumps({"step": self.step, **{f"val/{k}": v for k, v in retrieval.items()}}) + "\n")
                        fh.flush()
                        if writer is not None:
                            for k, v in retrieval.items():
                                writer.add_scalar(f"val/{k}", v, self.step)
        if writer is not None:
            writer.close()
        return PretrainResult(start_step=start, step=self.step, total_steps=self.total,
                              checkpoint=self.last_ckpt, losses=losses, retrieval=retrieval,
                              metrics_path=metrics_path, world_size=self.world)


def export_latest(workdir: str | Path, checkpoint: Path | None = None,
                  out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Export the encoder of ``checkpoint`` (default: the latest pretraining checkpoint) as a
    MONAI state dict + JSON (see ``training.export``) under ``out_dir`` (default ``<workdir>/exports``)."""
    path = Path(checkpoint) if checkpoint else checkpoint_dir(workdir) / "latest.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no pretraining checkpoint (run `train pretrain` first)")
    ckpt = load_checkpoint(path)
    cfg = encoder_config(ckpt["encoder"], **ckpt["encoder_config"])
    encoder = build_encoder_from_config(cfg)
    state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    encoder.load_state_dict(state, strict=True)
    return export_encoder(encoder, ckpt["encoder"], cfg, out_dir or Path(workdir) / "exports")
