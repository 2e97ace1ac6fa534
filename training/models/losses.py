"""Contrastive alignment of 3D projections with frozen CLIP slice-image and text embeddings."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.loop.distributed import rank_and_world

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


def same_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: row i of ``x`` equals row j exactly (``x`` is (B,) or (B, ...))."""
    _, inverse = torch.unique(x.reshape(len(x), -1), dim=0, return_inverse=True)
    return inverse[:, None] == inverse[None, :]


def duplicate_positives(*keys: torch.Tensor | None) -> torch.Tensor | None:
    """Pairs that are the same sample for contrastive purposes: equal in any of ``keys`` (e.g.
    the same caption tokens, the same image id, the same frozen embedding). None if no keys."""
    pos = None
    for k in keys:
        if k is not None:
            same = same_rows(k)
            pos = same if pos is None else pos | same
    return pos


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                      positives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP loss: mean of cross-entropy over rows and over columns of ``scale * a @ b.T``.

    ``a`` and ``b`` are (B, D), L2-normalised; row i of ``a`` matches row i of ``b``. With
    ``positives`` (B, B) bool (diagonal true), every marked pair counts as a match: the loss of
    row i is -log of the softmax mass on its positives, so duplicates (the same caption or image
    twice in the batch) are not pushed apart as negatives. Without duplicates this is the usual loss.
    """
    logits = logit_scale * a @ b.t()
    if positives is None:
        labels = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    pos = positives.to(logits.device) | torch.eye(len(a), dtype=torch.bool, device=logits.device)
    neg_inf = torch.finfo(logits.dtype).min

    def side(lg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return (lg.logsumexp(1) - lg.masked_fill(~p, neg_inf).logsumexp(1)).mean()

    return (side(logits, pos) + side(logits.t(), pos.t())) / 2


class ContrastiveLoss(nn.Module):
    """`train clip`'s loss: ``symmetric_infonce`` of image and text features with duplicates as
    positives. Called like open_clip's ClipLoss, plus the optional ``positives`` matrix."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                positives: torch.Tensor | None = None) -> torch.Tensor:
        return symmetric_infonce(image.float(), text.float(), logit_scale.float(), positives)


class AlignmentLoss(nn.Module):
    """Symmetric InfoNCE of 3D projections vs CLIP slice-image and caption embeddings.

    loss = image_weight * InfoNCE(volume, image) + text_weight * InfoNCE(volume, text), with one
    shared temperature. The logit scale is stored as log(1 / init_temperature) like CLIP and used
    unclamped; the trainer clamps the parameter to [0, log 100] after each optimizer step
    (``clamp_``), as open_clip does: a clamp inside forward would zero its gradient for good once
    it left the range. Keep it out of weight decay. Positives are per modality: in the image loss,
    slices with the same image (equal frozen image embeddings) across the gathered batch; in the
    text loss, slices with the same caption (equal frozen text embeddings); nothing else. Two
    different images that share a caption are negatives of each other in the image loss. Under torch.distributed the embeddings are gathered across ranks (see
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
        """The multiplicative logit scale (1 / temperature)."""
        return self.logit_scale.float().exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the scale in [1, 100]; call after every optimizer step."""
        self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def forward(
        self,
        volume: torch.Tensor,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        scale_grad: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Compute the alignment loss on this rank's batch (gathered across ranks if distributed).

        Args:
            volume: (B, D) PSAT projections (any dtype; computed in float32).
            image: (B, D) frozen CLIP image embeddings of the sampled slices, or None.
            text: (B, D) frozen CLIP text embeddings of their captions, or None.
            scale_grad: False detaches the logit scale (gradient accumulation counts it once).

        Returns:
            dict with ``loss`` (weighted sum), ``image_loss`` / ``text_loss`` (when given) and
            ``logit_scale`` (detached).
        """
        if image is None and text is None:
            raise ValueError("AlignmentLoss needs image or text embeddings")
        v = gather_batch(F.normalize(volume.float(), dim=-1))
        if len(v) < 2:
            # InfoNCE of one sample is 0 with a zero gradient: a silent no-op step.
            raise ValueError("contrastive batch of one sample: InfoNCE needs at least 2 (the sampler must not "
                             "produce one)")
        scale = self.scale() if scale_grad else self.scale().detach()
        out: dict[str, torch.Tensor] = {}
        total = v.new_zeros(())
        targets = {k: None if t is None else gather_batch(F.normalize(t.detach().float(), dim=-1))
                   for k, t in (("image_loss", image), ("text_loss", text))}
        for key, weight in (("image_loss", self.image_weight), ("text_loss", self.text_weight)):
            t = targets[key]
            if t is None:
                continue
            # Per modality: the same image in the image loss, the same caption in the text loss.
            out[key] = symmetric_infonce(v, t, scale, same_rows(t))
            total = total + weight * out[key]
        out["loss"] = total
        out["logit_scale"] = scale.detach()
        return out
