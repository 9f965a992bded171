"""Dense alignment (MMA): spatially aligned S1/S2 feature maps instead of pooled embeddings."""

from __future__ import annotations

from torch import Tensor

from dsl.objectives.base import Objective


class DenseMaps(Objective):
    """``model.feature_maps(s1, s2)`` -> ``([B, C, h, w], [B, C, h, w])`` for the MMA loss."""

    def encode(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Return the S1 and S2 backbones' last feature maps, compared location by location."""
        return self.model.feature_maps(a, b)
