"""ingest.stac.read: patches of a paired S1/S2 scene read from COGs built from real BigEarthNet-MM rasters.

The scene (tests/fixtures/stac_scenes.py): S2 L2A bands at 10/20/60 m in EPSG:32633 with the L2A
offset added, an SCL with a cloud block, S1 as linear power in EPSG:4326 at ~20 m with a swath
edge. Fast tests read local files; the S3 tests (slow) read through moto and a counting proxy.
"""

from __future__ import annotations

import dataclasses
import shutil
import uuid

import numpy as np
import pytest
import rasterio
from fixtures.services import make_bucket
from fixtures.stac_scenes import BurstProxy, build_scene, upload_scene
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.warp import reproject

from dsl.contracts.config import StacConfig
from ingest.gdal_env import gdal_options, is_transient, vsi_path
from ingest.raster import BadInput
from ingest.stac.read import CLOUD, S1_NODATA, PatchSkipped, SceneReader, patch_transform

TILE = 20  # 6 x 6 patches on the 120 x 120 px scene
KEEP_ALL = StacConfig(max_scl_fraction=1.0, max_nodata_fraction=1.0, retry_backoff_s=0.0)
# The S1 tolerances. Against the written S1 warped back onto the whole S2 grid in ONE reproject
# (fixture's s1_ref_db): the same bilinear kernel on the same pixels, so the per-patch WarpedVRT
# differs only by GDAL's approximate transformer (error threshold 0.125 px, measured max 0.04 dB).
# A grid off by one 10 m pixel differs by ~1 dB there. Against the ORIGINAL 10 m dB: the S1 went
# through ~20 m averaging of linear power (4 looks) and bilinear interpolation back, which
# removes 10 m speckle (measured median |diff| 0.8 dB) and raises the mean in dB a little
# (averaging power, Jensen: measured +0.3 dB); unrelated S1 differs by ~4 dB median.
S1_REF_TOL_DB = 0.1
S1_ORIG_MEDIAN_ABS_DB = 1.2
S1_ORIG_BIAS_DB = 0.6


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    return build_scene(tmp_path_factory.mktemp("stac-scene"))


def read_all(reader, scene, tile=TILE):
    """(row, col) -> Pair or the PatchSkipped of every patch."""
    rows, cols = scene.patches(tile)
    out = {}
    for r in range(rows):
        for c in range(cols):
            try:
                out[r, c] = reader.read_patch(scene, r, c, tile)
            except PatchSkipped as e:
                out[r, c] = e
    return out


def test_s2_10m_bands_exact_and_others_bilinear(scene_files):
    f = scene_files
    bands = list(f.scene.s2_assets)
    # 20 and 60 m: the expected patch is the original band warped bilinearly onto the whole 10 m grid
    expected = {}
    for band in ("B5", "B11", "B1", "B9"):
        with rasterio.open(f.scene.s2_assets[band]) as ds:
            out = np.zeros(f.shape, np.float32)
            reproject(f.s2[band].astype(np.float32), out, src_crs=ds.crs, src_transform=ds.transform, dst_crs=ds.crs,
                      dst_transform=f.transform, resampling=Resampling.bilinear)
            expected[band] = out
    with SceneReader(KEEP_ALL) as reader:
        for (r, c), p in read_all(reader, f.scene).items():
            if isinstance(p, PatchSkipped):
                assert p.reason == S1_NODATA and f.s1_nodata_fraction(TILE, r, c) == 1.0
                continue
            assert p.s2.dtype == np.uint16 and p.s2.shape == (12, TILE, TILE)
            for band in ("B2", "B3", "B4", "B8"):  # offset removed: the original L2A values, exactly
                np.testing.assert_array_equal(p.s2[bands.index(band)], f.patch(f.s2[band], TILE, r, c), err_msg=band)
            for band, full in expected.items():  # within rounding to DN
                diff = np.abs(p.s2[bands.index(band)] - f.patch(full, TILE, r, c))
                assert diff.max() <= 0.51, (band, r, c, diff.max())


