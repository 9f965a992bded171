"""The one interface every pretraining objective offers the training loop."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsl.losses.dual_ntxent import inverse_temperature


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it is: what the loss computes in, whatever the precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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

    def forward(
        self, a: Tensor, b: Tensor, mode: str = "loss", grads: tuple[Tensor, Tensor, Tensor | None] | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One forward of the engine; ``mode`` says which (the GradCache ones: :mod:`.grad_cache`).

        Args:
            a: First input batch (see :meth:`views`).
            b: Second input batch.
            mode: ``loss``: ``(loss, out1, out2)``, the loss in fp32 whatever the engine's
                precision. ``embed`` (GradCache's caching pass): ``(out1, out2, logit_scale)``,
                the last a detached copy or None. ``replay``: ``(surrogate, out1, out2)``, the
                outputs detached, where the surrogate's gradient is ``grads``' chain rule.
            grads: ``replay`` only: the large-batch loss's gradients w.r.t. this micro-batch's
                ``out1`` and ``out2`` (in :func:`at_least_fp32`) and w.r.t. ``logit_scale``
                (None: not this one).

        Raises:
            ValueError: An unknown mode, or ``replay`` without ``grads``.
        """
        out1, out2 = self.encode(a, b)
        self._read_temperature()
        if mode == "loss":
            return self.loss(at_least_fp32(out1), at_least_fp32(out2), self.logit_scale), out1, out2
        if mode == "embed":
            scale = None if self.logit_scale is None else self.logit_scale.detach().clone()
            return out1, out2, scale
        if mode == "replay" and grads is not None:
            return self.surrogate(out1, out2, *grads), out1.detach(), out2.detach()
        raise ValueError(f"Objective.forward: unknown mode {mode!r} (or replay without grads)")

    def surrogate(self, out1: Tensor, out2: Tensor, grad1: Tensor, grad2: Tensor, grad_scale: Tensor | None) -> Tensor:
        """A scalar whose gradient w.r.t. the parameters is the cached gradients' chain rule.

        ``d/dtheta sum(out * g) = g^T dout/dtheta`` with ``g`` held constant, which is the
        large-batch loss's gradient flowing through this micro-batch's outputs. The temperature
        term is ``logit_scale * dL/dlogit_scale``; every replay uses ``logit_scale`` (a zero
        ``grad_scale`` on all but one) so every parameter gets a gradient in every backward,
        as in plain training.
        """
        total = (at_least_fp32(out1) * grad1).sum() + (at_least_fp32(out2) * grad2).sum()
        if self.logit_scale is not None:
            g = torch.zeros_like(self.logit_scale) if grad_scale is None else grad_scale
            total = total + (self.logit_scale * g).sum()
        return total

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

    def temperature(self) -> float | None:
        """The effective learnable temperature of the last forward, for logging; None when fixed."""
        value = getattr(self, "_temperature", None)
        return None if value is None else float(value)
