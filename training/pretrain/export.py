"""`train export`: the pretrained 3D encoder as a plain MONAI state dict plus a JSON that says how to load it."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

import monai
import torch
from torch import nn

from curation.store.fsutil import atomic_write_text
from curation.store.layout import Workdir
from curation.store.manifest import resolve_manifest
from training.loop.checkpoint import LATEST, load, save
from training.loop.distributed import unwrap
from training.loop.errors import TrainingError
from training.models.align_model import CKPT_FORMAT, encoder_from_checkpoint
from training.models.encoders import Encoder3D

FORMAT = "med3dinsight-encoder/1"


def _snippet(target: dict[str, Any], weights_name: str) -> str:
    module, cls = target["class"].rsplit(".", 1)
    attr = f".{target['attribute']}" if target["attribute"] else ""
    lines = [
        "import torch",
        f"from {module} import {cls}",
        "",
        f"net = {cls}(**{target['kwargs']!r})",
        f'state = torch.load("{weights_name}", map_location="cpu", weights_only=True)',
        f"net{attr}.load_state_dict(state, strict=True)",
    ]
    if target["attribute"]:
        lines.insert(3, "# out_channels (and decoder sizes) do not touch the encoder: set them for your task.")
    if cls == "ResNet":
        lines.insert(3, "# For a classifier build with feed_forward=True, num_classes=K and load strict=False (fc is new).")
    return "\n".join(lines) + "\n"


def export_encoder(
    model_encoder: nn.Module,
    name: str,
    cfg: Any,
    out_dir: str | os.PathLike,
    probe: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>_encoder.pt`` (state dict of the MONAI sub-module) and ``<name>_encoder.json``.

    Args:
        model_encoder: the trained ``Encoder3D`` (DDP / torch.compile wrappers are unwrapped).
        name: registry name ("vit", "swin", "cnn").
        cfg: the encoder's config dataclass (or a dict), recorded in the JSON.
        out_dir: directory, created if missing.
        probe: the collapse probe (``training.pretrain.probe.probe_encoder``), recorded as ``probe``.

    Returns:
        (weights_path, json_path). The weights load with ``torch.load(weights_only=True)``.
    """
    encoder = unwrap(model_encoder)
    if not isinstance(encoder, Encoder3D):
        raise TypeError(f"expected an Encoder3D, got {type(encoder).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights_path = out / f"{name}_encoder.pt"
    json_path = out / f"{name}_encoder.json"

    state = {k: v.detach().cpu().contiguous() for k, v in encoder.monai_module.state_dict().items()}
    save(state, weights_path)

    target = encoder.monai_target()
    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    meta = {
        "format": FORMAT,
        "encoder": name,
        "encoder_config": config,
        "weights": weights_path.name,
        "monai_class": target["class"],
        "monai_kwargs": target["kwargs"],
        "attribute": target["attribute"],
        "out_dim": encoder.out_dim,
        "num_tokens": encoder.num_tokens,
        "monai_version": monai.__version__,
        "torch_version": torch.__version__,
        "snippet": _snippet(target, weights_path.name),
        "probe": probe,
    }
    atomic_write_text(json_path, json.dumps(meta, indent=2) + "\n")
    return weights_path, json_path


def load_into_monai(json_path: str | os.PathLike) -> nn.Module:
    """Build the MONAI network named in ``json_path`` and load the encoder weights strictly.

    Returns the whole network (e.g. a UNETR whose ``vit`` holds the pretrained weights).
    """
    json_path = Path(json_path)
    meta = json.loads(json_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{json_path}: not a {FORMAT} file")
    module_name, cls_name = meta["monai_class"].rsplit(".", 1)
    if not module_name.startswith("monai."):
        raise ValueError(f"{json_path}: refusing non-MONAI class {meta['monai_class']!r}")
    net = getattr(importlib.import_module(module_name), cls_name)(**meta["monai_kwargs"])
    state = torch.load(json_path.parent / meta["weights"], map_location="cpu", weights_only=True)
    target = getattr(net, meta["attribute"]) if meta["attribute"] else net
    target.load_state_dict(state, strict=True)
    return net


def export_latest(workdir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                  out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Export the encoder of a pretraining checkpoint (see ``export_encoder``).

    Args:
        workdir: the workdir.
        checkpoint: default: the latest pretraining checkpoint of the workdir.
        out_dir: default: the workdir's exports folder.

    Returns:
        (weights_path, json_path); TrainingError when the checkpoint is missing or not one of ours.
    """
    wd = Workdir(workdir)
    path = Path(checkpoint) if checkpoint else wd.pretrain_checkpoints / LATEST
    if not path.exists():
        raise TrainingError(f"{path}: no pretraining checkpoint (run `train pretrain` first)")
    ckpt = load(path, CKPT_FORMAT)
    encoder, cfg = encoder_from_checkpoint(ckpt)
    return export_encoder(encoder, ckpt["encoder"], cfg, out_dir or wd.exports, probe=_probe(wd, ckpt, encoder, cfg))


def _probe(wd: Workdir, ckpt: dict[str, Any], encoder: Encoder3D, cfg: Any) -> dict[str, Any]:
    """The collapse probe of the checkpoint's encoder on its run's held-out volumes (train when
    none), or ``{"error": why}`` when the workdir no longer has them."""
    from training.pretrain.data import captioned_rows
    from training.pretrain.probe import probe_encoder

    run = ckpt.get("config", {})
    trained = {s.strip() for s in str(run.get("splits", "train")).split(",")}
    val = run.get("val_split", "val")
    held = [s for s in dict.fromkeys([val, "test"] if val == "val" else [val]) if s not in trained]
    try:
        manifest = resolve_manifest(wd.root, run.get("manifest", "v1"))
        for split, label in [*((s, "held-out") for s in held), (sorted(trained), "train")]:
            rows = captioned_rows(manifest, split)
            if not rows.empty:
                paths = sorted(rows["volume_path"].unique())
                return probe_encoder(encoder, cfg, int(run.get("seed", 0)), wd.root, paths, torch.device("cpu"), label)
        return {"error": "no captioned volumes in the run's manifest"}
    except (OSError, ValueError, KeyError) as e:
        return {"error": f"probe skipped: {e}"}
