"""The compact sample encoding (format 2) and tiling: S1 within 0.01 dB, S2 bit for bit, the
full-precision fallback, tiles of real SEN12MS patches, and the bytes per delivered 128-px pair."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import webdataset as wds
from fixtures.services import realdata
from rasterio.windows import Window

from dsl.contracts.config import IngestConfig
from dsl.contracts.shard_format import (
    S1_MAX_ERROR_DB,
    S1_MEMBERS,
    S2_MEMBERS,
    decode_array,
    register_webdataset_decoders,
    webdataset_decoder,
)
from ingest.raster import BadInput
from ingest.run import Partition, ingest, write_partition
from ingest.sources import get_source
from ingest.sources.base import Pair
from ingest.tiling import tile_pair
from ingest.writer import ShardWriter, s1_member, sample_members

MB = 1e6
RNG = np.random.default_rng(3)


def joined(chunks: list) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def s1_values() -> np.ndarray:
    """dB values across and beyond SEN12MS's range: near -50 and +30, exact half steps of 1/64
    (the worst case of rounding), the fixed point's ends, and float32 noise."""
    half_steps = (np.arange(-3200, 1920, 7) + 0.5) / 64  # -50 .. +30 dB
    ends = np.array([-512.0, -511.99, -50.0, -49.999, 29.999, 30.0, 31.99, 32.0, 32.01, 63.9, 511.98, 0.0, -0.0])
    noise = RNG.uniform(-60, 40, 4096)
    v = np.concatenate([half_steps, ends, noise]).astype(np.float32)
    v = np.resize(v, 2 * 64 * 64)
    return v.reshape(2, 64, 64)


def test_s1_member_is_within_the_bound_across_the_range():
    s1 = s1_values()
    ext, chunks, error = s1_member(s1)
    got = decode_array(ext, joined(chunks), ext)
    assert ext == "s1.blosc" and got.dtype == np.float32 and got.shape == s1.shape
    measured = float(np.abs(got - s1).max())
    assert measured == error <= 1 / 128 <= S1_MAX_ERROR_DB
    assert measured > 0.0078  # the half steps are there: the bound is tight, not vacuous
    near = (np.abs(s1 + 50) < 0.5) | (np.abs(s1 - 30) < 0.5)
    assert near.sum() > 20 and np.abs(got - s1)[near].max() <= S1_MAX_ERROR_DB


@pytest.mark.parametrize("bad", [-9999.0, 600.0, -513.0, np.inf, np.nan])
def test_s1_beyond_the_fixed_point_falls_back_to_full_precision(bad):
    """A finite nodata fill (or any value the fixed point cannot hold within 0.01 dB) keeps the
    sample, at full precision: nodata handling stays what it was before format 2."""
    s1 = s1_values()
    s1[1, 5, 7] = bad
    ext, chunks, error = s1_member(s1)
    got = decode_array(ext, joined(chunks), ext)
    assert ext == "s1.npy" and error == 0.0
    assert got.dtype == np.float32 and got.tobytes() == s1.tobytes()  # bit for bit, NaN included


def pair(key: str = "loc1", size: int = 32, dfc: bool = False) -> Pair:
    s1 = RNG.uniform(-45, 25, (2, size, size)).astype(np.float32)
    s2 = RNG.integers(1, 12000, (13, size, size)).astype(np.uint16)
    mask = RNG.integers(0, 8, (size, size)).astype(np.uint8) if dfc else None
    meta = {"key": key, "source": "t", "transform": [10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0],
            "height": size, "width": size, "s1_file": "s1.tif", "s2_file": "s2.tif"}
    extra = {"cls": 2, "multi": np.eye(8, dtype=np.uint8)[2]} if dfc else {}
    return Pair(key=key, location="loc", s1=s1, s2=s2, meta=meta, dfc=mask, extra=extra)


