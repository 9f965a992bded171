"""MMA: dense multi-modal alignment (Windsor et al. 2021) on spatially aligned feature maps.

S1 and S2 of a pair cover the same ground, so location (y, x) of the modality-1 map and the same
location of the modality-2 map form a positive pair. A fixed number of locations is sampled per
image (the same ones in both modalities); every other sampled location of the other modality,
in this image or any image of the global batch, is a negative. That is exactly the symmetric
cross-modal InfoNCE of :class:`~dsl.losses.clip.ClipLoss` over the sampled location vectors, so
MMA reuses it and inherits its distributed modes (see :mod:`dsl.losses.gather`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsl.losses.clip import ClipLoss


def sample_locations(
    batch: int,
    h: int,
    w: int,
    num_locations: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Distinct flat locations per image, ``[batch, k]`` with k = min(num_locations, h * w).

    All ``h * w`` locations, in order, when there are no more than ``num_locations``; otherwise a
    uniform draw without replacement that ``generator`` makes reproducible.
    """
    if num_locations < 1:
        raise ValueError(f"num_locations must be >= 1, got {num_locations}")
    n = h * w
    if num_locations >= n:
        return torch.arange(n, device=device).expand(batch, n)
    draw_device = generator.device if generator is not None else device
    scores = torch.rand(batch, n, generator=generator, device=draw_device)
    return scores.argsort(dim=1)[:, :num_locations].to(device)


class MMALoss(nn.Module):
    """Dense cross-modal InfoNCE between aligned ``[B, D, h, w]`` feature maps.

    Args:
        num_locations: Locations sampled per image (all when the map has fewer).
        temperature: Fixed temperature used when ``forward`` gets no ``logit_scale``.
        gather_with_grad: As :class:`~dsl.losses.clip.ClipLoss`.
        local_loss: As :class:`~dsl.losses.clip.ClipLoss`.

    Raises:
        ValueError: ``num_locations < 1`` or a refused distributed mode.
    """

    def __init__(
        self,
        num_locations: int = 16,
        temperature: float = 0.07,
        gather_with_grad: bool = True,
        local_loss: bool = True,
    ):
        super().__init__()
        if num_locations < 1:
            raise ValueError(f"num_locations must be >= 1, got {num_locations}")
        self.num_locations = num_locations
        self.clip = ClipLoss(gather_with_grad, local_loss, temperature=temperature)

    def forward(
        self,
        f1: Tensor,
        f2: Tensor,
        logit_scale: Tensor | None = None,
        generator: torch.Generator | None = None,
        locations: Tensor | None = None,
    ) -> Tensor:
        """Loss for this rank's maps.

        Args:
            f1: Modality-1 feature maps ``[b, D, h, w]``.
            f2: Modality-2 feature maps, same shape and grid.
            logit_scale: Optional learnable log(1/t), shape [1].
            generator: Makes the location draw reproducible.
            locations: ``[b, k]`` flat indices into ``h * w`` to use instead of drawing them.
        """
        if f1.ndim != 4 or f1.shape != f2.shape:
            raise ValueError(
                "MMA needs two aligned [b, D, h, w] maps of equal shape (same channels and grid), "
                f"got {tuple(f1.shape)} and {tuple(f2.shape)}"
            )
        b, d, h, w = f1.shape
        if locations is None:
            locations = sample_locations(b, h, w, self.num_locations, generator, f1.device)
        if locations.ndim != 2 or locations.shape[0] != b:
            raise ValueError(f"locations must be [{b}, k], got {tuple(locations.shape)}")
        index = locations.unsqueeze(1).expand(b, d, locations.shape[1])
        v1 = f1.flatten(2).gather(2, index).transpose(1, 2).reshape(-1, d)  # [b * k, D]
        v2 = f2.flatten(2).gather(2, index).transpose(1, 2).reshape(-1, d)
        return self.clip(v1, v2, logit_scale)
