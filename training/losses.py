"""Contrastive alignment of 3D projections with frozen CLIP slice-image and text embeddings."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.distributed import rank_and_world

MAX_LOGIT_SCALE = 100.0


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, D) from all ranks along dim 0, gradient only to the local chunk.

    Every rank then computes the same global-batch loss L, but backpropagates only through its
    own rows, so rank r's parameter gradient is the part of dL/dtheta that flows through rank r's
    samples. DDP *averages* gradients over the N ranks, which would give dL/dtheta / N (what
    open_clip's gather_features(local_loss=False, gather_with_grad=False) ends up with); we
    multiply the local chunk's gradient by N so the average is exactly dL/dtheta, i.e. N
    processes reproduce one process on the global batch. Needs equal per-rank batch sizes
    (use drop_last with the DistributedSampler). No-op outside torch.distributed.
    """
    rank, world = rank_and_world()
    if world == 1:
        return x
    chunks = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(chunks, x.detach().contiguous())
    if x.requires_grad:
        chunks[rank] = _ScaleGrad.apply(x, float(world))
    return torch.cat(chunks, dim=0)


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP loss: mean of cross-entropy over rows and over columns of ``scale * a @ b.T``.

    ``a`` and ``b`` are (B, D), L2-normalised; row i of ``a`` matches row i of ``b``.
    """
    logits = logit_scale * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class AlignmentLoss(nn.Module):
    """Symmetric InfoNCE of 3D projections vs CLIP slice-image and caption embeddings.

    loss = image_weight * InfoNCE(volume, image) + text_weight * InfoNCE(volume, text), with one
    shared temperature. The logit scale is stored as log(1 / init_temperature) like CLIP and
    clamped to [1, 100] where it is used, so no optimizer-side clamping is needed (leave it out
    of weight decay). Under torch.distributed the embeddings are gathered across ranks (see
    ``gather_batch``); the CLIP embeddings are frozen and gathered without gradient. The loss
    module need not be wrapped in DDP: every rank computes the same logit-scale gradient.
    """

    def __init__(
        self,
        image_weight: float = 1.0,
        text_weight: float = 1.0,
        init_temperature: float = 0.07,
        learnable: bool = True,
    ):
        super().__init__()
        self.image_weight = image_weight
        self.text_weight = text_weight
        init = torch.tensor(math.log(1.0 / init_temperature))
        if learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    def scale(self) -> torch.Tensor:
        """The clamped multiplicative logit scale (1 / temperature)."""
        return self.logit_scale.float().exp().clamp(1.0, MAX_LOGIT_SCALE)

    def forward(
        self,
        volume: torch.Tensor,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the alignment loss on this rank's batch (gathered across ranks if distributed).

        Args:
            volume: (B, D) PSAT projections (any dtype; computed in float32).
            image: (B, D) frozen CLIP image embeddings of the sampled slices, or None.
            text: (B, D) frozen CLIP text embeddings of their captions, or None.

        Returns:
            dict with ``loss`` (weighted sum), ``image_loss`` / ``text_loss`` (when given) and
            ``logit_scale`` (detached).
        """
        if image is None and text is None:
            raise ValueError("AlignmentLoss needs image or text embeddings")
        v = gather_batch(F.normalize(volume.float(), dim=-1))
        scale = self.scale()
        out: dict[str, torch.Tensor] = {}
        total = v.new_zeros(())
        for key, target, weight in (("image_loss", image, self.image_weight), ("text_loss", text, self.text_weight)):
            if target is None:
                continue
            t = gather_batch(F.normalize(target.detach().float(), dim=-1))
            out[key] = symmetric_infonce(v, t, scale)
            total = total + weight * out[key]
        out["loss"] = total
        out["logit_scale"] = scale.detach()
        return out
