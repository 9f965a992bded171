"""The one interface every pretraining objective offers the training loop."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsl.losses.dual_ntxent import inverse_temperature


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
        self._read_temperature()
        return self.loss(out1.float(), out2.float(), self.logit_scale), out1, out2

    @torch.no_grad()
    def _read_temperature(self) -> None:
        # Read inside the engine's forward, where ZeRO-3 has the parameter gathered; the value
        # the loss uses, i.e. after its clamp.
        if self.logit_scale is not None:
            self._temperature = 1.0 / inverse_temperature(self.logit_scale.float(), 1.0)

    @property
    def logit_scale(self) -> nn.Parameter | None:
        """The model's learnable ``log(1 / temperature)`` ([1]), or None for a fixed one."""
        return getattr(self.model, "logit_scale", None)

    def after_step(self) -> None:
        """Called after each optimizer step; nothing by default.

        Parameters are never edited here: under ZeRO or bf16 the optimizer's fp32 master would
        overwrite the edit at the next step (the temperature is clamped inside the loss).
        """

    def temperature(self) -> float | None:
        """The effective learnable temperature of the last forward, for logging; None when fixed."""
        value = getattr(self, "_temperature", None)
        return None if value is None else float(value)
