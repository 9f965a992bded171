"""Per-band statistics computed while writing, mergeable across partitions.

Min and max are exact over every pixel. Mean, std and percentiles come from a fixed sample of
the pixels, every ``STRIDE``-th row and column (1 in 16): at archive scale that is billions of
pixels per band, and it keeps statistics off the ingest's critical path. Integer bands (S2
uint16) are counted in a 65536-bin histogram, from which mean, std and percentiles
(inverted-CDF definition) of the sample follow exactly. Float bands (S1 dB) keep running
moments (Chan's parallel update) and a 0.01 dB histogram over [-60, 40) for percentiles.
"""

from __future__ import annotations

import base64

import numpy as np

FLOAT_RANGE = (-60.0, 40.0, 10_000)
STRIDE = 4
INT_BINS = 65_536


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<i8").tobytes()).decode()


def _unb64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i8")


class BandStats:
    """Running per-band statistics of the patches of one sensor (see the module docstring).

    Args:
        bands: Number of bands (the patches' first axis).
        integer: Integer data (S2 uint16: exact histogram) rather than float (S1 dB: running
            moments and a binned histogram).
    """

    def __init__(self, bands: int, integer: bool):
        self.integer = integer
        self.nbins = INT_BINS if integer else FLOAT_RANGE[2]
        self.hist = np.zeros((bands, self.nbins), dtype=np.int64)
        self.n = 0  # pixels per band
        self.mean = np.zeros(bands)
        self.m2 = np.zeros(bands)
        self.min = np.full(bands, np.inf)
        self.max = np.full(bands, -np.inf)
        self._pending: list[np.ndarray] = []  # integer samples, counted in one bincount later

    def update(self, x: np.ndarray) -> None:
        """Add one patch [C, H, W]."""
        c = x.shape[0]
        flat_all = x.reshape(c, -1)
        self.min = np.minimum(self.min, flat_all.min(axis=1))
        self.max = np.maximum(self.max, flat_all.max(axis=1))
        flat = x[:, ::STRIDE, ::STRIDE].reshape(c, -1)
        if self.integer:
            # A 13 x 65536 histogram costs more to add per patch than the patch itself:
            # keep the (small) sample and count a whole partition at once.
            self._pending.append(flat.copy())
            return
        lo, hi, nb = FLOAT_RANGE
        offsets = (np.arange(c, dtype=np.int64) * nb)[:, None]
        idx = np.clip(((flat - lo) * (nb / (hi - lo))).astype(np.int64), 0, nb - 1)
        self.hist += np.bincount((idx + offsets).ravel(), minlength=c * nb).reshape(c, -1)
        m = flat.mean(axis=1, dtype=np.float64)
        m2 = np.square(flat - m[:, None].astype(flat.dtype), dtype=np.float64).sum(axis=1)
        self._merge_moments(flat.shape[1], m, m2)

    def _flush(self) -> None:
        if self._pending:
            flat = np.concatenate(self._pending, axis=1)
            c = flat.shape[0]
            offsets = (np.arange(c, dtype=np.int64) * self.nbins)[:, None]  # band c's bins start at c * nbins
            self.hist += np.bincount((flat + offsets).ravel(), minlength=c * self.nbins).reshape(c, -1)
            self._pending = []

    def _merge_moments(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.n * n / total
        self.n = total

    def merge(self, other: BandStats) -> None:
        """Add another partition's statistics to these, in place."""
        other._flush()
        self.hist += other.hist
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        if not self.integer:
            self._merge_moments(other.n, other.mean, other.m2)

    def to_json(self) -> dict:
        """Return the state as JSON-safe data, for a partition's sidecar.

        Histograms are stored sparse, as base64 int64 arrays of the nonzero bins and their
        counts: a list of ints costs tens of ms per partition to write and parse.
        """
        self._flush()
        nz = [np.flatnonzero(h) for h in self.hist]
        return {
            "integer": self.integer,
            "bands": int(self.hist.shape[0]),
            "hist": [[_b64(i), _b64(h[i])] for i, h in zip(nz, self.hist, strict=True)],
            "n": int(self.n),
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> BandStats:
        """Rebuild statistics from :meth:`to_json`'s output."""
        s = cls(d["bands"], d["integer"])
        for b, (idx, counts) in enumerate(d["hist"]):
            s.hist[b, _unb64(idx)] = _unb64(counts)
        s.n, s.mean, s.m2 = d["n"], np.array(d["mean"]), np.array(d["m2"])
        s.min, s.max = np.array(d["min"], dtype=float), np.array(d["max"], dtype=float)
        return s

    def _percentile(self, h: np.ndarray, q: float) -> float:
        cum = np.cumsum(h)
        b = int(np.searchsorted(cum, q * cum[-1], side="left"))
        if self.integer:
            return float(b)
        lo, hi, nb = FLOAT_RANGE
        return lo + (b + 0.5) * (hi - lo) / nb

    def summary(self, names: list[str]) -> dict[str, dict[str, float]]:
        """{band: {count (sampled pixels), mean, std, min, max, p1, p99}}."""
        self._flush()
        out = {}
        values = np.arange(self.nbins, dtype=np.float64)
        for b, name in enumerate(names):
            h = self.hist[b]
            count = int(h.sum())
            if count == 0:
                continue
            if self.integer:
                mean = float((h * values).sum() / count)
                std = float(np.sqrt((h * (values - mean) ** 2).sum() / count))
            else:
                mean, std = float(self.mean[b]), float(np.sqrt(self.m2[b] / max(self.n, 1)))
            vmin, vmax = float(self.min[b]), float(self.max[b])
            out[name] = {
                "count": count,
                "mean": mean,
                "std": std,
                "min": vmin,
                "max": vmax,
                "p1": self._percentile(h, 0.01),
                "p99": self._percentile(h, 0.99),
            }
        return out
