"""STAC listing (ingest/stac/search.py): filters, pairing into Scenes, the radiometric offset rule,
refused items, the s1_units refusal, and one answer from a STAC API (a real ``rustac serve``), a
stac-geoparquet table and a static catalogue holding the same items."""

from __future__ import annotations

import json

import pytest
from fixtures.stac_server import (
    s1_item,
    s2_item,
    write_catalog,
    write_geoparquet,
)

from dsl.contracts.config import StacConfig
from dsl.contracts.errors import UserError
from dsl.contracts.shard_format import S2_L2A_BANDS
from ingest.stac.scene import Scene
from ingest.stac.search import input_kind, parse_interval, search_params, search_scenes

# Germany: the default s2_item grid (32UPU, about 10.4-12.1 E, 51.3-52.3 N); Spain far away
AREA = (10.5, 51.4, 11.0, 51.8)
SPAIN = (-4.0, 40.0, -3.0, 41.0)
S1_BOX = (10.0, 51.0, 13.0, 53.0)


def scenario() -> list[dict]:
    """S2/S1 items where each filter and each refusal matters (datetimes to the second: a
    stac-geoparquet table keeps milliseconds)."""
    return [
        s2_item("S2A_T32UPU_20200601", "2020-06-01T10:20:31Z", assets="s3://b/a", cloud_cover=5),
        s2_item("S2B_T32UPU_20200611", "2020-06-11T10:20:31Z", cloud_cover=80),  # cloudy
        s2_item("S2A_T32UPU_20200720", "2020-07-20T10:20:31Z"),  # after the interval
        s2_item("S2A_T32UPU_20200527", "2020-05-27T10:20:31Z"),  # before it (S1 of 05-30 is near)
        s2_item("S2A_T30TVK_20200601", "2020-06-01T11:00:00Z", bbox=SPAIN, epsg=32630, mgrs="30TVK"),  # away
        s2_item("S2B_T32UPU_20200621.v2", "2020-06-21T10:20:31Z", processing_baseline="04.00"),
        s2_item("S2A_T32UPU_20200629", "2020-06-29T10:20:31Z"),  # no S1 within 6 days
        s2_item("S2A_T32UPU_20200603", "2020-06-03T10:20:31Z", drop=("B05",)),  # refused
        s1_item("S1A_IW_20200602", "2020-06-02T05:30:00Z", bbox=S1_BOX, assets="s3://b/s1a"),
        s1_item("S1B_IW_20200530", "2020-05-30T05:30:00Z", bbox=S1_BOX),  # further in time
        s1_item("S1A_IW_20200620", "2020-06-20T17:10:00Z", bbox=S1_BOX, orbit_state="ascending"),
        s1_item("S1A_IW_20200624_novh", "2020-06-24T05:30:00Z", bbox=S1_BOX, drop=("vh",)),  # refused
        s1_item("S1A_IW_20200601_spain", "2020-06-01T06:00:00Z", bbox=SPAIN),  # not near the S2s found
    ]


def config(**kw) -> StacConfig:
    base = {"bbox": AREA, "datetime": "2020-06-01/2020-06-30", "max_cloud_cover": 50, "retries": 0}
    return StacConfig(**{**base, **kw})


def check_scenario(scenes: list[Scene], bad, counts) -> None:
    assert [(s.s2_id, s.s1_id) for s in scenes] == [
        ("S2A_T32UPU_20200601", "S1A_IW_20200602"),
        ("S2B_T32UPU_20200621_v2", "S1A_IW_20200620"),
    ]
    first, second = scenes
    assert list(first.s2_assets) == list(S2_L2A_BANDS)
    assert first.s2_assets["B8A"] == "s3://b/a/B8A.tif" and first.s2_assets["B1"] == "s3://b/a/B01.tif"
    assert first.scl == "s3://b/a/SCL.tif"
    assert first.s1_assets == {"VV": "s3://b/s1a/vv.tif", "VH": "s3://b/s1a/vh.tif"}
    assert first.crs == "EPSG:32632" and first.shape == (10980, 10980)
    assert first.transform == (10.0, 0.0, 600000.0, 0.0, -10.0, 5800020.0)
    assert first.grid == "32UPU" and first.s1_units == "linear" and first.s1_collection == "sentinel-1-rtc"
    assert first.s2_datetime == "2020-06-01T10:20:31Z" and first.s1_datetime == "2020-06-02T05:30:00Z"
    assert first.gap_days == pytest.approx((19 * 3600 + 9 * 60 + 29) / 86400)
    assert first.s2_offset == 0 and second.s2_offset == -1000
    assert second.extra["s2_item_id"] == "S2B_T32UPU_20200621.v2" and second.extra["sat:orbit_state"] == "ascending"
    assert first.extra["eo:cloud_cover"] == 5
    assert {(b.key, b.reason) for b in bad} == {
        ("S2A_T32UPU_20200603", "S2 band B5: no asset 'B05'"),
        ("S1A_IW_20200624_novh", "S1 polarisation VH: no asset 'vh'"),
    }
    assert counts == {"s2_found": 4, "s1_found": 4, "s2_refused": 1, "s1_refused": 1, "refused": 2,
                      "duplicates": 0, "paired": 2, "unpaired": 1}
    for s in scenes:
        assert Scene.from_json(s.to_json()) == s


