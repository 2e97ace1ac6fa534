"""Plane-Slice-Aware Transformer (PSAT): maps 3D volume tokens to one CLIP-space vector.

Paper §2: Q learnable queries attend to each other, cross-attend to the volume tokens and pass a
feed-forward; the Q outputs go through an MLP to the CLIP dimension. A plane-slice position
embedding (3 planes x ``grid`` slices, zero-initialised) tells the module which slice the
target CLIP embedding came from; its row is added to every volume token and every query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PSATConfig:
    """PSAT sizes. ``grid`` is the number of slice positions per plane (the volume side)."""

    in_dim: int = 768
    width: int = 512
    num_queries: int = 300
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: int = 4
    out_dim: int = 512
    grid: int = 128
    num_planes: int = 3
    use_pspe: bool = True
    dropout: float = 0.0


class PSAT(nn.Module):
    """``forward(tokens (B, N, in_dim), plane (B,), index (B,)) -> (B, out_dim)``."""

    def __init__(self, config: PSATConfig):
        super().__init__()
        self.config = config
        c = config.width
        self.input_proj = nn.Linear(config.in_dim, c)
        self.queries = nn.Parameter(torch.randn(config.num_queries, c) * 0.02)
        # Zero init (paper §2): at step 0 the module is exactly the plain query transformer
        # (ablation Ex2) and the slice information is learned only as far as it helps.
        self.pspe = nn.Parameter(torch.zeros(config.num_planes, config.grid, c)) if config.use_pspe else None
        # Pre-norm (norm_first=True): this module trains from scratch next to a randomly
        # initialised encoder; pre-norm keeps an identity path through every layer and trains
        # stably without warm-up tuning, post-norm (DETR's choice) is touchier there. Pre-norm
        # leaves the residual stream unnormalised, hence the final LayerNorm.
        layer = nn.TransformerDecoderLayer(
            d_model=c,
            nhead=config.num_heads,
            dim_feedforward=config.mlp_ratio * c,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, config.num_layers, norm=nn.LayerNorm(c))
        self.head = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, config.out_dim))

    def forward(
        self,
        tokens: torch.Tensor,
        plane: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Project volume tokens to the CLIP space.

        Args:
            tokens: (B, N, in_dim) encoder output.
            plane: (B,) long in [0, num_planes); required when ``use_pspe``.
            index: (B,) long slice index in [0, grid); required when ``use_pspe``.

        Returns:
            (B, out_dim) projection (not normalised; the loss normalises).
        """
        memory = self.input_proj(tokens)
        queries = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        if self.pspe is not None:
            if plane is None or index is None:
                raise ValueError("PSAT with use_pspe needs plane and index")
            pos = self.pspe[plane, index].unsqueeze(1)  # (B, 1, C), broadcast over tokens
            memory = memory + pos
            queries = queries + pos
        out = self.decoder(queries, memory)  # (B, Q, C)
        # Mean over the Q outputs: every query contributes (the released code kept query 0 only).
        return self.head(out.mean(dim=1))


class LinearProjector(nn.Module):
    """Ablation Ex1 (``--no-psat``): mean-pool the volume tokens, one linear layer to CLIP dim."""

    def __init__(self, in_dim: int, out_dim: int = 512):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(
        self,
        tokens: torch.Tensor,
        plane: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N, in_dim) -> (B, out_dim); plane/index are accepted and ignored."""
        return self.proj(tokens.mean(dim=1))
