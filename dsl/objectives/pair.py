"""Cross-modal pairs: Dual-SimCLR (NT-Xent over 2N embeddings) and CLIP (InfoNCE)."""

from __future__ import annotations

from torch import Tensor

from dsl.objectives.base import Objective


class CrossModalPair(Objective):
    """S1 and S2 of one place are the positives: ``model(s1, s2)`` -> ``(z1, z2)``.

    No augmentation: the two sensors are the two views.
    """

    def encode(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Return the projections ``(z1, z2)`` of the S1 batch ``a`` and the S2 batch ``b``."""
        return self.model(a, b)
