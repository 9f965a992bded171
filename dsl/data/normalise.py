"""Load-time normalisation and band selection of raw S1 (dB) and S2 (reflectance x 10000) patches.

Two schemes:

- ``manifest``: per band ``(x - mean) / std`` with the training split's statistics that the ingest
  wrote to ``manifest.json``.
- ``clip`` (the seed paper's): S1 clipped to [-25, 0] dB and S2 to [0, 10000], both then scaled
  to [0, 1].

Shards keep raw values, so either scheme (and any band subset) can be chosen per experiment.
Called on the already cropped window: converting a 128 px crop is 4x cheaper than a 256 px patch.

Where it runs: in the loader (numpy arrays in, float32 out), or, with
``data.normalise_on_device``, in the training loop on a raw batch already on the GPU
(:meth:`BandTransform.normalise_tensor`). Both convert to float32 and then run the same
in-place torch code (:meth:`BandTransform.apply_`), so they agree to the bit on the same input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from dsl.contracts.manifest import Manifest

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, Tensor)

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
    _constants: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def channels(self) -> int:
        """Output channels: the number of selected bands."""
        return self.offset.shape[0]

    def select(self, x: np.ndarray) -> np.ndarray:
        """The selected bands of a raw [C_in, H, W] array, in order (a copy only for a subset)."""
        return x if self.bands is None else x[self.bands]

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise a raw [C_in, H, W] array (any real dtype, may be a strided crop view).

        Args:
            x: Raw patch or window of it.
            out: Optional float32 [C_out, H, W] destination (e.g. a row of the batch array),
                which saves the copy a stack would make.
        """
        x = self.select(x)  # copies only the (small) cropped window
        if out is None:
            out = np.empty(x.shape, dtype=np.float32)
        np.copyto(out, x, casting="unsafe")  # the raw dtype into float32, exactly as a cast does
        return self.apply_(out)

    def normalise_tensor(self, raw: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """Normalise a raw batch [B, C_out, H, W] on its device into a new float32 tensor.

        The batch holds the selected bands already (the loader selects them when it crops:
        ``data.normalise_on_device``), in any real dtype (uint16, float16, ...).

        Args:
            raw: Raw values, bands selected.
            memory_format: Layout of the result (``torch.channels_last`` for NHWC convolutions).
        """
        if raw.shape[-3] != self.channels:
            raise ValueError(f"raw batch has {raw.shape[-3]} bands, this transform {self.channels}: "
                             "the loader selects the bands of a raw batch")
        out = torch.empty(raw.shape, dtype=torch.float32, device=raw.device, memory_format=memory_format)
        out.copy_(raw)
        return self.apply_(out)

    def apply_(self, x: ArrayOrTensor) -> ArrayOrTensor:
        """The maths, in place on float32 ``[..., C_out, H, W]``: clip, subtract the offset, scale.

        The one implementation both paths run: on a numpy array in the loader (numpy, because
        torch's CPU ops would spread each small crop over threads the training step needs) and
        on a tensor on any device. Same float32 operations in the same order: equal results.
        """
        if isinstance(x, Tensor):
            offset, scale = self._on(x.device)
            if self.clip is not None:
                x.clamp_(*self.clip)
        else:
            offset, scale = self.offset, self.scale
            if self.clip is not None:
                np.clip(x, *self.clip, out=x)
        x -= offset
        x *= scale
        return x

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(offset, scale)`` as tensors on ``device``, copied there once."""
        key = str(device)
        if key not in self._constants:
            self._constants[key] = tuple(torch.from_numpy(a).to(device) for a in (self.offset, self.scale))
        return self._constants[key]


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

    def normalise_batch(
        self, s1: Tensor, s2: Tensor, memory_format: torch.memory_format = torch.contiguous_format
    ) -> tuple[Tensor, Tensor]:
        """Normalise a raw batch (bands selected, as a raw loader yields it) on its device.

        See :meth:`BandTransform.normalise_tensor`; returns new float32 tensors.
        """
        return self.s1.normalise_tensor(s1, memory_format), self.s2.normalise_tensor(s2, memory_format)

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