@pytest.mark.parametrize("encoding", ["compact", "plain"])
def test_shards_read_back_with_stock_webdataset(tmp_path, encoding):
    pairs = [pair("a"), pair("b", dfc=True), pair("c", size=20)]
    w = ShardWriter(str(tmp_path / "s.tar"))
    for p in pairs:
        w.add(sample_members(p, "train", encoding))
    w.commit()
    register_webdataset_decoders()
    url = str(tmp_path / "s.tar")
    for handlers in [(webdataset_decoder,), ()]:
        got = {s["__key__"]: s for s in wds.WebDataset(url, shardshuffle=False, empty_check=False).decode(*handlers)}
        assert list(got) == ["a", "b", "c"]
        for p in pairs:
            s = got[p.key]
            (s1_ext,) = [e for e in S1_MEMBERS if e in s]
            (s2_ext,) = [e for e in S2_MEMBERS if e in s]
            assert (s1_ext, s2_ext) == (("s1.blosc", "s2.blosc") if encoding == "compact" else ("s1.npy", "s2.npy"))
            assert s[s2_ext].dtype == np.uint16 and s[s2_ext].tobytes() == p.s2.tobytes()
            assert s[s1_ext].dtype == np.float32 and s[s1_ext].shape == p.s1.shape
            assert np.abs(s[s1_ext] - p.s1).max() <= (S1_MAX_ERROR_DB if encoding == "compact" else 0.0)
            assert s["json"]["split"] == "train"
        assert got["b"]["dfc.npy"].tobytes() == pairs[1].dfc.tobytes() and got["b"]["cls"] == 2


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="unknown encoding 'zip'"):
        sample_members(pair(), None, "zip")


def test_tile_pair_cuts_keys_grids_and_labels():
    p = pair("ROIs1_summer_1_p3", size=70, dfc=True)
    tiles = tile_pair(p, 32)
    assert [t.key for t in tiles] == [f"ROIs1_summer_1_p3_r{r}_c{c}" for r in range(2) for c in range(2)]  # edge dropped
    for t in tiles:
        r, c = t.meta["tile"]
        y, x = 32 * r, 32 * c
        assert t.s1.tobytes() == p.s1[:, y : y + 32, x : x + 32].tobytes()
        assert t.s2.tobytes() == p.s2[:, y : y + 32, x : x + 32].tobytes()
        assert t.dfc.tobytes() == p.dfc[y : y + 32, x : x + 32].tobytes()
        assert t.location == p.location and t.meta["key"] == t.key and t.meta["tile_size"] == 32
        assert (t.meta["height"], t.meta["width"]) == (32, 32)
        assert t.meta["transform"] == [10.0, 0.0, 500000.0 + 320 * c, 0.0, -10.0, 4000000.0 - 320 * r]
        counts = np.bincount(t.dfc.ravel(), minlength=8)
        assert t.extra["cls"] == t.meta["label"] == int(counts.argmax())
        assert t.extra["multi"].tolist() == t.meta["multilabel"] == (counts / counts.sum() >= 0.1).astype(int).tolist()
    assert p.meta["transform"][2] == 500000.0 and p.key == "ROIs1_summer_1_p3"  # the pair is left alone


@pytest.mark.parametrize("size,tile", [(32, 32), (20, 32), (40, 41)])
def test_tile_pair_keeps_a_pair_no_larger_than_a_tile(size, tile):
    p = pair(size=size)
    assert tile_pair(p, tile) == [p]


def test_tile_of_zeros_refuses_the_pair():
    p = pair(size=64)
    p.s2[:, 32:, 32:] = 0
    with pytest.raises(BadInput, match="all-nodata tile"):
        tile_pair(p, 32)


@pytest.fixture
def sen12ms_tree(tmp_path):
    """The one real SEN12MS S1/S2 pair (SEN12MS-CR's S1 and cloudy S2 on the same grid)."""
    cr = realdata("sen12ms-cr")
    root = tmp_path / "raw"
    for src, dst in {
        "ROIs1868_summer_s1_19_p30.tif": "ROIs1868_summer/s1_19/ROIs1868_summer_s1_19_p30.tif",
        "ROIs1868_summer_s2_cloudy_19_p30.tif": "ROIs1868_summer/s2_19/ROIs1868_summer_s2_19_p30.tif",
    }.items():
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cr / src, root / dst)
    return root


