"""Gather embeddings from every rank so a contrastive loss sees the global batch.

The engine (DeepSpeed/DDP) AVERAGES parameter gradients over the R ranks. Every mode a loss
offers gives, after that averaging, exactly the loss and gradient of one process computing the
loss on the concatenated global batch (R ranks x b pairs = B pairs; loss = mean over anchors):

* ``gather_with_grad=True, local_loss=True`` (default): rank r computes only its own anchor
  rows against the gathered set; its loss L_r is their mean, and the global loss
  L = mean_r L_r. ``torch.distributed.nn.functional.all_gather`` sums each slot's gradient over
  ranks in backward, so rank r's embeddings receive sum_r' dL_r'/dz_r = R dL/dz_r; averaging
  divides by R again. Exact; a replicated parameter such as ``logit_scale`` gets dL_r/ds on
  rank r, whose mean is dL/ds. Cheapest: logits are [2b, 2B] instead of [2B, 2B].
* ``gather_with_grad=True, local_loss=False``: every rank computes the full loss L. The gather
  backward sums R identical gradients (R dL/dz_r), averaging divides by R. Exact, R times the
  compute.
* ``gather_with_grad=False, local_loss=False``: every rank computes the full loss L, but only
  the local slot of the gathered tensor has a graph, so rank r would get dL/dz_r and the
  average would be dL/dtheta / R. The local embeddings are therefore passed through
  :func:`scale_grad` with factor R (identity forward, xR backward) before the gather: exact,
  and ``logit_scale`` (not gathered, not scaled) gets dL/ds. One all_gather, no gradient
  communication; R times the compute.
* ``gather_with_grad=False, local_loss=True`` is refused: rank r's embeddings also appear as
  positives and negatives in other ranks' rows, and without gradient through the gather those
  terms never reach rank r, so no rescaling can recover the global gradient.

The loss value: with ``local_loss=True`` each rank returns its L_r and the all-reduce MEAN over
ranks is L; with ``local_loss=False`` every rank returns L. BatchNorm statistics in the model are
per rank (unless SyncBatchNorm) and outside the scope of this equivalence. All ranks must pass
tensors of the same shape (the loader drops the last partial batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsl.collectives import gather_features, world


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``factor``."""
    if factor == 1:
        return x
    return _ScaleGrad.apply(x, factor)


def check_mode(gather_with_grad: bool, local_loss: bool) -> None:
    """Refuse the one combination that cannot reproduce the global-batch gradient."""
    if local_loss and not gather_with_grad:
        raise ValueError(
            "local_loss=True needs gather_with_grad=True: without gradient through the gather, "
            "the terms where this rank's embeddings are positives/negatives in other ranks' rows "
            "never reach it, so the averaged gradient is not the global-batch gradient. Use "
            "gather_with_grad=True, or local_loss=False (full matrix on every rank, exact)."
        )


def gather_for_loss(x: Tensor, gather_with_grad: bool) -> Tensor:
    """Gather ``x`` for a loss so the engine's gradient average is exact (see module docstring).

    Without gradient through the gather (full-matrix mode) the local gradient is scaled by the
    world size, which the engine's average over ranks then cancels.
    """
    if not gather_with_grad:
        x = scale_grad(x, float(world()[1]))
    return gather_features(x, gather_with_grad)


def against_global_batch(core, q1: Tensor, q2: Tensor, gather_with_grad: bool, local_loss: bool, scale):
    """Run a pair loss ``core(q1, q2, k1, k2, first, scale)`` over the global batch.

    ``q1``/``q2`` are this rank's L2-normalised embeddings; ``k1``/``k2`` are everyone's. With
    ``local_loss`` only this rank's rows are anchors (``first`` = their global index),
    otherwise every rank computes the full loss. Shared by the NT-Xent and CLIP losses.
    """
    k1 = gather_for_loss(q1, gather_with_grad)
    k2 = gather_for_loss(q2, gather_with_grad)
    if local_loss:
        return core(q1, q2, k1, k2, world()[0] * q1.shape[0], scale)
    return core(k1, k2, k1, k2, 0, scale)
