"""``ingest.stats.BandStats``: what the manifest's statistics promise (min/max exact, S2 mean/std
exact, percentiles within the documented error), the compact sidecar format and its bound,
sidecars of the format before it, and merging partitions (= the statistics of their union)."""

from __future__ import annotations

import base64
import functools
import json
import zlib

import numpy as np
import pytest
import rasterio
from fixtures.services import realdata

import ingest.run as run
from dsl.contracts.config import IngestConfig
from dsl.contracts.shard_format import S1_BANDS, S2_L1C_BANDS
from ingest import stats
from ingest.sources import PairItem
from ingest.sources.base import Pair
from ingest.stats import STRIDE, BandStats
from ingest.synth import land_cover, render

S2_NAMES, S1_NAMES = list(S2_L1C_BANDS), list(S1_BANDS)


@functools.cache
def real_patches() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The real SEN12MS-CR S2 patches and the real S1 patches, each in its 16 stride phases
    (every pixel sampled once: a partition's worth of real values)."""
    cr, s1_dir = realdata("sen12ms-cr"), realdata("sen12ms")

    def read(p):
        with rasterio.open(p) as r:
            return r.read()

    s2 = [read(p) for p in sorted(cr.glob("*_s2_*.tif"))]
    s1 = [read(p) for p in sorted([*cr.glob("*_s1_*.tif"), *s1_dir.glob("*_s1_*.tif")])]
    phases = [(dy, dx) for dy in range(STRIDE) for dx in range(STRIDE)]
    return ([np.roll(a, p, axis=(1, 2)) for a in s2 for p in phases],
            [np.roll(a, p, axis=(1, 2)) for a in s1 for p in phases])


def synth_partition(n: int = 115, size: int = 256, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` rendered pairs of ``size`` px: a default 256 MB partition of ``ingest.synth`` data."""
    rng = np.random.default_rng(seed)
    pairs = [render(rng, land_cover(rng, size)) for _ in range(n)]
    return [s2 for _, s2 in pairs], [s1 for s1, _ in pairs]


def collect(arrays: list[np.ndarray], integer: bool) -> BandStats:
    st = BandStats(arrays[0].shape[0], integer=integer)
    for a in arrays:
        st.update(a)
    return st


def sampled(arrays: list[np.ndarray]) -> np.ndarray:
    """[C, N]: every STRIDE-th row and column of every patch, as float64."""
    return np.concatenate([a[:, ::STRIDE, ::STRIDE].reshape(a.shape[0], -1) for a in arrays], axis=1).astype(np.float64)


def old_format(arrays: list[np.ndarray], integer: bool) -> dict:
    """A sidecar's statistics as the code before format 2 wrote them: base64 int64 index and
    count arrays of the non-zero bins of 65,536 exact S2 bins or 10,000 0.01 dB S1 bins."""
    flat = sampled(arrays)
    if integer:
        idx = flat.astype(np.int64)
        nbins = 65_536
    else:
        idx = np.clip(((flat + 60.0) * 100).astype(np.int64), 0, 9_999)
        nbins = 10_000
    hist = np.stack([np.bincount(row, minlength=nbins) for row in idx])

    def b64(a):
        return base64.b64encode(np.ascontiguousarray(a, dtype="<i8").tobytes()).decode()

    full = np.stack([a.reshape(a.shape[0], -1).min(axis=1) for a in arrays]).min(axis=0), \
        np.stack([a.reshape(a.shape[0], -1).max(axis=1) for a in arrays]).max(axis=0)
    return {"integer": integer, "bands": int(hist.shape[0]),
            "hist": [[b64(np.flatnonzero(h)), b64(h[np.flatnonzero(h)])] for h in hist],
            "n": 0 if integer else int(flat.shape[1]),
            "mean": [0.0] * hist.shape[0] if integer else flat.mean(axis=1).tolist(),
            "m2": [0.0] * hist.shape[0] if integer else (flat.var(axis=1) * flat.shape[1]).tolist(),
            "min": full[0].astype(float).tolist(), "max": full[1].astype(float).tolist()}


def inverted_cdf(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, 100 * q, method="inverted_cdf"))


# ---------------------------------------------------------------- what the summary promises


def test_integer_bins_are_one_value_wide_below_200_and_at_most_one_percent_above():
    edges = stats.INT_EDGES
    width = np.diff(edges)
    assert edges[0] == 0 and edges[-2] <= 65_535 < edges[-1]
    assert (width[edges[:-1] < 200] == 1).all()
    assert (width <= np.maximum(1, edges[:-1] / 100)).all()
    values = np.arange(65_536)
    b = stats.INT_BIN[values]
    assert ((edges[b] <= values) & (values < edges[b + 1])).all()  # every value in its own bin
    assert len(edges) - 1 < 1000  # what keeps a sidecar small


@pytest.mark.parametrize("data", ["real", "synth"])
def test_summary_is_exact_where_promised_and_within_the_documented_error(data):
    s2, s1 = real_patches() if data == "real" else synth_partition(24, 128)
    for arrays, integer, names in ((s2, True, S2_NAMES), (s1, False, S1_NAMES)):
        got = collect(arrays, integer).summary(names)
        x = sampled(arrays)
        full = np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1).astype(np.float64)
        for b, name in enumerate(names):
            g = got[name]
            assert g["count"] == x.shape[1]
            assert (g["min"], g["max"]) == (full[b].min(), full[b].max())  # exact, over every pixel
            np.testing.assert_allclose([g["mean"], g["std"]], [x[b].mean(), x[b].std()], rtol=1e-9 if integer else 1e-6)
            for q, key in ((0.01, "p1"), (0.99, "p99")):
                want = inverted_cdf(x[b], q)
                if integer:  # 0.5% relative, exact below 200
                    assert abs(g[key] - want) <= 0.005 * want + 1e-9, (name, key, g[key], want)
                    if want < 200:
                        assert g[key] == want
                else:  # half a 0.05 dB bin
                    assert abs(g[key] - want) <= 0.025 + 1e-4, (name, key, g[key], want)


def test_small_values_are_exact_and_a_constant_band_reports_itself():
    x = np.zeros((2, 8, 8), np.uint16)
    x[0] = 2000
    x[1, ::STRIDE, ::STRIDE] = [[0, 50], [100, 150]]  # the sampled pixels
    got = collect([x], True).summary(["a", "b"])
    assert got["a"] == {"count": 4, "mean": 2000.0, "std": 0.0, "min": 2000.0, "max": 2000.0, "p1": 2000.0,
                        "p99": 2000.0}
    assert (got["b"]["p1"], got["b"]["p99"], got["b"]["mean"]) == (0.0, 150.0, 75.0)


# ---------------------------------------------------------------- the sidecar format


def test_a_sidecar_round_trips_through_json_exactly():
    s2, s1 = synth_partition(6, 64, seed=2)
    for arrays, integer, names in ((s2, True, S2_NAMES), (s1, False, S1_NAMES)):
        st = collect(arrays, integer)
        back = BandStats.from_json(json.loads(json.dumps(st.to_json())))
        assert (back.hist == st.hist).all() and back.n == st.n
        assert back.summary(names) == st.summary(names)
    empty = BandStats.from_json(json.loads(json.dumps(BandStats(13, True).to_json())))
    assert empty.summary(S2_NAMES) == {} and not empty.hist.any()


def test_real_data_sidecars_are_a_few_kb():
    s2, s1 = real_patches()  # 5 real scenes, 327,680 sampled pixels a band
    assert len(json.dumps(collect(s2, True).to_json())) < 9_000  # measured 7,500 (the old format: 1,051,599)
    assert len(json.dumps(collect(s1, False).to_json())) < 2_000  # measured 1,149 (old: 58,279)


@pytest.mark.slow  # renders a whole 256 MB partition (~7 s)
def test_the_compact_sidecar_is_a_few_kb_where_the_old_one_was_megabytes():
    s2, s1 = synth_partition()  # a 256 MB partition of 256 px pairs
    new = len(json.dumps(collect(s2, True).to_json())) + len(json.dumps(collect(s1, False).to_json()))
    old = len(json.dumps(old_format(s2, True))) + len(json.dumps(old_format(s1, False)))
    assert new < 16_000 and old > 1_000_000, (new, old)  # measured: 12,282 vs 1,634,748


def test_a_sidecar_of_the_format_before_reads_as_the_same_statistics():
    s2, s1 = synth_partition(6, 64, seed=3)
    for arrays, integer, names in ((s2, True, S2_NAMES), (s1, False, S1_NAMES)):
        now = collect(arrays, integer)
        before = BandStats.from_json(json.loads(json.dumps(old_format(arrays, integer))))
        assert (before.hist == now.hist).all() and before.n == now.n
        if integer:
            assert (before.sum, before.sum2) == (now.sum, now.sum2)  # exact: the old bins were the values
        a, b = before.summary(names), now.summary(names)
        for name in names:
            for k in a[name]:
                assert a[name][k] == pytest.approx(b[name][k], rel=1e-9, abs=1e-9), (name, k)
    legacy = old_format(s2, True)  # older still: plain JSON lists
    legacy["hist"] = [[np.frombuffer(base64.b64decode(i), "<i8").tolist(), np.frombuffer(base64.b64decode(c), "<i8")
                       .tolist()] for i, c in legacy["hist"]]
    assert (BandStats.from_json(legacy).hist == collect(s2, True).hist).all()


@pytest.mark.parametrize("damage", ["cut", "bins", "garbage"])
def test_damaged_histogram_data_is_one_clear_error(damage):
    d = collect(synth_partition(2, 32)[0], True).to_json()
    if damage == "cut":
        raw = base64.b64decode(d["hist"])
        d["hist"] = base64.b64encode(zlib.compress(zlib.decompress(raw)[:-7])).decode()
    elif damage == "bins":
        d["nbins"] = 65_536
    else:
        d["hist"] = base64.b64encode(b"not zlib").decode()
    with pytest.raises(ValueError, match="histogram"):  # what the manifest merge names the sidecar for
        BandStats.from_json(d)


def test_varints_round_trip_at_every_length():
    values = np.array([0, 1, 127, 128, 300, 2**14, 2**21 - 1, 2**35, 2**63 - 1, 2**64 - 1], dtype=np.uint64)
    raw = stats._varints(values)
    assert raw[:5] == bytes([0, 1, 0x7F, 0x80, 0x01])  # LEB128: low 7 bits first, high bit = more
    assert (stats._unvarints(raw) == values).all()
    with pytest.raises(ValueError, match="ends inside a number"):
        stats._unvarints(raw[:-1])


# ---------------------------------------------------------------- merging partitions


def test_merged_partitions_equal_the_statistics_of_their_union():
    s2, s1 = synth_partition(12, 64, seed=5)
    for arrays, integer, names in ((s2, True, S2_NAMES), (s1, False, S1_NAMES)):
        whole = collect(arrays, integer)
        merged = BandStats(arrays[0].shape[0], integer)
        for chunk in (arrays[:1], arrays[1:5], arrays[5:]):  # as the manifest merges sidecars
            merged.merge(BandStats.from_json(json.loads(json.dumps(collect(chunk, integer).to_json()))))
        assert (merged.hist == whole.hist).all() and merged.n == whole.n
        a, b = merged.summary(names), whole.summary(names)
        for name in names:
            for k in a[name]:
                if integer or k not in ("mean", "std"):
                    assert a[name][k] == b[name][k], (name, k)  # exact sums and bins: the same numbers
                else:
                    assert a[name][k] == pytest.approx(b[name][k], rel=1e-12), (name, k)


# ---------------------------------------------------------------- an ingest resumed from old sidecars


class ArraySource:
    """One rendered 32 px pair per item, held in memory."""

    def __init__(self, n: int):
        rng = np.random.default_rng(7)
        self.pairs = {f"k{i}": render(rng, land_cover(rng, 32)) for i in range(n)}

    def list(self, input_url: str):
        return [PairItem(key=k, location=f"loc-{k}", files=(("s1", f"{input_url}/{k}.tif"),)) for k in self.pairs], []

    def read(self, it: PairItem):
        s1, s2 = self.pairs[it.key]
        return [Pair(key=it.key, location=it.location, s1=s1, s2=s2,
                     meta={"key": it.key, "s2_bands": S2_NAMES, "s2_file": f"/in/{it.key}_s2.tif"})]

    def estimate_bytes(self, it: PairItem) -> int:
        return 250_000  # four items a partition at the default 1 MB below


def test_an_ingest_resumed_from_sidecars_of_the_format_before_gives_the_same_statistics(tmp_path, monkeypatch):
    source = ArraySource(12)
    monkeypatch.setattr(run, "get_source", lambda name, tile_size, cfg=None: source)
    monkeypatch.setattr(run, "_run_tasks", lambda cfg, todo, *_: sum(run.write_partition(cfg, p)["seconds"] for p in todo))
    cfg = IngestConfig(input="/in", output=str(tmp_path), shard_size_mb=1.0, progress=False, encoding="plain")
    clean = run.ingest(cfg).stats.model_dump()
    sidecars = sorted((tmp_path / "_parts").glob("*.tar.json"))
    assert len(sidecars) == 3
    for path in sidecars[:2]:  # written by the code before; the third is redone by this code
        side = json.loads(path.read_text())
        s1 = [source.pairs[k][0] for k in side["keys"]]
        s2 = [source.pairs[k][1] for k in side["keys"]]
        side["stats"] = {"s1": old_format(s1, False), "s2": old_format(s2, True)}
        path.write_text(json.dumps(side))
    sidecars[2].unlink()
    resumed = run.ingest(cfg).stats.model_dump()
    for sensor in ("s1", "s2"):
        for band, want in clean[sensor].items():
            assert resumed[sensor][band] == pytest.approx(want, rel=1e-9), (sensor, band)
    # a damaged sidecar is named, with what to do
    side = json.loads(sidecars[0].read_text())
    side["stats"]["s2"]["hist"][0][0] = "@@"
    sidecars[0].write_text(json.dumps(side))
    with pytest.raises(run.IngestError, match=rf"{sidecars[0].name}: unreadable statistics .*; delete it and rerun"):
        run.ingest(cfg)