def test_geoparquet_table_filters_pairs_and_refuses(tmp_path):
    table = write_geoparquet(scenario(), tmp_path / "items.parquet")
    check_scenario(*search_scenes(config(), str(table)))


def test_static_catalogue_gives_the_same_scenes(tmp_path):
    cat = write_catalog(scenario(), tmp_path / "cat")
    scenes, bad, counts = search_scenes(config(), str(cat))
    check_scenario(scenes, bad, counts)
    assert all(b.file.endswith(f"{b.key}.json") for b in bad)  # the item's own file
    assert search_scenes(config(), str(tmp_path / "cat"))[0] == scenes  # the folder works too


def test_stac_api_gives_the_same_scenes(stac_api, tmp_path):
    url = stac_api(scenario())
    scenes, bad, counts = search_scenes(config(), url)
    check_scenario(scenes, bad, counts)
    assert all(b.file == f"{url}/collections/{c}/items/{b.key}" for b, c in
               zip(sorted(bad, key=lambda b: b.key), ["sentinel-1-rtc", "sentinel-2-l2a"], strict=True))
    table = write_geoparquet(scenario(), tmp_path / "items.parquet")
    assert scenes == search_scenes(config(), str(table))[0]


def test_stac_api_area_time_cloud_and_max_items(stac_api):
    url = stac_api(scenario())
    # the Spanish tile alone: bbox is applied; its S1 partner is found in its own S1 search box
    scenes, _, counts = search_scenes(config(bbox=SPAIN), url)
    assert [(s.s2_id, s.s1_id, s.grid, s.crs) for s in scenes] == [
        ("S2A_T30TVK_20200601", "S1A_IW_20200601_spain", "30TVK", "EPSG:32630")]
    # no cloud limit: the cloudy scene comes back (client-side filter: rustac lacks query/filter)
    counts = search_scenes(config(max_cloud_cover=100), url)[2]
    assert (counts["s2_found"], counts["unpaired"]) == (5, 2)
    counts = search_scenes(config(max_cloud_cover=80), url)[2]  # the limit is inclusive
    assert (counts["s2_found"], counts["unpaired"]) == (5, 2)
    # a wider interval, given as a month range, brings July
    ids = [s.s2_id for s in search_scenes(config(datetime="2020-06/2020-07"), url)[0]]
    assert "S2A_T32UPU_20200720" not in ids  # July 20 has no S1 partner...
    assert search_scenes(config(datetime="2020-06/2020-07"), url)[2]["s2_found"] == 5  # ...but is found
    # max_items stops after that many S2 items passing the filters
    assert search_scenes(config(max_items=2), url)[2]["s2_found"] == 2


def test_unreachable_api_is_one_user_error():
    with pytest.raises(UserError, match=r"ingest.input: cannot open the STAC API http://127.0.0.1:9/"):
        search_scenes(config(), "http://127.0.0.1:9/")


@pytest.mark.parametrize(("kw", "offset", "rule"), [
    ({"processing_baseline": "03.01"}, 0, "s2:processing_baseline"),
    ({"processing_baseline": "3.10"}, 0, "s2:processing_baseline"),  # as numbers: 3.10 < 04.00
    ({"processing_baseline": "04.00"}, -1000, "s2:processing_baseline"),
    ({"processing_baseline": "05.09"}, -1000, "s2:processing_baseline"),
    ({"processing_baseline": None, "extra_props": {"processing:version": "05.10"}}, -1000, "processing:version"),
    ({"processing_baseline": "02.12", "raster_offset": -0.1}, -1000, "raster:bands"),
    ({"processing_baseline": None, "raster_offset": -0.1}, -1000, "raster:bands"),
    ({"processing_baseline": "04.00", "raster_offset": 0.0}, 0, "raster:bands"),
    ({"processing_baseline": "04.00", "raster_offset": -0.1,
      "extra_props": {"earthsearch:boa_offset_applied": True}}, 0, "earthsearch:boa_offset_applied"),
])
def test_radiometric_offset_rule(tmp_path, kw, offset, rule):
    items = [s2_item("S2", "2020-06-01T10:20:31Z", **kw), s1_item("S1", "2020-06-02T05:30:00Z", bbox=S1_BOX)]
    (scene,), bad, _ = search_scenes(config(), str(write_catalog(items, tmp_path / "c")))
    assert (scene.s2_offset, scene.extra["s2_offset_rule"], bad) == (offset, rule, [])


