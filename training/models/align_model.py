"""The Med3DInsight model: a 3D encoder whose volume tokens a head (PSAT, or a linear projection
for the ablation) maps to one CLIP-space vector per sampled slice; and what its checkpoints hold.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from training.loop.errors import TrainingError
from training.models.encoders import Encoder3D, EncoderConfig, build_encoder_from_config, encoder_config
from training.models.psat import PSAT, LinearProjector, PSATConfig

# ``format`` of a `train pretrain` checkpoint (``step_N.pt``, ``latest.pt``).
CKPT_FORMAT = "med3dinsight-pretrain/1"


class AlignModel(nn.Module):
    """3D encoder -> tokens -> projection head (PSAT or linear) -> (B, clip_dim)."""

    def __init__(self, encoder: Encoder3D, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, volume: torch.Tensor, plane: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(volume), plane, index)


@dataclass
class AlignSpec:
    """What an `AlignModel` is built from: the encoder's registry name and fields, and the head.
    The trainer's config (`training.pretrain.config.PretrainConfig.align_spec`) makes one; the
    model needs nothing else of it."""

    encoder: str = "vit"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None  # encoder input side; None = the manifest grid
    use_psat: bool = True  # False: mean-pool + linear (ablation --no-psat)
    use_pspe: bool = True
    num_queries: int = 300
    psat_width: int = 512
    psat_layers: int = 2
    psat_heads: int = 8


def model_encoder_config(cfg: AlignSpec, grid: int) -> EncoderConfig:
    """The encoder config a run asks for; the input side defaults to the manifest ``grid``.
    An unknown encoder or size field is a TrainingError (it comes from the command line)."""
    try:
        return encoder_config(cfg.encoder, img_size=cfg.img_size or grid, **cfg.encoder_kwargs)
    except (TypeError, ValueError) as e:
        raise TrainingError(f"--encoder {cfg.encoder}: {e}") from e


def build_model(cfg: AlignSpec, grid: int, clip_dim: int) -> AlignModel:
    """Encoder from the registry plus the head; the PSAT position table has ``grid`` rows."""
    encoder = build_encoder_from_config(model_encoder_config(cfg, grid))
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


def describe(model: AlignModel, encoder: str, grid: int, clip_dim: int) -> dict[str, Any]:
    """The checkpoint entries that say how to rebuild ``model`` (and export its encoder)."""
    head = model.head
    return {
        "encoder": encoder,
        "encoder_config": dataclasses.asdict(model.encoder.config),
        "head": "psat" if isinstance(head, PSAT) else "linear",
        "psat_config": dataclasses.asdict(head.config) if isinstance(head, PSAT) else None,
        "grid": grid,
        "clip_dim": clip_dim,
    }


def encoder_from_checkpoint(ckpt: dict[str, Any]) -> tuple[Encoder3D, EncoderConfig]:
    """The trained encoder of a pretraining checkpoint, weights loaded strictly, and its config."""
    cfg = encoder_config(ckpt["encoder"], **ckpt["encoder_config"])
    encoder = build_encoder_from_config(cfg)
    state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    encoder.load_state_dict(state, strict=True)
    return encoder, cfg
