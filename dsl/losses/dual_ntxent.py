"""Dual-SimCLR NT-Xent (Scheibenreif et al. 2022): SimCLR's loss with S1/S2 as the two views.

Over a global batch of N pairs the 2N L2-normalised embeddings are pooled; each anchor's positive
is its partner from the other modality and the other 2N - 2 embeddings (both modalities, self
excluded) are its negatives:

    l_i = -log( exp(s_ip / t) / sum_{k != i} exp(s_ik / t) ),   loss = mean over the 2N anchors.

Distributed modes (``gather_with_grad``, ``local_loss``) and why each is exact after the engine's
gradient averaging are in :mod:`dsl.losses.gather`; ``gather_with_grad=False`` with
``local_loss=True`` is refused with a ValueError.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsl.losses.gather import against_global_batch, check_mode


def check_pair(z1: Tensor, z2: Tensor) -> None:
    """Both embeddings must be ``[b, d]`` with the same shape."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"expected two [b, d] tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )


def normalize(z: Tensor) -> Tensor:
    """L2-normalised rows, in at least float32: bf16/fp16 logits of 1/t ~ 14 lose the ranking."""
    return F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)


# As CLIP: a learnable temperature stays within [1/100, 1].
MAX_LOGIT_SCALE = math.log(100)


def inverse_temperature(logit_scale: Tensor | None, temperature: float) -> Tensor | float:
    """``exp(logit_scale)`` clamped to [1, 100] when the model learns it, else ``1 / temperature``.

    The clamp lives here, in the forward, rather than as an in-place edit of the parameter after
    the optimizer step: under ZeRO or bf16 the optimizer's fp32 master copy overwrites such an
    edit at the next step, so the effective temperature would escape the bound. Clamped, the
    gradient is zero beyond the bound, and weight decay is off for this parameter.
    """
    if logit_scale is None:
        return 1.0 / temperature
    if logit_scale.numel() != 1:
        raise ValueError(
            f"logit_scale must hold one value (shape [1]), got shape {tuple(logit_scale.shape)}"
        )
    return logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()


def check_temperature(temperature: float) -> None:
    """A temperature must be positive."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class DualNTXentLoss(nn.Module):
    """NT-Xent over both modalities of the global batch.

    Args:
        temperature: Softmax temperature t; ignored when ``forward`` gets a ``logit_scale``.
        gather_with_grad: Gradient flows through the cross-rank gather.
        local_loss: Each rank computes only its own anchors' rows ([2b, 2B] logits).

    Raises:
        ValueError: ``temperature <= 0``, or ``local_loss`` without ``gather_with_grad``.
    """

    def __init__(
        self, temperature: float = 0.07, gather_with_grad: bool = True, local_loss: bool = True
    ):
        super().__init__()
        check_temperature(temperature)
        check_mode(gather_with_grad, local_loss)
        self.temperature = temperature
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def forward(self, z1: Tensor, z2: Tensor, logit_scale: Tensor | None = None) -> Tensor:
        """Loss for this rank's ``[b, d]`` pairs (see :mod:`dsl.losses.gather` for its meaning).

        Args:
            z1: Modality-1 embeddings (not yet normalised; computed in at least float32).
            z2: Modality-2 embeddings; row i is the partner of ``z1[i]``.
            logit_scale: Optional learnable log(1/t), shape [1]; overrides ``temperature``.
        """
        check_pair(z1, z2)
        scale = inverse_temperature(logit_scale, self.temperature)
        z1, z2 = normalize(z1), normalize(z2)
        return against_global_batch(dual_ntxent, z1, z2, self.gather_with_grad, self.local_loss, scale)


def dual_ntxent(
    q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, first: int, scale: Tensor | float
) -> Tensor:
    """Mean NT-Xent of some anchors against the whole (global) batch; inputs L2-normalised.

    Args:
        q1: Modality-1 anchors ``[b, d]``: rows ``first .. first + b`` of ``k1``.
        q2: Their modality-2 partners, the same rows of ``k2``.
        k1: All modality-1 embeddings ``[n, d]``.
        k2: All modality-2 embeddings ``[n, d]``.
        first: Global index of the first anchor.
        scale: 1 / temperature.
    """
    n, b = k1.shape[0], q1.shape[0]
    # Scaling the [2b, d] queries rather than the [2b, 2n] logits saves a pass and a copy.
    logits = (torch.cat([q1, q2]) * scale) @ torch.cat([k1, k2]).T  # [2b, 2n]
    # An anchor is not its own negative: self-similarities lie on one diagonal per modality
    # (in place: mm does not keep its output for backward, and masks would cost [2b, 2n]).
    logits[:b].diagonal(first).fill_(float("-inf"))
    logits[b:].diagonal(n + first).fill_(float("-inf"))
    rows = torch.arange(first, first + b, device=q1.device)
    return F.cross_entropy(logits, torch.cat([rows + n, rows]))  # partner in the other modality
