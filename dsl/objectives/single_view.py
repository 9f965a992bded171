"""The single-sensor SimCLR baseline: two augmentations of one sensor are the positives."""

from __future__ import annotations

import torch
from torch import Tensor

from dsl.data.augment import augment
from dsl.objectives.base import Objective


class SingleView(Objective):
    """One encoder (``model.modality``), two random views of its sensor per batch."""

    def views(self, s1: Tensor, s2: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Two independent random augmentations of the model's sensor; the other is unused."""
        x = s2 if self.model.modality == "s2" else s1
        return augment(x, generator), augment(x, generator)

    def encode(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Project both views with the one shared encoder."""
        return self.model(a), self.model(b)
