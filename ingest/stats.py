"""Per-band statistics computed while writing, mergeable across partitions, a few KB per sidecar.

Min and max are exact over every pixel. Mean, std and percentiles are of a fixed sample of the
pixels, every ``STRIDE``-th row and column (1 in 16): at archive scale that is billions of
pixels per band, and it keeps statistics off the ingest's critical path.

Integer bands (S2 uint16): the sample's mean and std are exact (integer sums of the values and
of their squares). Percentiles (inverted-CDF definition) come from a histogram over
:data:`INT_EDGES`, bins one value wide below 200 and at most 1% of their lower edge above: the
bin holding the sample's exact percentile is found exactly, and the value reported for it (the
bin's harmonic midpoint, clipped to [min, max]) is within 0.5% of that percentile, exact below
200. Float bands (S1 dB): running moments (Chan's parallel update) for mean and std, and a
0.05 dB histogram over [-60, 40) for percentiles (the bin's centre, clipped to [min, max]:
within 0.025 dB of the sample's percentile inside that range).

In a sidecar a histogram is sparse: the non-zero bins' index gaps and count deltas as LEB128
varints, zlib-compressed, base64 (``"v": 2``): about 10 KB for a 256 MB partition of S2 and S1. Sidecars of the format before (base64 int64
index and count arrays over 65,536 exact S2 bins and 10,000 S1 bins of 0.01 dB) are still read:
their histograms fold exactly into these bins, and their S2 sums follow exactly from the bins.
"""

from __future__ import annotations

import base64
import math
import zlib

import numpy as np

FLOAT_RANGE = (-60.0, 40.0, 2_000)
OLD_FLOAT_BINS = 10_000  # the 0.01 dB bins of sidecars before format 2 (5 to one bin here)
STRIDE = 4
OLD_INT_BINS = 65_536  # the exact uint16 bins of sidecars before format 2
FORMAT = 2