@pytest.mark.parametrize(("kw", "reason"), [
    ({"processing_baseline": None}, "S2: no processing baseline and no raster:bands offset/scale"),
    ({"processing_baseline": "four"}, "S2: processing baseline 'four' is not a version"),
    ({"proj_on_assets": False, "transform": (20.0, 0.0, 600000.0, 0.0, -20.0, 5800020.0), "shape": (5490, 5490)},
     "S2: proj:transform [20.0, 0.0, 600000.0, 0.0, -20.0, 5800020.0] is not an unrotated 10 m grid"),
    ({"drop": ("B08",)}, "S2 band B8: no asset 'B08'"),
    ({"extra_props": {"datetime": None}}, "S2 item: no readable properties.datetime (None)"),
    ({"geometry": {"type": "Point", "coordinates": [11, 51.5]}}, "S2 item: geometry has no area"),
])
def test_bad_s2_items_are_refused_with_their_reason(tmp_path, kw, reason):
    items = [s2_item("good", "2020-06-01T10:20:31Z"), s2_item("bad", "2020-06-01T10:20:31Z", **kw),
             s1_item("S1", "2020-06-02T05:30:00Z", bbox=S1_BOX)]
    scenes, bad, counts = search_scenes(config(), str(write_geoparquet(items, tmp_path / "t.parquet")))
    assert [s.s2_id for s in scenes] == ["good"]
    assert [(b.key, b.file) for b in bad] == [("bad", "bad")]
    assert bad[0].reason.startswith(reason), bad[0].reason
    assert counts["s2_refused"] == 1 and counts["refused"] == 1


def test_projection_without_epsg_and_item_level_grid(tmp_path):
    no_crs = s2_item("nocrs", "2020-06-01T10:20:31Z")
    del no_crs["properties"]["proj:epsg"]
    item_level = s2_item("itemlevel", "2020-06-01T10:20:31Z", proj_on_assets=False, mgrs=None)
    item_level["properties"]["proj:code"] = item_level["properties"].pop("proj:epsg") and "EPSG:32632"
    items = [no_crs, item_level, s1_item("S1", "2020-06-02T05:30:00Z", bbox=S1_BOX)]
    scenes, bad, _ = search_scenes(config(), str(write_catalog(items, tmp_path / "c")))
    assert [(b.key, b.reason) for b in bad] == [("nocrs", "S2: no proj:epsg or proj:code (the grid's CRS)")]
    (scene,) = scenes
    assert scene.crs == "EPSG:32632" and scene.shape == (10980, 10980)
    assert scene.grid == "epsg32632_x600000_y5800020"  # no MGRS: EPSG and the grid's origin


def test_mgrs_extension_gives_the_grid(tmp_path):
    it = s2_item("es", "2020-06-01T10:20:31Z", mgrs=None, extra_props={
        "mgrs:utm_zone": 2, "mgrs:latitude_band": "U", "mgrs:grid_square": "PU"})
    items = [it, s1_item("S1", "2020-06-02T05:30:00Z", bbox=S1_BOX)]
    (scene,), _, _ = search_scenes(config(), str(write_catalog(items, tmp_path / "c")))
    assert scene.grid == "02UPU"


def test_s1_units_of_an_unlisted_collection_are_refused_not_guessed(tmp_path):
    cfg = config(s1_collection="sentinel-1-grd-custom")
    with pytest.raises(UserError) as e:
        search_scenes(cfg, str(write_catalog(scenario(), tmp_path / "c")))
    msg = str(e.value)
    assert "\n" not in msg and "'sentinel-1-grd-custom'" in msg and "ingest.stac.s1_units" in msg
    cfg = config(s1_collection="s1-db", s1_units={"s1-db": "db"})
    items = [s2_item("S2", "2020-06-01T10:20:31Z"),
             s1_item("S1", "2020-06-02T05:30:00Z", bbox=S1_BOX, collection_id="s1-db")]
    (scene,), _, _ = search_scenes(cfg, str(write_catalog(items, tmp_path / "d")))
    assert (scene.s1_units, scene.s1_collection) == ("db", "s1-db")