def test_offset_clipped_at_zero(scene_files):
    f = scene_files
    scene = dataclasses.replace(f.scene, s2_offset=-5000)  # as if the files carried a larger offset
    with SceneReader(KEEP_ALL) as reader:
        p = reader.read_patch(scene, 2, 2, TILE)
    b2 = f.patch(f.s2["B2"], TILE, 2, 2).astype(np.int64)
    assert (b2 + 1000 < 5000).any()  # some pixels do clip
    np.testing.assert_array_equal(p.s2[1], np.clip(b2 + 1000 - 5000, 0, None))


def test_s1_matches_the_original_db_on_the_s2_grid(scene_files):
    f = scene_files
    diffs = []
    with SceneReader(StacConfig(max_scl_fraction=1.0)) as reader:
        kept = {k: p for k, p in read_all(reader, f.scene).items() if not isinstance(p, PatchSkipped)}
    assert len(kept) >= 25
    for (r, c), p in kept.items():
        assert p.s1.dtype == np.float32 and p.s1.shape == (2, TILE, TILE) and np.isfinite(p.s1).all()
        ref = f.patch(f.s1_ref_db, TILE, r, c)
        assert np.abs(p.s1 - ref).max() < S1_REF_TOL_DB, (r, c, np.abs(p.s1 - ref).max())
        diffs.append(p.s1 - f.patch(f.s1_db, TILE, r, c))
    d = np.concatenate([x.ravel() for x in diffs])
    assert np.median(np.abs(d)) < S1_ORIG_MEDIAN_ABS_DB
    assert abs(np.median(d)) < S1_ORIG_BIAS_DB


def test_cloudy_patches_are_skipped(scene_files):
    f = scene_files
    cloudy = f.cloudy(TILE, 0.05)
    assert cloudy == {(0, 0), (0, 1), (1, 0), (1, 1)}  # the fixture's cloud block
    with SceneReader(StacConfig(max_nodata_fraction=1.0)) as reader:
        results = read_all(reader, f.scene)
    for key, p in results.items():
        if key in cloudy:
            assert isinstance(p, PatchSkipped) and p.reason == CLOUD, key
        else:
            assert not isinstance(p, PatchSkipped) or p.reason != CLOUD, key
            assert p.meta["scl_fraction"] == f.scl_fraction(TILE, *key) if not isinstance(p, PatchSkipped) else True
    # a looser threshold keeps the half-cloudy patches, not the fully cloudy one
    with SceneReader(StacConfig(max_scl_fraction=0.6, max_nodata_fraction=1.0)) as reader:
        assert reader.read_patch(f.scene, 0, 1, TILE).meta["scl_fraction"] == 0.5
        with pytest.raises(PatchSkipped, match="cloud"):
            reader.read_patch(f.scene, 0, 0, TILE)


def test_s1_nodata_over_the_threshold_is_skipped_else_filled(scene_files):
    f = scene_files
    assert 0.5 < f.s1_nodata_fraction(TILE, 4, 5) < 0.7  # the swath edge crosses this patch
    with SceneReader(StacConfig()) as reader, pytest.raises(PatchSkipped) as e:
        reader.read_patch(f.scene, 4, 5, TILE)
    assert e.value.reason == S1_NODATA
    with SceneReader(StacConfig(max_nodata_fraction=0.7)) as reader:
        p = reader.read_patch(f.scene, 4, 5, TILE)
        with pytest.raises(PatchSkipped, match=S1_NODATA):
            reader.read_patch(f.scene, 5, 5, TILE)  # wholly outside the footprint
    assert np.isfinite(p.s1).all()
    outside = np.isnan(f.patch(f.s1_ref_db, TILE, 4, 5)[0])
    for band in range(2):  # filled with the patch's median dB
        values = p.s1[band]
        np.testing.assert_allclose(values[outside], np.median(values[~outside]), atol=1e-6)


