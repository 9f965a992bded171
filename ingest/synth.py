"""Synthetic SEN12MS / DFC2020 trees of real GeoTIFFs with learnable, shared structure.

Each location has one hidden land-cover map. S2 reflectance, S1 backscatter and the labels
are all rendered from it (with independent sensor noise), so the only information the two
sensors share is the land cover: exactly what Dual-SimCLR should learn, and what the
downstream labels ask for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

# Raw DFC2020 codes 1..10 (3 Savanna and 8 Snow/Ice are rare and become 'ignore' downstream).
N_CLASSES = 10
CLASS_PRIOR = np.array([1.0, 1.0, 0.15, 1.0, 1.0, 1.0, 1.0, 0.1, 1.0, 1.0])
SEASONS = ("spring", "summer", "fall", "winter")
IGBP_OF_DFC = np.array([0, 1, 6, 9, 10, 11, 12, 13, 15, 16, 17], dtype=np.uint8)  # index = DFC code


def _signatures() -> tuple[np.ndarray, np.ndarray]:
    """Fixed physics of the synthetic world: spectra (13 bands) and backscatter per class."""
    rng = np.random.default_rng(20220601)
    s2 = rng.uniform(300, 4500, size=(N_CLASSES, 13))
    s2[9, 7:] = rng.uniform(50, 300, size=6)  # water is dark in NIR/SWIR
    s1 = np.stack([rng.uniform(-20, -6, N_CLASSES), rng.uniform(-28, -13, N_CLASSES)], axis=1)
    s1[9] = (-22.0, -29.0)  # water: specular, dark in SAR too
    return s2, s1


S2_SIG, S1_SIG = _signatures()


def land_cover(rng: np.random.Generator, size: int) -> np.ndarray:
    """A blocky map with a dominant class, raw DFC codes 1..10, uint8 [size, size]."""
    grid = max(2, size // 32)
    probs = CLASS_PRIOR * rng.dirichlet(np.full(N_CLASSES, 0.3))
    probs /= probs.sum()
    cells = rng.choice(N_CLASSES, size=(grid, grid), p=probs)
    lc = np.kron(cells, np.ones((size // grid + 1, size // grid + 1), dtype=np.int64))[:size, :size]
    return (lc + 1).astype(np.uint8)


def render(rng: np.random.Generator, lc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Render one location's S1 (float32 [2, H, W], dB) and S2 (uint16 [13, H, W]) from its map.

    Both come from the class signatures of the land-cover map ``lc`` with independent noise:
    per-location gain and texture plus Gaussian noise for S2, speckle and an offset for S1.
    """
    idx = lc.astype(np.int64) - 1
    gain = rng.uniform(0.85, 1.15)  # per-location illumination: a nuisance, not a signal
    texture = 1.0 + 0.08 * rng.standard_normal(lc.shape)
    s2 = S2_SIG[idx].transpose(2, 0, 1) * gain * texture + rng.normal(0, 120, size=(13, *lc.shape))
    s2 = np.clip(s2, 1, 10000).astype(np.uint16)
    # speckle: multiplicative gamma noise (4 looks) in linear power, then back to dB
    speckle = rng.gamma(4.0, 1 / 4.0, size=(2, *lc.shape))
    s1 = S1_SIG[idx].transpose(2, 0, 1) + 10 * np.log10(speckle) + rng.uniform(-1.5, 1.5)
    return s1.astype(np.float32), s2


def _write(path: Path, data: np.ndarray, transform, crs: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
        dtype=data.dtype, crs=crs, transform=transform,
    ) as dst:
        dst.write(data)


def synthesise(out: str | Path, layout: str = "sen12ms", locations: int = 64, seed: int = 0, size: int = 256) -> int:
    """Write ``locations`` co-located S1/S2 (+ labels) patches in a SEN12MS or DFC2020 tree.

    Returns:
        The number of patches written.
    """
    if layout not in ("sen12ms", "dfc2020"):
        raise ValueError(f"layout must be sen12ms or dfc2020, got {layout!r}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    for i in range(locations):
        lc = land_cover(rng, size)
        s1, s2 = render(rng, lc)
        zone = 31 + i % 6
        crs = f"EPSG:326{zone:02d}"
        transform = Affine(10, 0, 300000 + 10 * size * (i % 97), 0, -10, 5000000 - 10 * size * (i // 97))
        if layout == "sen12ms":
            scene = i // 8 + 1
            season = f"ROIs{1000 + seed % 9000}_{SEASONS[scene % 4]}"
            parts = {"s1": s1, "s2": s2, "lc": np.stack([IGBP_OF_DFC[lc]] * 4)}
            for sensor, data in parts.items():
                name = f"{season}_{sensor}_{scene}_p{i}.tif"
                _write(out / season / f"{sensor}_{scene}" / name, data, transform, crs)
        else:
            season = "ROIs0000_validation" if i % 2 == 0 else "ROIs0000_test"
            parts = {"s1": s1, "s2": s2, "dfc": lc[None], "lc": np.stack([IGBP_OF_DFC[lc]] * 4)}
            for sensor, data in parts.items():
                _write(out / season / f"{sensor}_0" / f"{season}_{sensor}_0_p{i}.tif", data, transform, crs)
    return locations


def command(cfg, args) -> int:
    """``dsl synth``: write the tree ``--out``, ``--layout``, ``--locations``, ``--seed``, ``--size`` ask for."""
    n = synthesise(args.out, args.layout, args.locations, args.seed, args.size)
    print(f"wrote {n} synthetic {args.layout} locations to {args.out}")
    return 0
