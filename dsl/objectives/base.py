"""The one interface every pretraining objective offers the training loop."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Objective(nn.Module):
    """A model and its loss, run as one module by the engine.

    The loss is computed inside :meth:`forward`, so everything it reads (a learnable
    temperature included) is used inside the engine's forward, where ZeRO-3 gathers partitioned
    parameters.

    Args:
        model: The encoder(s) being pretrained; saved and registered as ``model.*``.
        loss: Takes ``(out1, out2, logit_scale)`` and returns a scalar.
    """

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def views(self, s1: Tensor, s2: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The two inputs of :meth:`forward` for a batch of pairs (default: the two sensors)."""
        return s1, s2

    def encode(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """What the loss compares: ``(out1, out2)``, matched row by row."""
        raise NotImplementedError

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, out1, out2)``; the loss in fp32 whatever the engine's precision."""
        out1, out2 = self.encode(a, b)
        return self.loss(out1.float(), out2.float(), self.logit_scale), out1, out2

    @property
    def logit_scale(self) -> nn.Parameter | None:
        """The model's learnable ``log(1 / temperature)`` ([1]), or None for a fixed one."""
        return getattr(self.model, "logit_scale", None)

    @torch.no_grad()
    def after_step(self) -> None:
        """As CLIP: the learnable temperature never falls below 1/100."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_(0, math.log(100))

    def temperature(self) -> float | None:
        """The current learnable temperature, for logging; None when fixed."""
        return None if self.logit_scale is None else math.exp(-self.logit_scale.item())