def test_units_declared_wrong_are_refused(scene_files):
    f = scene_files
    as_db = dataclasses.replace(f.scene, s1_units="db")  # linear power declared dB
    with SceneReader(KEEP_ALL) as reader:
        with pytest.raises(BadInput, match="linear power") as e:
            reader.read_patch(as_db, 2, 2, TILE)
        assert e.value.file == f.scene.s1_assets["VV"]
        db_as_linear = dataclasses.replace(f.scene, s1_assets=f.s1_db_assets)  # dB declared linear
        with pytest.raises(BadInput, match="negative values") as e:
            reader.read_patch(db_as_linear, 2, 2, TILE)
        assert e.value.file == f.s1_db_assets["VV"]
        # correctly declared dB reads as the linear file does, but for interpolating dB instead of
        # power (bilinear in dB gives the geometric, not the arithmetic mean: up to ~1 dB apart)
        right = reader.read_patch(dataclasses.replace(f.scene, s1_assets=f.s1_db_assets, s1_units="db"), 2, 2, TILE)
        assert np.median(np.abs(right.s1 - reader.read_patch(f.scene, 2, 2, TILE).s1)) < 0.2


def test_pair_key_location_and_meta(scene_files):
    s = scene_files.scene
    with SceneReader(KEEP_ALL) as reader:
        p = reader.read_patch(s, 3, 2, TILE)
    assert p.key == f"{s.s2_id}_r3_c2" and p.location == "33UUP_r3_c2"
    m = p.meta
    assert m["transform"] == list(patch_transform(s, 3, 2, TILE))[:6]
    assert m["transform"][2] == s.transform[2] + 2 * TILE * 10 and m["transform"][5] == s.transform[5] - 3 * TILE * 10
    assert (m["crs"], m["height"], m["width"], m["tile"], m["tile_size"]) == ("EPSG:32633", TILE, TILE, [3, 2], TILE)
    assert m["s1_bands"] == ["VV", "VH"] and m["s2_bands"] == list(s.s2_assets)
    assert (m["s2_id"], m["s1_id"], m["s2_offset"], m["s1_units"], m["gap_days"]) == (
        s.s2_id, s.s1_id, -1000, "linear", s.gap_days)
    assert m["s1_file"].split() == [s.s1_assets["VV"], s.s1_assets["VH"]]
    assert m["s2_file"].split() == list(s.s2_assets.values())
    with SceneReader(KEEP_ALL) as reader, pytest.raises(ValueError, match="outside scene"):
        reader.read_patch(s, 6, 0, TILE)


def test_each_dataset_opened_once_per_reader(scene_files):
    s = scene_files.scene
    reader = SceneReader(KEEP_ALL)
    with reader:
        read_all(reader, s)
        hrefs = {*s.s2_assets.values(), s.scl, *s.s1_assets.values()}
        assert dict(reader.opens) == dict.fromkeys(hrefs, 1)
        datasets = [ds for ds, _ in reader.rasters._open.values()]
    assert datasets and all(ds.closed for ds in datasets) and not reader.rasters._open