def _int_edges() -> np.ndarray:
    """Bin edges over uint16: width 1 below 200, then ``edge // 100``; the last is above 65535.

    Integer arithmetic only: every worker and the driver bin alike.
    """
    edges = [0]
    while edges[-1] <= 65_535:
        edges.append(edges[-1] + max(1, edges[-1] // 100))
    return np.array(edges, dtype=np.int64)


INT_EDGES = _int_edges()
INT_BIN = (np.searchsorted(INT_EDGES, np.arange(OLD_INT_BINS), side="right") - 1).astype(np.int64)  # value -> bin


def _varints(v: np.ndarray) -> bytes:
    """Unsigned LEB128 of non-negative ints, vectorised (7 bits a byte, high bit: more follow)."""
    v = np.asarray(v, dtype=np.uint64)
    n = np.ones(len(v), dtype=np.int64)
    for j in range(1, 10):
        n += v >= np.uint64(1 << (7 * j))
    starts = np.cumsum(n) - n
    out = np.empty(int(n.sum()), dtype=np.uint8)
    for j in range(int(n.max(initial=0))):
        sel = n > j
        low = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (n[sel] - 1 > j).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (low | more).astype(np.uint8)
    return out.tobytes()


def _unvarints(buf: bytes) -> np.ndarray:
    """Inverse of :func:`_varints`.

    Raises:
        ValueError: The bytes end inside a number, or a number is longer than 64 bits.
    """
    b = np.frombuffer(buf, dtype=np.uint8)
    if len(b) == 0:
        return np.zeros(0, dtype=np.uint64)
    if b[-1] & 0x80:
        raise ValueError("histogram data ends inside a number")
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    pos = np.arange(len(b)) - np.repeat(starts, ends - starts + 1)
    if pos.max() > 9:
        raise ValueError("histogram data holds a number longer than 64 bits")
    return np.add.reduceat((b & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64), starts)


def _pack(hist: np.ndarray) -> str:
    """Histograms [bands, bins] -> base64 of zlib of varints.

    Per band: the number of non-zero bins, their index gaps, their count deltas (zigzag:
    neighbouring bins hold similar counts).
    """
    parts = []
    for h in hist:
        nz = np.flatnonzero(h)
        dc = np.diff(h[nz], prepend=0)
        parts += [np.array([len(nz)]), np.diff(nz, prepend=0), np.where(dc >= 0, 2 * dc, -2 * dc - 1)]
    return base64.b64encode(zlib.compress(_varints(np.concatenate(parts)), 9)).decode()


def _unpack(text: str, bands: int, nbins: int) -> np.ndarray:
    """Inverse of :func:`_pack`.

    Raises:
        ValueError: The data does not hold ``bands`` histograms of ``nbins`` bins.
    """
    try:
        raw = zlib.decompress(base64.b64decode(text))
    except zlib.error as e:  # binascii.Error is a ValueError already
        raise ValueError(f"histogram data is not zlib ({e})") from None
    v = _unvarints(raw).astype(np.int64)
    hist = np.zeros((bands, nbins), dtype=np.int64)
    at = 0
    for b in range(bands):
        if at >= len(v):
            raise ValueError(f"histogram data holds {b} of {bands} bands")
        m = int(v[at])
        idx = np.cumsum(v[at + 1 : at + 1 + m])
        zz = v[at + 1 + m : at + 1 + 2 * m]
        if len(zz) != m or (m and idx[-1] >= nbins):
            raise ValueError(f"histogram data of band {b} is cut short or out of range")
        hist[b, idx] = np.cumsum(np.where(zz % 2 == 0, zz // 2, -(zz + 1) // 2))
        at += 1 + 2 * m
    if at != len(v):
        raise ValueError("histogram data runs past its bands")
    return hist


def _unb64(x: str | list) -> np.ndarray:
    """An int64 array of the format before 2: base64 (or, older still, a JSON list)."""
    if isinstance(x, list):
        return np.asarray(x, dtype=np.int64)
    return np.frombuffer(base64.b64decode(x), dtype="<i8")


class BandStats:
    """Running per-band statistics of the patches of one sensor (see the module docstring).

    Args:
        bands: Number of bands (the patches' first axis).
        integer: Integer data (S2 uint16: exact sums, relative-width histogram) rather than float
            (S1 dB: running moments, fixed-width histogram).
    """

    def __init__(self, bands: int, integer: bool):
        self.integer = integer
        self.nbins = len(INT_EDGES) - 1 if integer else FLOAT_RANGE[2]
        self.hist = np.zeros((bands, self.nbins), dtype=np.int64)
        self.n = 0  # sampled pixels per band
        self.mean = np.zeros(bands)  # float bands
        self.m2 = np.zeros(bands)
        self.sum = [0] * bands  # integer bands: exact, as Python ints (no overflow)
        self.sum2 = [0] * bands
        self.min = np.full(bands, np.inf)
        self.max = np.full(bands, -np.inf)

    def update(self, x: np.ndarray) -> None:
        """Add one patch [C, H, W]."""
        c = x.shape[0]
        flat_all = x.reshape(c, -1)
        self.min = np.minimum(self.min, flat_all.min(axis=1))
        self.max = np.maximum(self.max, flat_all.max(axis=1))
        flat = x[:, ::STRIDE, ::STRIDE].reshape(c, -1)
        if self.integer:
            idx = INT_BIN[flat]
            wide = flat.astype(np.int64)
            for b, (s, s2) in enumerate(zip(wide.sum(axis=1).tolist(), np.square(wide).sum(axis=1).tolist(),
                                            strict=True)):
                self.sum[b] += s
                self.sum2[b] += s2
            self.n += flat.shape[1]
        else:
            lo, hi, nb = FLOAT_RANGE
            idx = np.clip(((flat - lo) * (nb / (hi - lo))).astype(np.int64), 0, nb - 1)
            m = flat.mean(axis=1, dtype=np.float64)
            m2 = np.square(flat - m[:, None].astype(flat.dtype), dtype=np.float64).sum(axis=1)
            self._merge_moments(flat.shape[1], m, m2)
        offsets = (np.arange(c, dtype=np.int64) * self.nbins)[:, None]  # band c's bins start at c * nbins
        self.hist += np.bincount((idx + offsets).ravel(), minlength=c * self.nbins).reshape(c, -1)

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
        self.hist += other.hist
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        if self.integer:
            self.sum = [a + b for a, b in zip(self.sum, other.sum, strict=True)]
            self.sum2 = [a + b for a, b in zip(self.sum2, other.sum2, strict=True)]
            self.n += other.n
        else:
            self._merge_moments(other.n, other.mean, other.m2)

    def to_json(self) -> dict:
        """Return the state as JSON-safe data, for a partition's sidecar (a few KB: see the module)."""
        d = {
            "v": FORMAT,
            "integer": self.integer,
            "bands": int(self.hist.shape[0]),
            "nbins": self.nbins,
            "hist": _pack(self.hist),
            "n": int(self.n),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
        }
        if self.integer:
            d["sum"], d["sum2"] = list(self.sum), list(self.sum2)
        else:
            d["mean"], d["m2"] = self.mean.tolist(), self.m2.tolist()
        return d

    @classmethod
    def from_json(cls, d: dict) -> BandStats:
        """Rebuild statistics from :meth:`to_json`'s output, or from a sidecar of the format before.

        Raises:
            ValueError: The histogram data is damaged or of other bins than this code's.
        """
        s = cls(d["bands"], d["integer"])
        if d.get("v") == FORMAT:
            if d["nbins"] != s.nbins:
                raise ValueError(f"{d['nbins']} histogram bins, expected {s.nbins}")
            s.hist = _unpack(d["hist"], s.hist.shape[0], s.nbins)
            if s.integer:
                s.sum, s.sum2 = [int(v) for v in d["sum"]], [int(v) for v in d["sum2"]]
            s.n = int(d["n"])
        else:
            s._read_old_hist(d["hist"])
            s.n = int(s.hist[0].sum()) if s.integer else int(d["n"])  # format 1 kept no S2 count
        if not s.integer:
            s.mean, s.m2 = np.array(d["mean"], dtype=float), np.array(d["m2"], dtype=float)
        s.min, s.max = np.array(d["min"], dtype=float), np.array(d["max"], dtype=float)
        return s

    def _read_old_hist(self, hist: list) -> None:
        """Fold a format-1 histogram (exact uint16 bins, or 0.01 dB bins) into these bins."""
        fold = INT_BIN if self.integer else np.arange(OLD_FLOAT_BINS) // (OLD_FLOAT_BINS // FLOAT_RANGE[2])
        for b, (idx, counts) in enumerate(hist):
            idx, counts = _unb64(idx), _unb64(counts)
            np.add.at(self.hist[b], fold[idx], counts)
            if self.integer:  # the old S2 bins are the values themselves: exact sums
                self.sum[b] = int((counts.astype(object) * idx).sum())
                self.sum2[b] = int((counts.astype(object) * idx * idx).sum())

    def _percentile(self, h: np.ndarray, q: float, vmin: float, vmax: float) -> float:
        cum = np.cumsum(h)
        b = int(np.searchsorted(cum, q * cum[-1], side="left"))
        if self.integer:
            lo, hi = int(INT_EDGES[b]), int(INT_EDGES[b + 1]) - 1
            value = float(lo) if lo == hi else 2 * lo * hi / (lo + hi)  # least worst relative error
        else:
            lo, hi, nb = FLOAT_RANGE
            value = lo + (b + 0.5) * (hi - lo) / nb
        return float(min(max(value, vmin), vmax))

    def summary(self, names: list[str]) -> dict[str, dict[str, float]]:
        """{band: {count (sampled pixels), mean, std, min, max, p1, p99}}."""
        out = {}
        for b, name in enumerate(names):
            h = self.hist[b]
            count = int(h.sum())
            if count == 0:
                continue
            if self.integer:
                mean = self.sum[b] / count
                std = math.sqrt(max(count * self.sum2[b] - self.sum[b] ** 2, 0)) / count  # exact ints, one rounding
            else:
                mean, std = float(self.mean[b]), float(np.sqrt(self.m2[b] / max(self.n, 1)))
            vmin, vmax = float(self.min[b]), float(self.max[b])
            out[name] = {
                "count": count,
                "mean": float(mean),
                "std": std,
                "min": vmin,
                "max": vmax,
                "p1": self._percentile(h, 0.01, vmin, vmax),
                "p99": self._percentile(h, 0.99, vmin, vmax),
            }
        return out
