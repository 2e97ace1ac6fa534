"""The networks `train finetune` trains: which one per task and encoder, how a pretrained encoder
goes into it (strictly), and how a fine-tuned network is described (``final.json``) and rebuilt.

- seg: MONAI ``UNETR`` (vit; the encoder is ``UNETR.vit``) or ``SwinUNETR`` (swin; ``.swinViT``).
- cls: ``EncoderClassifier``: the registry encoder (``training.models.encoders``) + mean-pooled tokens
  + LayerNorm + Linear, for every encoder (the MONAI sub-module sits at ``.encoder.monai_module``).

An initialisation is an export of `train export` (``<name>_encoder.json`` or its ``.pt``) or a
`train pretrain` checkpoint; either gives the encoder's config and the MONAI sub-module's weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.loop.checkpoint import load
from training.loop.errors import TrainingError
from training.models.align_model import CKPT_FORMAT, encoder_from_checkpoint
from training.models.encoders import EncoderConfig, build_encoder_from_config, encoder_config
from training.pretrain.export import FORMAT as EXPORT_FORMAT

FINAL_FORMAT = "med3dinsight-finetune/1"
_ALLOWED_PREFIXES = ("monai.", "training.")
# Module paths that `final.json` files written before the package became rooms still name.
_MOVED_MODULES = {"training.finetune_nets": "training.finetune.nets"}


class EncoderClassifier(nn.Module):
    """Registry encoder -> tokens (B, N, C) -> mean over tokens -> LayerNorm -> Linear(C, K)."""

    def __init__(self, encoder: str, encoder_config: dict[str, Any], num_classes: int):
        super().__init__()
        self.encoder = build_encoder_from_config(_config(encoder, encoder_config))
        self.norm = nn.LayerNorm(self.encoder.out_dim)
        self.fc = nn.Linear(self.encoder.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.encoder(x).mean(dim=1)))


def _config(name: str, fields: dict[str, Any]) -> EncoderConfig:
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return encoder_config(name, **fields)


@dataclasses.dataclass
class Init:
    """A pretrained encoder to start from: its registry name, config and MONAI sub-module weights."""

    path: Path
    encoder: str
    config: EncoderConfig
    state: dict[str, torch.Tensor]


def read_init(path: str | os.PathLike) -> Init:
    """Read an export (``.json`` or its weights ``.pt``) or a pretraining checkpoint.

    TrainingError naming the file when it is none of these.
    """
    path = Path(path)
    meta_path = path if path.suffix == ".json" else path.with_suffix(".json")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainingError(f"{meta_path}: unreadable export description ({e})") from e
        if meta.get("format") == EXPORT_FORMAT:
            weights = meta_path.parent / meta["weights"]
            state = load(weights)
            try:
                cfg = _config(meta["encoder"], meta["encoder_config"])
            except (TypeError, ValueError) as e:
                raise TrainingError(f"{meta_path}: encoder config does not fit this version ({e})") from e
            return Init(weights, meta["encoder"], cfg, state)
        if path.suffix == ".json":
            raise TrainingError(f"{path}: not a `train export` description ({EXPORT_FORMAT})")
    if not path.is_file():
        raise TrainingError(f"--init {path}: no such file (an export from `train export` or a pretrain checkpoint)")
    ckpt = load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TrainingError(f"{path}: neither an export (no {meta_path.name} beside it) nor a `train pretrain` checkpoint")
    encoder, cfg = encoder_from_checkpoint(ckpt)
    state = {k: v.detach().clone() for k, v in encoder.monai_module.state_dict().items()}
    return Init(path, ckpt["encoder"], cfg, state)


def net_spec(task: str, encoder: str, cfg: EncoderConfig, num_classes: int, feature_size: int = 16) -> dict[str, Any]:
    """``{"class", "args", "encoder_attribute"}`` of the network for ``task`` around encoder ``cfg``.

    TrainingError when the combination has no network (cnn for seg; a ViT UNETR cannot host).
    """
    c = dataclasses.asdict(cfg)
    if task == "cls":
        return {"class": "training.finetune.nets.EncoderClassifier",
                "args": {"encoder": encoder, "encoder_config": c, "num_classes": num_classes},
                "encoder_attribute": "encoder.monai_module"}
    if task != "seg":
        raise TrainingError(f"--task {task}: choose seg or cls")
    if encoder == "vit":
        if c["patch_size"] != 16 or c["num_layers"] != 12:
            raise TrainingError(f"--task seg --encoder vit needs UNETR's ViT (patch 16, 12 layers), got patch "
                                f"{c['patch_size']}, {c['num_layers']} layers")
        args = dict(in_channels=c["in_channels"], out_channels=num_classes, img_size=[c["img_size"]] * 3,
                    feature_size=feature_size, hidden_size=c["hidden_size"], mlp_dim=c["mlp_dim"],
                    num_heads=c["num_heads"], proj_type=c["proj_type"], dropout_rate=c["dropout_rate"],
                    spatial_dims=3, qkv_bias=c["qkv_bias"])
        return {"class": "monai.networks.nets.UNETR", "args": args, "encoder_attribute": "vit"}
    if encoder == "swin":
        # The bottleneck is img / 32 per side; instance norm needs more than one voxel there.
        if c["img_size"] < 64 or c["img_size"] % 32:
            raise TrainingError(f"--task seg --encoder swin needs an input side that is a multiple of 32 and "
                                f">= 64 (SwinUNETR), got {c['img_size']}")
        args = dict(in_channels=c["in_channels"], out_channels=num_classes, patch_size=c["patch_size"],
                    depths=list(c["depths"]), num_heads=list(c["num_heads"]), window_size=c["window_size"],
                    qkv_bias=c["qkv_bias"], mlp_ratio=c["mlp_ratio"], feature_size=c["feature_size"],
                    drop_rate=c["drop_rate"], attn_drop_rate=c["attn_drop_rate"],
                    dropout_path_rate=c["dropout_path_rate"], use_checkpoint=c["use_checkpoint"],
                    spatial_dims=3, use_v2=c["use_v2"])
        return {"class": "monai.networks.nets.SwinUNETR", "args": args, "encoder_attribute": "swinViT"}
    raise TrainingError(f"--task seg --encoder {encoder}: no MONAI segmentation network hosts this encoder; "
                        "use vit (UNETR) or swin (SwinUNETR), or --task cls")


def build_net(spec: dict[str, Any]) -> nn.Module:
    """Instantiate ``spec["class"](**spec["args"])`` (MONAI or this package's classes only)."""
    module_name, cls_name = spec["class"].rsplit(".", 1)
    module_name = _MOVED_MODULES.get(module_name, module_name)
    if not module_name.startswith(_ALLOWED_PREFIXES):
        raise TrainingError(f"refusing to build {spec['class']!r}: not a MONAI or med3dinsight class")
    return getattr(importlib.import_module(module_name), cls_name)(**spec["args"])


def encoder_part(net: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The sub-module of ``net`` that holds the (exported) encoder weights."""
    part = net
    for attr in spec["encoder_attribute"].split("."):
        part = getattr(part, attr)
    return part


def load_encoder(net: nn.Module, spec: dict[str, Any], init: Init) -> None:
    """Load ``init``'s weights into ``net``'s encoder, strictly; TrainingError on any mismatch."""
    try:
        encoder_part(net, spec).load_state_dict(init.state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise TrainingError(f"{init.path}: weights do not fit the {spec['class']} encoder ({first})") from e


def encoder_config_for(name: str, init: Init | None, img_size: int, kwargs: dict[str, Any]) -> EncoderConfig:
    """The encoder config of a run: the init's (which must be ``name``), or a fresh one."""
    if init is not None:
        if init.encoder != name:
            raise TrainingError(f"--encoder {name}, but {init.path} holds a {init.encoder} encoder")
        if kwargs:
            raise TrainingError("--encoder-arg cannot change a pretrained encoder; drop it or use --init scratch")
        return init.config
    try:
        return encoder_config(name, img_size=img_size, **kwargs)
    except (TypeError, ValueError) as e:
        raise TrainingError(f"--encoder {name}: {e}") from e


def final_description(spec: dict[str, Any], task: str, classes: list[str], img_size: int,
                      init: str, weights: str = "final.pt") -> dict[str, Any]:
    """What ``final.json`` holds: enough to rebuild the network and load ``final.pt`` strictly."""
    return {"format": FINAL_FORMAT, "class": spec["class"], "args": spec["args"],
            "encoder_attribute": spec["encoder_attribute"], "task": task, "classes": classes,
            "img_size": img_size, "init": init, "weights": weights,
            "torch_version": str(torch.__version__)}


def load_final(json_path: str | os.PathLike) -> nn.Module:
    """Rebuild the network ``final.json`` describes and load its ``final.pt`` strictly."""
    json_path = Path(json_path)
    meta = json.loads(json_path.read_text())
    if meta.get("format") != FINAL_FORMAT:
        raise ValueError(f"{json_path}: not a {FINAL_FORMAT} file")
    net = build_net(meta)
    net.load_state_dict(torch.load(json_path.parent / meta["weights"], map_location="cpu", weights_only=True),
                        strict=True)
    return net