def test_unreadable_asset_is_bad_input_naming_it_and_the_reader_goes_on(scene_files, tmp_path):
    f = scene_files
    broken = tmp_path / "B05.tif"
    shutil.copy(f.scene.s2_assets["B5"], broken)
    with open(broken, "r+b") as fh:  # header intact, blocks cut off
        fh.truncate(broken.stat().st_size // 3)
    bad = dataclasses.replace(f.scene, s2_assets={**f.scene.s2_assets, "B5": str(broken)})
    missing = dataclasses.replace(f.scene, s2_assets={**f.scene.s2_assets, "B6": str(tmp_path / "nope.tif")})
    with SceneReader(KEEP_ALL) as reader:
        with pytest.raises(BadInput) as e:
            reader.read_patch(bad, 5, 0, TILE)
        assert e.value.file == str(broken) and "unreadable" in e.value.reason
        with pytest.raises(BadInput, match="file not found") as e:
            reader.read_patch(missing, 2, 2, TILE)
        assert e.value.file == str(tmp_path / "nope.tif")
        assert reader.read_patch(f.scene, 2, 2, TILE).s2.shape == (12, TILE, TILE)  # the next patch reads


def test_transient_errors_are_retried_with_backoff_then_bad_input(monkeypatch):
    import ingest.raster

    # a local file stands in for a remote asset (the real S3 path is tested below, slow): only
    # remote reads are retried, so this one is read as if remote
    monkeypatch.setattr(ingest.raster, "is_local", lambda url: False)
    monkeypatch.setattr(ingest.raster, "is_remote", lambda url: True)
    monkeypatch.setattr(ingest.raster, "vsi_path", lambda url: url)
    waits = []
    reader = SceneReader(StacConfig(retries=3, retry_backoff_s=0.5), sleep=waits.append)
    calls = []

    def flaky(_ds):
        calls.append(1)
        if len(calls) < 3:
            raise RasterioIOError("HTTP response code: 503")
        return np.zeros(1)

    href = str(build_scene_band())
    assert reader._read(href, flaky).shape == (1,)
    assert waits == [0.5, 1.0] and reader.retried[href] == 2 and reader.opens[href] == 3

    def always(_ds):
        raise RasterioIOError("Please reduce your request rate.")

    waits.clear()
    with pytest.raises(BadInput, match="persisted after 3 retries"):
        reader._read(href, always)
    assert waits == [0.5, 1.0, 2.0]

    def permanent(_ds):
        raise RasterioIOError("not recognized as a supported file format")

    waits.clear()
    with pytest.raises(BadInput, match="unreadable"):
        reader._read(href, permanent)
    assert waits == []
    reader.close()


def build_scene_band():
    """A small real GeoTIFF to open (the S2 B02 of the BigEarthNet pair)."""
    from fixtures.services import realdata
    from fixtures.stac_scenes import S2_PATCH

    return realdata("bigearthnet-mm", "BigEarthNet-S2-Example", S2_PATCH, f"{S2_PATCH}_B02.tif")


@pytest.mark.parametrize(("message", "href", "transient"), [
    ("HTTP response code: 503", "s3://b/k.tif", True),
    ("HTTP response code: 429", "https://h/k.tif", True),
    ("Please reduce your request rate.", "s3://b/k.tif", True),
    ("Operation timed out after 30000 milliseconds", "s3://b/k.tif", True),
    ("Connection reset by peer", "s3://b/k.tif", True),
    ("TIFFFillTile:Read error at row 1, col 1, tile 5; got 0 bytes, expected 5410", "s3://b/k.tif", True),
    ("TIFFFillTile:Read error at row 1, col 1, tile 5; got 0 bytes, expected 5410", "/data/k.tif", False),
    ("HTTP response code: 403", "s3://b/k.tif", False),
    ("HTTP response code: 404", "https://h/k.tif", False),
    ("not recognized as a supported file format", "s3://b/k.tif", False),
])
def test_transient_classification(message, href, transient):
    assert is_transient(RasterioIOError(message), href) is transient


def test_vsi_paths_and_gdal_options(monkeypatch):
    assert vsi_path("s3://bucket/a/b.tif") == "/vsis3/bucket/a/b.tif"
    assert vsi_path("https://h.net/a.tif?sig=1") == "/vsicurl/https://h.net/a.tif?sig=1"
    assert vsi_path("file:///data/a.tif") == "/data/a.tif" and vsi_path("/data/a.tif") == "/data/a.tif"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    o = gdal_options(retries=4, retry_backoff_s=0.5)
    assert (o["AWS_S3_ENDPOINT"], o["AWS_HTTPS"], o["AWS_VIRTUAL_HOSTING"]) == ("127.0.0.1:9000", "NO", "FALSE")
    assert (o["GDAL_HTTP_MAX_RETRY"], o["GDAL_HTTP_RETRY_DELAY"]) == ("4", "0.5")
    assert o["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR" and o["GDAL_HTTP_MERGE_CONSECUTIVE_RANGES"] == "YES"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.example:9443")
    o = gdal_options(retries=0, retry_backoff_s=1)
    assert (o["AWS_S3_ENDPOINT"], o["AWS_HTTPS"]) == ("minio.example:9443", "YES")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert "AWS_S3_ENDPOINT" not in gdal_options(retries=0, retry_backoff_s=1)


# -- S3 (moto), through a counting and fault-injecting proxy ---------------------------------

@pytest.fixture(scope="module")
def big_scene(tmp_path_factory):
    """The real patch mirrored 8 x 8 (960 x 960 px), 64 px blocks: a patch is a small part of a file."""
    return build_scene(tmp_path_factory.mktemp("stac-big"), repeat=8, block=64)


@pytest.fixture
def s3_scene(s3_server, big_scene, monkeypatch):
    """(local scene files, the scene on S3, the proxy every S3 request of the reader goes through)."""
    scene = upload_scene(big_scene, make_bucket("stac-read"), uuid.uuid4().hex)  # fresh keys: GDAL caches per URL
    with BurstProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield big_scene, scene, proxy


@pytest.mark.slow
def test_s3_patch_reads_a_small_fraction_of_the_files(s3_scene):
    f, scene, proxy = s3_scene
    with SceneReader(KEEP_ALL) as reader:
        p = reader.read_patch(scene, 3, 3, 120)
        first = proxy.get_bytes
        proxy.reset_counters()
        reader.read_patch(scene, 3, 4, 120)
        second = proxy.get_bytes
        assert max(reader.opens.values()) == 1 and len(reader.opens) == 15
    with SceneReader(KEEP_ALL) as local:
        q = local.read_patch(f.scene, 3, 3, 120)
    np.testing.assert_array_equal(p.s2, q.s2)
    np.testing.assert_array_equal(p.s1, q.s1)
    # measured: 8.3 % of 10.5 MB for the first patch (headers of 15 files + 3 x 3 blocks of 64 px
    # each), 2.2 % for the next one; the patch is 1/64 of the scene's area
    assert first / f.nbytes < 0.12, (first, f.nbytes)
    assert second / f.nbytes < 0.04, (second, f.nbytes)


@pytest.mark.slow
def test_s3_503_burst_is_retried_and_the_read_succeeds(s3_scene):
    f, scene, proxy = s3_scene
    with SceneReader(StacConfig(max_scl_fraction=1.0, max_nodata_fraction=1.0, retries=2,
                                retry_backoff_s=0.01)) as reader:
        proxy.burst(6)  # more than GDAL's 2 retries of one request: the reader's own retry is needed too
        p = reader.read_patch(scene, 2, 5, 120)
        assert proxy.kinds["503"] == 6
        assert reader.retried[scene.scl] >= 1  # GDAL's retries ran out on the first file read
    with SceneReader(KEEP_ALL) as local:
        q = local.read_patch(f.scene, 2, 5, 120)
    np.testing.assert_array_equal(p.s2, q.s2)
    np.testing.assert_array_equal(p.s1, q.s1)


@pytest.mark.slow
def test_s3_persistent_503_is_bad_input_after_retries(s3_scene):
    _, scene, proxy = s3_scene
    proxy.fail_paths = {"/" + scene.scl[len("s3://"):]}
    with SceneReader(StacConfig(retries=1, retry_backoff_s=0.01)) as reader:
        with pytest.raises(BadInput) as e:
            reader.read_patch(scene, 1, 1, 120)
        assert e.value.file == scene.scl and "persisted after 1 retries" in e.value.reason
        proxy.fail_paths = set()
        reader.read_patch(scene, 4, 4, 120)  # the store recovered: the next patch reads
