"""``dsl ingest --source stac`` end to end: a real STAC API, scene COGs on S3, shards the loader reads.

The STAC API is rustac's server on 127.0.0.1 (tests/fixtures/stac_server.py), searched with
pystac-client; the S2 L2A scene and its S1 scene are COGs on moto's S3 made from the real
BigEarthNet-MM pair (tests/fixtures/stac_scenes.py: S2 with the baseline-04.00 offset added and
a cloud block in its SCL, S1 reprojected to EPSG:4326 at ~20 m as linear power with a nodata
corner). The ingest runs its partitions as Ray tasks that read the COGs through GDAL's /vsis3/.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.services import make_bucket
from fixtures.shards import cfg_for
from fixtures.stac_scenes import build_scene, upload_scene
from fixtures.stac_server import s1_item, s2_item
from rasterio.warp import transform_bounds

from dsl.cli import main as cli
from dsl.contracts.manifest import read_manifest
from dsl.contracts.shard_format import S2_L2A_BANDS
from dsl.data.pairs import make_loader

pytestmark = pytest.mark.slow  # a STAC server, moto S3 and a local Ray

TILE = 24  # 120 px scene: 5 x 5 patches
ASSET = {b: b if len(b) == 3 else f"B0{b[1]}" for b in S2_L2A_BANDS}  # B2 -> "B02" (PC asset keys)


def items_for(scene, files) -> list[dict]:
    """The S2 item of the scene, its S1 item (same day) and a decoy S1 three days later."""
    s1_bbox = transform_bounds(files.s1_crs, "EPSG:4326", *_bounds(files.s1_transform, files.s1_shape))
    s2 = s2_item("S2A_MSIL2A_20170613T101031_R022_T33UUP", "2017-06-13T10:10:31Z", epsg=32633,
                 transform=tuple(files.transform)[:6], shape=files.shape, cloud_cover=20.0,
                 processing_baseline="04.00", mgrs="33UUP",
                 assets={**{ASSET[b]: h for b, h in scene.s2_assets.items()}, "SCL": scene.scl})
    s1 = s1_item("S1A_IW_GRDH_1SDV_20170613T165043", "2017-06-13T16:50:43Z", bbox=s1_bbox,
                 assets={"vv": scene.s1_assets["VV"], "vh": scene.s1_assets["VH"]}, collection_id="sentinel-1-grd")
    decoy = s1_item("S1B_IW_GRDH_1SDV_20170616T165000", "2017-06-16T16:50:00Z", bbox=s1_bbox,
                    assets={"vv": "s3://nowhere/vv.tif", "vh": "s3://nowhere/vh.tif"}, collection_id="sentinel-1-grd")
    return [s2, s1, decoy]


def _bounds(transform, shape) -> tuple[float, float, float, float]:
    h, w = shape
    x0, y0 = transform.c, transform.f
    x1, y1 = x0 + transform.a * w, y0 + transform.e * h
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def ingested(tmp_path, stac_api, capsys, bucket_name: str, *options: str):
    """The scene's COGs on S3, its items in a STAC API, ``dsl ingest --source stac`` run on them.

    ``options``: flags first, then ``key=value`` overrides (argparse reads them in that order).
    """
    files = build_scene(tmp_path / "scene", block=32)
    bucket = make_bucket(bucket_name)
    scene = upload_scene(files, bucket, "archive")
    url = stac_api(items_for(scene, files))
    out = f"{bucket}/shards"
    rc = cli(["ingest", "--source", "stac", "--input", url, "--output", out, "--tile-size", str(TILE),
              "--no-progress", *options, "ingest.stac.s1_collection=sentinel-1-grd", "ingest.stac.block_patches=2"])
    assert rc == 0, capsys.readouterr().err
    return files, out


def test_search_pair_ingest_and_read(tmp_path, ray_session, stac_api, capsys):
    files, out = ingested(tmp_path, stac_api, capsys, "dsl-stac", "--workers", "2", "--shard-size-mb", "0.05",
                          "ingest.stac.datetime=2017-06-01/2017-06-30")

    m = read_manifest(out)
    cloudy = files.cloudy(TILE, 0.05)
    no_s1 = {(r, c) for r in range(5) for c in range(5) if files.s1_nodata_fraction(TILE, r, c) > 0} - cloudy
    kept = {(r, c) for r in range(5) for c in range(5)} - cloudy - no_s1
    assert cloudy and no_s1 and kept  # the scene exercises every path
    assert m.samples == len(kept) and m.bad == 0
    assert m.skipped == {"cloud": len(cloudy), "s1_nodata": len(no_s1)}
    assert m.listing["scenes"] == 1 and m.listing["patches"] == 25 and m.listing["paired"] == 1
    assert m.listing["blocks"] == 9  # 5 x 5 patches in blocks of at most 2 x 2
    assert m.bands.s2 == list(S2_L2A_BANDS) and len(m.shards) > 1  # the scene's patches spread over shards

    # the loader reads every kept patch of the scene
    batches = list(make_loader(cfg_for(out, batch_size=1, crop_size=TILE), 0, 1, train=False))
    key = "S2A_MSIL2A_20170613T101031_R022_T33UUP"
    assert sorted(k for b in batches for k in b["key"]) == sorted(f"{key}_r{r}_c{c}" for r, c in kept)
    # each with both items, their times and the gap
    samples = list(read_samples(out))
    assert {tuple(x["json"]["tile"]) for x in samples} == kept
    for x in samples:
        meta = x["json"]
        assert meta["s2_id"] == key and meta["location"] == f"33UUP_r{meta['tile'][0]}_c{meta['tile'][1]}"
        assert meta["s1_id"] == "S1A_IW_GRDH_1SDV_20170613T165043"  # same day, not the decoy
        assert meta["s2_datetime"].startswith("2017-06-13T10:10:31")
        assert meta["s1_datetime"].startswith("2017-06-13T16:50:43")
        assert meta["gap_days"] == pytest.approx(0.277, abs=0.01)
        assert meta["s2_offset"] == -1000


def read_samples(out: str):
    """Every sample of the dataset at ``out``, decoded by stock webdataset."""
    import webdataset as wds

    from dsl.contracts.shard_format import register_webdataset_decoders
    from dsl.contracts.storage import register_webdataset_handlers

    register_webdataset_handlers()
    register_webdataset_decoders()
    m = read_manifest(out)
    yield from wds.WebDataset([f"{out}/{s.name}" for s in m.shards], shardshuffle=False, empty_check=False).decode()


def test_the_shards_hold_the_original_values(tmp_path, ray_session, stac_api, capsys):
    files, out = ingested(tmp_path, stac_api, capsys, "dsl-stac-values", "--workers", "1", "ingest.encoding=plain")
    checked = 0
    for sample in read_samples(out):
        r, c = sample["json"]["tile"]
        s2 = sample["s2.npy"]
        # 10 m bands: exactly the original L2A digital numbers (offset added in the archive, removed here)
        for band in ("B2", "B3", "B4", "B8"):
            i = S2_L2A_BANDS.index(band)
            assert np.array_equal(s2[i], files.patch(files.s2[band], TILE, r, c)), (band, r, c)
        # S1: the linear 4326 scene warped onto the patch grid and converted to dB matches one
        # bilinear warp of the whole scene (the reference) within 0.1 dB
        ref = files.patch(files.s1_ref_db, TILE, r, c)
        assert np.nanmax(np.abs(sample["s1.npy"] - ref)) < 0.1, (r, c)
        checked += 1
    assert checked == read_manifest(out).samples > 0
