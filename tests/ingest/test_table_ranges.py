"""The table source reads remote rasters by byte ranges, opens each once per partition, retries 503s.

The rasters are the real SEN12MS-CR pair (S1 dB + cloudy S2 L1C, 256 x 256 px, EPSG:32631)
mirrored 2 x 2 into 512 x 512 px (odd copies flipped: continuous seams, every pixel real),
written as COGs with 64 px blocks and cut into 128 px tiles (16 per pair). Fast tests read local
files and fsspec's in-memory store; the S3 tests (slow) read from moto's S3 through
:class:`BurstProxy`, which counts the bytes it serves and injects 503 answers.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import rasterio
from fixtures.services import make_bucket, realdata
from fixtures.stac_scenes import BurstProxy
from rasterio.windows import Window

from dsl.contracts.config import IngestConfig
from ingest.raster import BadInput, OpenRasters, RetryPolicy
from ingest.run import Partition, write_partition
from ingest.sources.table import PairTableSource

S1_FILE, S2_FILE = "ROIs1868_summer_s1_19_p30.tif", "ROIs1868_summer_s2_cloudy_19_p30.tif"
TILE, BLOCK, REPEAT = 128, 64, 2
FAST = RetryPolicy(retries=2, backoff_s=0.01, gdal_retries=1)


def _mirror(a: np.ndarray, repeat: int) -> np.ndarray:
    rows = [np.concatenate([a[:, ::(-1 if i % 2 else 1), ::(-1 if j % 2 else 1)] for j in range(repeat)], axis=-1)
            for i in range(repeat)]
    return np.ascontiguousarray(np.concatenate(rows, axis=-2))


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """sensor -> (the COG written, its pixels [bands, 512, 512])."""
    root = tmp_path_factory.mktemp("table-ranges")
    out = {}
    for sensor, name in (("s1", S1_FILE), ("s2", S2_FILE)):
        with rasterio.open(realdata("sen12ms-cr", name)) as ds:
            data, crs, transform = _mirror(ds.read(), REPEAT), ds.crs, ds.transform
        path = root / f"{sensor}.tif"
        with rasterio.open(path, "w", driver="COG", count=data.shape[0], height=data.shape[1], width=data.shape[2],
                           dtype=data.dtype.name, crs=crs, transform=transform, blocksize=BLOCK,
                           compress="deflate") as dst:
            dst.write(data)
        out[sensor] = (path, data)
    return out


def _count_opens(monkeypatch) -> Counter:
    """Count rasterio.open calls by path: a spy (it calls the real open), independent of OpenRasters' counter."""
    opens: Counter[str] = Counter()
    real = rasterio.open

    def spy(path, *args, **kwargs):
        opens[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(rasterio, "open", spy)
    return opens


def _table(path: Path, rows: list[tuple[str, str, str]]) -> str:
    pd.DataFrame(rows, columns=["id", "s1", "s2"]).to_csv(path, index=False)
    return str(path)


def _read_all(source: PairTableSource, table: str) -> dict:
    items, bad = source.list(table)
    assert not bad
    return {p.key: p for item in items for p in source.read(item)}


def _assert_tiles(pairs: dict, key: str, pair_files) -> None:
    s1, s2 = pair_files["s1"][1], pair_files["s2"][1]
    n = s1.shape[1] // TILE
    assert sorted(k for k in pairs if k.startswith(key + "_")) == sorted(
        f"{key}_r{r}_c{c}" for r in range(n) for c in range(n))
    for r in range(n):
        for c in range(n):
            p = pairs[f"{key}_r{r}_c{c}"]
            window = np.s_[:, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            np.testing.assert_array_equal(p.s1, s1[window])
            np.testing.assert_array_equal(p.s2, s2[window])


# -- fast: local files and fsspec's in-memory store ---------------------------------------------

def test_local_rasters_are_opened_once_for_all_tiles_and_items(pair_files, tmp_path, monkeypatch):
    s1, s2 = (str(pair_files[s][0]) for s in ("s1", "s2"))
    opened = _count_opens(monkeypatch)
    # two rows on the same rasters: the second item reuses the open datasets
    table = _table(tmp_path / "pairs.csv", [("a", s1, s2), ("b", s1, s2)])
    source = PairTableSource(TILE)
    pairs = _read_all(source, table)
    assert len(pairs) == 2 * 16
    _assert_tiles(pairs, "a", pair_files)
    _assert_tiles(pairs, "b", pair_files)
    assert source.rasters.opens == opened == {s1: 1, s2: 1}
    source.close()
    next(source.read(source.list(table)[0][0]))  # after close, a read opens the files again
    assert source.rasters.opens == {s1: 2, s2: 2}
    source.close()


def test_least_recently_used_dataset_is_closed_past_max_open(pair_files):
    s1, s2 = (str(pair_files[s][0]) for s in ("s1", "s2"))
    with OpenRasters(max_open=1) as rasters:
        for url in (s1, s1, s2, s1):
            rasters.header(url)
        assert rasters.opens == {s1: 2, s2: 1}


def test_fsspec_only_scheme_is_downloaded_once_per_partition(pair_files, tmp_path):
    fs = fsspec.filesystem("memory")
    base = f"/table-ranges-{uuid.uuid4().hex}"
    try:
        for sensor in ("s1", "s2"):
            fs.pipe(f"{base}/{sensor}.tif", pair_files[sensor][0].read_bytes())
        s1, s2 = f"memory://{base}/s1.tif", f"memory://{base}/s2.tif"
        source = PairTableSource(TILE)
        pairs = _read_all(source, _table(tmp_path / "pairs.csv", [("m", s1, s2)]))
        source.close()
        _assert_tiles(pairs, "m", pair_files)
        assert source.rasters.opens == {s1: 1, s2: 1}  # was one download per tile and sensor
        with pytest.raises(BadInput) as e:
            OpenRasters().read(f"memory://{base}/missing.tif")
        assert e.value.file.endswith("missing.tif") and e.value.reason == "file not found"
    finally:
        fs.rm(base, recursive=True)


def test_local_errors_read_as_before(pair_files, tmp_path):
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(pair_files["s2"][0].read_bytes()[:20_000])  # header and a few blocks
    missing = str(tmp_path / "missing.tif")
    sleeps: list[float] = []
    with OpenRasters(sleep=sleeps.append) as rasters:
        with pytest.raises(BadInput) as e:
            rasters.header(missing)
        assert e.value.file == missing and e.value.reason.startswith("unreadable raster header (")
        assert rasters.shape(str(truncated))[:3] == (13, 512, 512)
        with pytest.raises(BadInput) as e:
            rasters.read(str(truncated))
        assert e.value.reason.startswith("unreadable or truncated raster (")
    assert sleeps == []  # local errors are never retried


# -- slow: moto's S3 behind the counting, fault-injecting proxy ---------------------------------

@pytest.fixture
def s3_pair(s3_server, pair_files, monkeypatch):
    """(s3 URL of the S1 COG, of the S2 COG, the proxy every later S3 request goes through)."""
    bucket = make_bucket("table-ranges")
    prefix = f"{bucket}/{uuid.uuid4().hex}"  # fresh keys: GDAL caches what it read of a URL per process
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    urls = []
    for sensor in ("s1", "s2"):
        fs.put_file(str(pair_files[sensor][0]), f"{prefix}/{sensor}.tif")
        urls.append(f"{prefix}/{sensor}.tif")
    with BurstProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield urls[0], urls[1], proxy


@pytest.mark.slow
def test_s3_tiles_fetch_about_the_files_bytes_once(s3_pair, pair_files, tmp_path, monkeypatch):
    s1, s2, proxy = s3_pair
    size = sum(pair_files[s][0].stat().st_size for s in ("s1", "s2"))
    with OpenRasters(FAST) as rasters:  # one tile: the header and that tile's blocks, not the files
        rasters.read(s2, window=Window(0, 0, TILE, TILE))
    one_tile = proxy.get_bytes / pair_files["s2"][0].stat().st_size
    opened = _count_opens(monkeypatch)
    source = PairTableSource(TILE, retry=FAST)
    pairs = _read_all(source, _table(tmp_path / "pairs.csv", [("a", s1, s2), ("b", s1, s2)]))
    source.close()
    _assert_tiles(pairs, "a", pair_files)
    _assert_tiles(pairs, "b", pair_files)
    # one open per raster for the partition, both rows together
    assert source.rasters.opens == {s1: 1, s2: 1}
    assert opened == {"/vsis3/" + s1[len("s3://"):]: 1, "/vsis3/" + s2[len("s3://"):]: 1}
    ratio = proxy.get_bytes / size
    # measured: 0.027 of the S2 file for one tile (1/16 of its area); 0.72 of both files for that
    # tile and then all tiles of both rows (every full-resolution block once; the overviews, ~1/4
    # of a COG, are never fetched). The whole-file reads this replaces fetched 34.0 x the files
    # for the two rows (17 x per row: the header, then the whole file once per tile).
    assert one_tile < 0.1, one_tile
    assert 0.5 < ratio < 1.2, (proxy.get_bytes, size)


@pytest.mark.slow
def test_s3_503_burst_is_retried_and_pairs_equal_a_local_read(s3_pair, pair_files, tmp_path):
    s1, s2, proxy = s3_pair
    sleeps: list[float] = []
    source = PairTableSource(TILE, retry=FAST, sleep=sleeps.append)
    items, _ = source.list(_table(tmp_path / "pairs.csv", [("a", s1, s2)]))
    proxy.burst(4)  # more than GDAL's 1 retry of a request: the reader's own retries are needed too
    pairs = {p.key: p for p in source.read(items[0])}
    source.close()
    assert proxy.kinds["503"] == 4
    assert sum(source.rasters.retried.values()) == len(sleeps) >= 2
    assert sleeps == [FAST.backoff_s * 2**i for i in range(len(sleeps))]  # exponential backoff
    local = PairTableSource(TILE)
    want = _read_all(local, _table(tmp_path / "local.csv", [("a", str(pair_files["s1"][0]), str(pair_files["s2"][0]))]))
    local.close()
    assert sorted(pairs) == sorted(want)
    for key, p in want.items():
        np.testing.assert_array_equal(pairs[key].s1, p.s1)
        np.testing.assert_array_equal(pairs[key].s2, p.s2)
        assert pairs[key].meta["transform"] == p.meta["transform"] and pairs[key].meta["crs"] == p.meta["crs"]


@pytest.mark.slow
def test_s3_persistent_503_is_one_quarantine_line_naming_the_file(s3_pair, tmp_path, monkeypatch):
    s1, s2, proxy = s3_pair
    missing = s2.rsplit("/", 1)[0] + "/missing.tif"
    monkeypatch.setattr("ingest.raster.RETRY", FAST)  # write_partition builds the source with the defaults
    # the good row's S2 is the same object under another key: only the "bad" row's path fails
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.copy(s2, s2.replace("s2.tif", "s2_copy.tif"))
    table = _table(tmp_path / "pairs.csv", [("good", s1, s2.replace("s2.tif", "s2_copy.tif")), ("bad", s1, s2),
                                            ("gone", s1, missing)])
    proxy.fail_paths = {"/" + s2[len("s3://"):]}
    cfg = IngestConfig(source="table", input=table, output=str(tmp_path / "out"), tile_size=TILE, progress=False)
    items, _ = PairTableSource(TILE).list(table)
    result = write_partition(cfg, Partition(split=None, index=0, items=tuple(items)))
    assert result["samples"] == 16 and result["bad"] == 2
    (sidecar,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_parts").glob("*.json")]
    bad = {b["key"]: b for b in sidecar["bad"]}
    assert bad["bad"]["file"] == s2
    assert bad["bad"]["reason"].startswith(f"transient error persisted after {FAST.retries} retries (")
    assert bad["gone"] == {"key": "gone", "file": missing, "reason": "file not found"}
    assert all(k.startswith("good_") for k in sidecar["keys"])