def partition_bytes(cfg: IngestConfig) -> tuple[float, dict]:
    """Write the input as one partition in this process (no Ray); return the bytes per sample
    of the shard and its samples, decoded by stock webdataset."""
    items, _ = get_source(cfg.source).list(cfg.input)
    side = write_partition(cfg, Partition(None, 0, tuple(items)))
    assert side["bad"] == 0
    (shard,) = Path(cfg.output).rglob("*.tar")
    with tarfile.open(shard) as tar:  # plain tar, distinct keys
        assert len({m.name.split(".", 1)[0] for m in tar.getmembers()}) == side["samples"]
    samples = {s["__key__"]: s for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)
               .decode(webdataset_decoder)}
    return shard.stat().st_size / len(samples), samples


def test_real_sen12ms_in_128_px_tiles_is_under_a_quarter_mb_per_pair(sen12ms_tree, tmp_path):
    s1_path = sen12ms_tree / "ROIs1868_summer/s1_19/ROIs1868_summer_s1_19_p30.tif"
    s2_path = sen12ms_tree / "ROIs1868_summer/s2_19/ROIs1868_summer_s2_19_p30.tif"
    cfg = IngestConfig(source="sen12ms", input=str(sen12ms_tree), output=str(tmp_path / "after"), tile_size=128)
    per_sample, samples = partition_bytes(cfg)
    assert sorted(samples) == [f"ROIs1868_summer_19_p30_r{r}_c{c}" for r in range(2) for c in range(2)]
    for s in samples.values():
        meta = s["json"]
        r, c = meta["tile"]
        window = Window(128 * c, 128 * r, 128, 128)
        with rasterio.open(s1_path) as ds:
            want_s1, transform = ds.read(window=window), list(ds.window_transform(window))[:6]
        with rasterio.open(s2_path) as ds:
            want_s2 = ds.read(window=window)
        assert s["s2.blosc"].dtype == np.uint16 and s["s2.blosc"].tobytes() == want_s2.tobytes()
        assert s["s1.blosc"].dtype == np.float32 and np.abs(s["s1.blosc"] - want_s1).max() <= S1_MAX_ERROR_DB
        assert meta["transform"] == pytest.approx(transform) and (meta["height"], meta["width"]) == (128, 128)
    # each sample is one delivered 128-px pair: the bound is 0.6 MB, its goal 0.25 MB
    assert per_sample <= 0.25 * MB, per_sample

    # the format-1 encoding of the same input: 256-px samples, of which a 128-px crop is a quarter
    before = IngestConfig(source="sen12ms", input=str(sen12ms_tree), output=str(tmp_path / "before"), encoding="plain")
    per_sample_before, old = partition_bytes(before)
    (s,) = old.values()
    assert s["s1.npy"].shape == (2, 256, 256) and s["s2.npy"].shape == (13, 256, 256)
    assert per_sample_before > 2_232_320 and per_sample / per_sample_before < 0.1


@pytest.mark.slow  # ingests on a local Ray
def test_real_sen12ms_ingest_is_compact_end_to_end(sen12ms_tree, tmp_path, ray_session):
    out = tmp_path / "shards"
    m = ingest(IngestConfig(source="sen12ms", input=str(sen12ms_tree), output=str(out), tile_size=128, progress=False))
    assert m.samples == 4 and m.options["encoding"] == "compact" and m.options["tile_size"] == 128
    assert sum(s.bytes for s in m.shards) / m.samples <= 0.6 * MB
    register_webdataset_decoders()
    urls = [str(out / s.name) for s in m.shards]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(got) == 4 and all(s["s2.blosc"].shape == (13, 128, 128) for s in got)
    assert all(json.loads(json.dumps(s["json"]))["tile_size"] == 128 for s in got)
