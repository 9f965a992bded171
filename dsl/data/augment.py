"""Multispectral and SAR augmentations for the single-view SimCLR baseline.

Geometric and radiometric changes only: no colour ops, which assume RGB. Dual-SimCLR itself
uses none: its two views are the two sensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator | None, like: Tensor
) -> Tensor:
    device = generator.device if generator is not None else like.device
    u = torch.rand(n, generator=generator, device=device, dtype=like.dtype).to(like.device)
    return low + (high - low) * u


def _random_crop_resize(
    x: Tensor, scale: tuple[float, float], generator: torch.Generator | None
) -> Tensor:
    """Per-sample crop of ``scale`` area fraction and aspect ratio in [3/4, 4/3], resized back."""
    b = x.shape[0]
    area = _uniform(b, scale[0], scale[1], generator, x)
    # Only ratios in [area, 1 / area] keep both sides inside the image (so area 1 is no crop).
    low = area.log().clamp(min=math.log(3 / 4))
    high = (-area.log()).clamp(max=math.log(4 / 3))
    ratio = (low + (high - low) * _uniform(b, 0, 1, generator, x)).exp()
    width, height = (area * ratio).sqrt(), (area / ratio).sqrt()  # fractions of each side
    # affine_grid works in [-1, 1] coordinates: a crop of fraction f may centre in [f - 1, 1 - f].
    cx = (2 * _uniform(b, 0, 1, generator, x) - 1) * (1 - width)
    cy = (2 * _uniform(b, 0, 1, generator, x) - 1) * (1 - height)
    zero = torch.zeros_like(width)
    theta = torch.stack(
        [torch.stack([width, zero, cx], -1), torch.stack([zero, height, cy], -1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def augment(
    x: Tensor,
    generator: torch.Generator | None = None,
    *,
    crop_scale: tuple[float, float] = (0.25, 1.0),
    brightness: float = 0.2,
    contrast: float = 0.2,
    noise_std: float = 0.05,
) -> Tensor:
    """One random view of a normalised ``[B, C, H, W]`` batch; every sample drawn independently.

    Random crop-resize, horizontal/vertical flips, 90-degree rotations (square images only),
    then per-channel radiometric jitter: an additive offset in [-brightness, brightness] and a
    gain in [1 - contrast, 1 + contrast] (inputs are per-band normalised, so these are in units
    of the band's std), and gaussian noise with a per-channel std drawn in [0, noise_std].

    Args:
        x: Float batch, any number of bands.
        generator: Makes the view reproducible; None uses the global RNG.
        crop_scale: Range of the crop's area as a fraction of the image.
        brightness: Max per-channel additive offset.
        contrast: Max per-channel relative gain change.
        noise_std: Max per-channel noise std.

    Raises:
        ValueError: Not a 4-d float tensor, or an out-of-range parameter.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            f"augment expects a float [B, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}"
        )
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
    if brightness < 0 or noise_std < 0 or not 0 <= contrast < 1:
        raise ValueError(
            f"need brightness >= 0, noise_std >= 0, 0 <= contrast < 1; got {brightness}, {noise_std}, {contrast}"
        )
    b, c, h, w = x.shape
    x = _random_crop_resize(x, crop_scale, generator)
    x = _where(_uniform(b, 0, 1, generator, x) < 0.5, x.flip(-1), x)
    x = _where(_uniform(b, 0, 1, generator, x) < 0.5, x.flip(-2), x)
    if h == w:  # a quarter turn of a non-square image would change its shape
        turns = _uniform(b, 0, 4, generator, x).floor()
        turned = x
        for k in (1, 2, 3):
            turned = _where(turns == k, x.rot90(k, dims=(-2, -1)), turned)
        x = turned
    offset = _uniform(b * c, -brightness, brightness, generator, x).view(b, c, 1, 1)
    gain = _uniform(b * c, 1 - contrast, 1 + contrast, generator, x).view(b, c, 1, 1)
    sigma = _uniform(b * c, 0, noise_std, generator, x).view(b, c, 1, 1)
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return x * gain + offset + sigma * noise
