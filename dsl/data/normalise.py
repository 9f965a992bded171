"""Load-time normalisation and band selection of raw S1 (dB) and S2 (reflectance x 10000) patches.

Two schemes:

- ``manifest``: per band ``(x - mean) / std`` with the training split's statistics that the ingest
  wrote to ``manifest.json``.
- ``clip`` (the seed paper's): S1 clipped to [-25, 0] dB and S2 to [0, 10000], both then scaled
  to [0, 1].

Shards keep raw values, so either scheme (and any band subset) can be chosen per experiment.
Called on the already cropped window: converting a 128 px crop is 4x cheaper than a 256 px patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsl.contracts.manifest import Manifest

S1_CLIP = (-25.0, 0.0)
S2_CLIP = (0.0, 10000.0)


@dataclass
class BandTransform:
    """``(clip(x[bands]) - offset) * scale`` per band, written as float32.

    Attributes:
        offset: float32 [C_out, 1, 1], already restricted to the selected bands.
        scale: float32 [C_out, 1, 1].
        clip: (low, high) applied before the affine map, or None.
        bands: Indices of the input bands to keep (in this order), or None for all.
    """

    offset: np.ndarray
    scale: np.ndarray
    clip: tuple[float, float] | None = None
    bands: np.ndarray | None = None

    @property
    def channels(self) -> int:
        """Output channels: the number of selected bands."""
        return self.offset.shape[0]

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise a raw [C_in, H, W] array (any real dtype, may be a strided crop view).

        Args:
            x: Raw patch or window of it.
            out: Optional float32 [C_out, H, W] destination (e.g. a row of the batch array),
                which saves the copy a stack would make.
        """
        if self.bands is not None:
            x = x[self.bands]  # copies only the (small) cropped window
        if out is None:
            out = np.empty(x.shape, dtype=np.float32)
        # One pass converts the raw dtype into the float32 destination; the rest is in place.
        if self.clip is None:
            np.subtract(x, self.offset, out=out, dtype=np.float32)
        else:
            np.clip(x, *self.clip, out=out, dtype=np.float32)
            out -= self.offset
        out *= self.scale
        return out


def _select(n_bands: int, bands: list[int] | None, key: str, names: list[str]) -> np.ndarray:
    if bands is None:
        return np.arange(n_bands)
    if not bands:
        raise ValueError(f"{key}: empty band list; use null for all bands")
    bad = [b for b in bands if not -n_bands <= b < n_bands]
    if bad:
        raise ValueError(f"{key}: band index {bad[0]} out of range for the {n_bands} bands {names}")
    return np.asarray(bands, dtype=np.int64) % n_bands


def _transform(offset, scale, idx: np.ndarray, n_bands: int, clip=None) -> BandTransform:
    shape = (-1, 1, 1)
    off = np.broadcast_to(np.asarray(offset, dtype=np.float64), (n_bands,))[idx]
    sc = np.broadcast_to(np.asarray(scale, dtype=np.float64), (n_bands,))[idx]
    bands = None if np.array_equal(idx, np.arange(n_bands)) else idx
    return BandTransform(
        off.astype(np.float32).reshape(shape), sc.astype(np.float32).reshape(shape), clip, bands
    )


def _stats(manifest: Manifest, sensor: str) -> tuple[np.ndarray, np.ndarray]:
    names = getattr(manifest.bands, sensor) or []
    stats = getattr(manifest.stats, sensor) or {}
    missing = [n for n in names if n not in stats]
    if missing:
        raise ValueError(
            f"manifest.json: stats.{sensor} has no statistics for bands {missing}; "
            "use data.normalisation=clip or re-ingest"
        )
    mean = np.array([stats[n].mean for n in names], dtype=np.float64)
    std = np.array([stats[n].std for n in names], dtype=np.float64)
    # A constant band (std 0) carries no signal: centre it and leave its scale alone.
    std[~(std > 0)] = 1.0
    return mean, std


class Normaliser:
    """Normalises and band-selects raw S1 / S2 arrays into float32.

    Build with :meth:`from_manifest`; call as ``s1, s2 = norm(s1_raw, s2_raw)`` or per sensor
    ``norm.s1(x, out=...)``.
    """

    def __init__(self, s1: BandTransform, s2: BandTransform, scheme: str = "manifest"):
        self.s1, self.s2, self.scheme = s1, s2, scheme

    @property
    def channels(self) -> tuple[int, int]:
        """(S1 channels, S2 channels) after band selection: the backbones' input widths."""
        return self.s1.channels, self.s2.channels

    def __call__(self, s1: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalise one raw S1 and one raw S2 array; returns new float32 arrays."""
        return self.s1(s1), self.s2(s2)

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        scheme: str = "manifest",
        s1_bands: list[int] | None = None,
        s2_bands: list[int] | None = None,
    ) -> Normaliser:
        """Build from a manifest's band names (and statistics for the ``manifest`` scheme).

        Args:
            manifest: As returned by :func:`dsl.contracts.manifest.read_manifest`.
            scheme: ``manifest`` or ``clip``.
            s1_bands: Indices into the manifest's S1 band list; None keeps all.
            s2_bands: Indices into the manifest's S2 band list; None keeps all.

        Raises:
            ValueError: Unknown scheme, band index out of range or missing statistics.
        """
        names1, names2 = manifest.bands.s1, manifest.bands.s2 or []
        n1, n2 = len(names1), len(names2)
        idx1 = _select(n1, s1_bands, "data.s1_bands", names1)
        idx2 = _select(n2, s2_bands, "data.s2_bands", names2)
        if scheme == "clip":
            (lo1, hi1), (lo2, hi2) = S1_CLIP, S2_CLIP
            return cls(
                _transform(lo1, 1 / (hi1 - lo1), idx1, n1, S1_CLIP),
                _transform(lo2, 1 / (hi2 - lo2), idx2, n2, S2_CLIP),
                scheme,
            )
        if scheme == "manifest":
            (m1, s1), (m2, s2) = _stats(manifest, "s1"), _stats(manifest, "s2")
            return cls(_transform(m1, 1 / s1, idx1, n1), _transform(m2, 1 / s2, idx2, n2), scheme)
        raise ValueError(f"data.normalisation: unknown scheme {scheme!r}; use 'manifest' or 'clip'")