def test_band_maps_must_be_complete():
    with pytest.raises(UserError, match=r"ingest.stac.s2_assets: .*missing: \['B5'\]"):
        search_scenes(config(s2_assets={b: b for b in S2_L2A_BANDS if b != "B5"}), "x.parquet")
    with pytest.raises(UserError, match=r"ingest.stac.s1_assets"):
        search_scenes(config(s1_assets={"VV": "vv"}), "x.parquet")


def test_unreadable_inputs_are_user_errors(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot read stac-geoparquet"):
        search_scenes(config(), str(tmp_path / "bad.parquet"))
    (tmp_path / "catalog.json").write_text("{")
    with pytest.raises(UserError, match="cannot read the static catalogue"):
        search_scenes(config(), str(tmp_path / "catalog.json"))
    with pytest.raises(UserError, match="is not a STAC API URL"):
        search_scenes(config(), str(tmp_path / "nothing-here"))
    with pytest.raises(UserError, match="ingest.stac.datetime"):
        search_scenes(config(datetime="2020-13-01"), "x.parquet")
    with pytest.raises(UserError, match="ingest.stac.intersects"):
        search_scenes(config(intersects="{not json"), "x.parquet")


def test_intersects_and_bbox_both_hold(tmp_path):
    table = str(write_geoparquet(scenario(), tmp_path / "t.parquet"))
    spain = {"type": "Polygon", "coordinates": [[[-4, 40], [-3, 40], [-3, 41], [-4, 41], [-4, 40]]]}
    (tmp_path / "area.geojson").write_text(json.dumps({"type": "Feature", "geometry": spain, "properties": {}}))
    got = search_scenes(config(bbox=None, intersects=str(tmp_path / "area.geojson")), table)[0]
    assert [s.s2_id for s in got] == ["S2A_T30TVK_20200601"]
    with pytest.raises(UserError, match="does not meet ingest.stac.bbox"):
        search_scenes(config(intersects=json.dumps(spain)), table)


def test_duplicates_kept_once_and_ids_cleaned_to_unique_keys(tmp_path):
    a = s2_item("S2.A", "2020-06-01T10:20:31Z")
    items = [a, a, s2_item("S2_A", "2020-06-01T10:20:32Z"), s1_item("S1", "2020-06-02T05:30:00Z", bbox=S1_BOX)]
    scenes, bad, counts = search_scenes(config(), str(write_catalog(items[:1] + items[2:], tmp_path / "c")))
    assert [s.s2_id for s in scenes] == ["S2_A"] and [b.key for b in bad] == ["S2_A"]
    assert "cleans to 'S2_A'" in bad[0].reason
    scenes, _, counts = search_scenes(config(), str(write_geoparquet(items, tmp_path / "t.parquet")))
    assert counts["duplicates"] == 1 and scenes[0].extra["s2_item_id"] == "S2.A"


def test_search_params_send_the_cloud_limit_only_to_an_api_that_declares_it():
    base = search_params("c", None, (1.0, 2.0, 3.0, 4.0), *parse_interval("2020-06-01/2020-06-30"), 20.0, set())
    assert base == {"collections": ["c"], "limit": 250, "bbox": [1.0, 2.0, 3.0, 4.0],
                    "datetime": "2020-06-01T00:00:00.000000Z/2020-06-30T23:59:59.999999Z"}
    q = search_params("c", None, None, None, None, 20.0, {"query", "filter"})
    assert q["query"] == {"eo:cloud_cover": {"lte": 20.0}} and "filter" not in q and "datetime" not in q
    f = search_params("c", None, None, None, None, 20.0, {"filter"})
    assert f["filter"] == {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 20.0]}
    assert f["filter_lang"] == "cql2-json"
    assert "query" not in search_params("c", None, None, None, None, None, {"query"})


def test_parse_interval_and_input_kind(tmp_path):
    from datetime import UTC, datetime

    assert parse_interval("2020") == (datetime(2020, 1, 1, tzinfo=UTC),
                                      datetime(2020, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
    assert parse_interval("2020-12")[1] == datetime(2020, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert parse_interval("../2020-02-03T04:05:06Z") == (None, datetime(2020, 2, 3, 4, 5, 6, tzinfo=UTC))
    assert parse_interval("2020-02-03/..") == (datetime(2020, 2, 3, tzinfo=UTC), None)
    assert parse_interval(None) == (None, None)
    with pytest.raises(UserError, match="starts after it ends"):
        parse_interval("2020-02-03/2020-01-01")
    assert input_kind("https://planetarycomputer.microsoft.com/api/stac/v1") == "api"
    assert input_kind("https://example.com/stac/catalog.json") == "catalog"
    assert input_kind("s3://bucket/items.parquet") == "geoparquet"
