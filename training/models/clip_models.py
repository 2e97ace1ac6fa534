"""open_clip model names, config files, self-describing checkpoints and their fingerprint.

A CLIP checkpoint written here is a dict that ``open_clip.create_model_and_transforms(name,
pretrained=path)`` loads as is (it reads ``state_dict``) and that is safe under
``torch.load(weights_only=True)``: only tensors and plain values. Besides the weights it names
the model and carries its architecture (``model_cfg``), so a fresh process can rebuild a model
whose config file it never saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

from curation.store.fsutil import atomic_write_text
from training.loop.distributed import unwrap

HF_HUB_PREFIX = "hf-hub:"
TINY_CONFIG = Path(__file__).parent / "configs" / "tiny-clip.json"
CHECKPOINT_FORMAT = "med3dinsight-clip/1"


def register_config_file(path: str | os.PathLike) -> str:
    """Register an open_clip model config JSON under its file stem; returns that name."""
    path = Path(path)
    cfg = json.loads(path.read_text())
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"{path}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    if open_clip.get_model_config(path.stem) != cfg:
        open_clip.add_model_config(path)
    return path.stem


def register_tiny() -> str:
    """Register the tiny test/demo config (32 px ViT, 2+2 layers, 32-d embedding)."""
    return register_config_file(TINY_CONFIG)


def register_model_cfg(name: str, model_cfg: dict[str, Any]) -> None:
    """Make ``name`` resolve to ``model_cfg`` (used when a checkpoint names an unknown model)."""
    if open_clip.get_model_config(name) == model_cfg:
        return
    # open_clip registers configs only from files; the registry keeps the entry once read.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)


def resolve_model(model: str) -> str:
    """Turn ``--model`` into an open_clip model name.

    Args:
        model: an open_clip name (``ViT-B-16``), an ``hf-hub:org/repo`` id, or a path to a JSON
            model config (registered under the file's stem).

    Returns:
        The name to pass to open_clip.
    """
    if model.startswith(HF_HUB_PREFIX):
        return model
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise FileNotFoundError(f"--model {model}: config file not found")
        return register_config_file(model)
    name = model.replace("/", "-")  # open_clip accepts ViT-B/32 for ViT-B-32
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"--model {model}: unknown open_clip model (see open_clip.list_models(), or pass a config JSON)")
    return name


def local_name(model_name: str) -> str:
    """The plain (schema-free) name a checkpoint records: ``hf-hub:org/repo`` -> ``repo``."""
    return model_name[len(HF_HUB_PREFIX):].rsplit("/", 1)[-1] if model_name.startswith(HF_HUB_PREFIX) else model_name


def fingerprint(model_name: str, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the model name and every tensor (name, dtype, shape, bytes); first 16 hex.

    Equal weights give equal fingerprints whatever file they were saved in; one changed weight
    gives a new one, which is what invalidates the embedding cache.
    """
    h = hashlib.sha256(local_name(model_name).encode())
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so the value is JSON- and weights_only-friendly."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def checkpoint_dict(model: nn.Module, name: str, model_cfg: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The portable checkpoint: ``state_dict`` (CPU tensors) plus plain metadata."""
    model = unwrap(model)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    preprocess = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    return {
        "format": CHECKPOINT_FORMAT,
        "state_dict": state,
        "model": local_name(name),
        "model_cfg": _plain(model_cfg),
        "preprocess_cfg": _plain(preprocess),
        "fingerprint": fingerprint(name, state),
        **extra,
    }


def write_config_sidecar(model_name: str, model_cfg: dict[str, Any], out_dir: str | os.PathLike) -> Path | None:
    """Write ``<name>.json`` next to the checkpoints when open_clip would not know the name.

    Users elsewhere then run ``open_clip.add_model_config(that_file)`` before loading final.pt.
    """
    name = local_name(model_name)
    builtin = Path(open_clip.__file__).parent / "model_configs" / f"{name}.json"
    if builtin.is_file():
        return None
    path = Path(out_dir) / f"{name}.json"
    atomic_write_text(path, json.dumps(_plain(model_cfg), indent=2) + "\n")
    return path


@dataclass
class LoadedClip:
    """A CLIP model ready to embed, with what is needed to feed it and to name its outputs."""

    model: nn.Module
    name: str
    model_cfg: dict[str, Any]
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    fingerprint: str
    checkpoint: dict[str, Any]  # metadata of a med3dinsight checkpoint (no state_dict); {} otherwise


def create_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> LoadedClip:
    """Build an open_clip model from ``--model`` / ``--pretrained`` (as `train clip` takes them).

    Args:
        model: open_clip name, config JSON path, or ``hf-hub:`` id.
        pretrained: open_clip tag (``openai``), ``hf-hub:`` id (then it is the model source), a
            local checkpoint path (ours or any open_clip-loadable file), or None (random init).
        device: where to put the model.
    """
    meta: dict[str, Any] = {}
    if pretrained and pretrained.startswith(HF_HUB_PREFIX):
        model, pretrained = pretrained, None
    if pretrained and Path(pretrained).is_file():
        meta = read_checkpoint_meta(pretrained)
        if meta.get("model_cfg") and meta.get("model"):
            register_model_cfg(meta["model"], meta["model_cfg"])
    name = resolve_model(model)
    model_cfg = open_clip.get_model_config(name)
    # A checkpoint fine-tuned from e.g. a hub model keeps that model's normalisation.
    net, pp_train, pp_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, **_pp_kwargs(meta.get("preprocess_cfg", {}))
    )
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedClip(
        model=net,
        name=local_name(name),
        model_cfg=model_cfg,
        preprocess_train=pp_train,
        preprocess_val=pp_val,
        tokenizer=tokenizer,
        fingerprint=fingerprint(name, net.state_dict()),
        checkpoint=meta,
    )


def _pp_kwargs(pp: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "mean" in pp:
        out["image_mean"] = tuple(pp["mean"])
    if "std" in pp:
        out["image_std"] = tuple(pp["std"])
    if "interpolation" in pp:
        out["image_interpolation"] = pp["interpolation"]
    if "resize_mode" in pp:
        out["image_resize_mode"] = pp["resize_mode"]
    return out


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The plain values of a checkpoint dict (everything but tensors-heavy entries)."""
    try:  # mmap: only the plain values are wanted, do not read every tensor
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be mmapped
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return {}
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scaler", "rng")}


def load_clip(checkpoint: str | os.PathLike, model: str | None = None, device: str | torch.device = "cpu") -> LoadedClip:
    """Load a CLIP for embedding: one of our checkpoints, or ``model`` + an open_clip tag / file.

    Args:
        checkpoint: path to a checkpoint from `train clip` (names its own model), any open_clip-
            loadable weights file (then ``model`` is required), an open_clip tag such as
            ``openai`` (with ``model``), or an ``hf-hub:`` id.
        model: model name / config JSON; overrides the name stored in the checkpoint.
        device: where to put the model.
    """
    checkpoint = str(checkpoint)
    if checkpoint.startswith(HF_HUB_PREFIX):
        return create_clip(checkpoint, None, device)
    if Path(checkpoint).is_file():
        meta = read_checkpoint_meta(checkpoint)
        if model is None:
            if not meta.get("model"):
                raise ValueError(f"{checkpoint}: checkpoint does not name its model; pass --model")
            if meta.get("model_cfg"):
                register_model_cfg(meta["model"], meta["model_cfg"])
            model = meta["model"]
        return create_clip(model, checkpoint, device)
    if model is None:
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint (an open_clip tag needs --model)")
    return create_clip(model, checkpoint, device)
