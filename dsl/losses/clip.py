"""CLIP loss: symmetric cross-modal InfoNCE with a (usually learnable) temperature.

Unlike the Dual NT-Xent, negatives come only from the other modality: with S = s * Z1 Z2^T over
the global batch (s = exp(logit_scale)), the loss is the mean of the row-wise cross entropy
(modality 1 -> 2) and the column-wise one (2 -> 1), the diagonal being the positives.

``logit_scale`` is a model parameter of shape [1] (DeepSpeed cannot initialise a 0-dim one);
as in CLIP the trainer should clamp it to at most log(100) after each step. Distributed modes
and why each is exact after the engine's gradient averaging: :mod:`dsl.losses.gather`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsl.losses.dual_ntxent import check_pair, check_temperature, inverse_temperature, normalize
from dsl.losses.gather import against_global_batch, check_mode


class ClipLoss(nn.Module):
    """Symmetric cross-modal InfoNCE over the global batch.

    Args:
        gather_with_grad: Gradient flows through the cross-rank gather.
        local_loss: Each rank computes only its own rows and columns ([b, B] logits twice).
        temperature: Fixed temperature used when ``forward`` gets no ``logit_scale``.

    Raises:
        ValueError: ``local_loss`` without ``gather_with_grad``, or ``temperature <= 0``.
    """

    def __init__(
        self, gather_with_grad: bool = True, local_loss: bool = True, temperature: float = 0.07
    ):
        super().__init__()
        check_temperature(temperature)
        check_mode(gather_with_grad, local_loss)
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss
        self.temperature = temperature

    def forward(self, z1: Tensor, z2: Tensor, logit_scale: Tensor | None = None) -> Tensor:
        """Loss for this rank's ``[b, d]`` pairs.

        Args:
            z1: Modality-1 embeddings (not yet normalised; computed in at least float32).
            z2: Modality-2 embeddings; row i is the partner of ``z1[i]``.
            logit_scale: log(1/t), shape [1], owned by the model; None uses ``temperature``.
        """
        check_pair(z1, z2)
        scale = inverse_temperature(logit_scale, self.temperature)
        z1, z2 = normalize(z1), normalize(z2)
        return against_global_batch(clip_loss, z1, z2, self.gather_with_grad, self.local_loss, scale)


def clip_loss(
    q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, first: int, scale: Tensor | float
) -> Tensor:
    """Mean symmetric InfoNCE of some pairs against the whole (global) batch; inputs L2-normalised.

    Args:
        q1: Modality-1 anchors ``[b, d]``: rows ``first .. first + b`` of ``k1``.
        q2: Their modality-2 partners, the same rows of ``k2``.
        k1: All modality-1 embeddings ``[n, d]``.
        k2: All modality-2 embeddings ``[n, d]``.
        first: Global index of the first anchor.
        scale: 1 / temperature.
    """
    labels = torch.arange(first, first + q1.shape[0], device=q1.device)
    # Scale the [b, d] queries, not the [b, n] logits: one pass and one copy fewer.
    loss_12 = F.cross_entropy((q1 * scale) @ k2.T, labels)  # rows of S = s * K1 K2^T
    loss_21 = F.cross_entropy((q2 * scale) @ k1.T, labels)  # columns of S
    return (loss_12 + loss_21) / 2
