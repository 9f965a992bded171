"""The stac source between search and reading, fast: items per patch, the scene table, the plan."""

from __future__ import annotations

import pytest

import ingest.stac.search as search
from dsl.contracts.config import IngestConfig
from ingest import run
from ingest.records import Skipped
from ingest.sources import get_source
from ingest.stac.scene import Scene
from ingest.stac.source import StacSource


def scene(s2_id: str, shape=(100, 130), grid="33UUP", href="s3://b/x.tif") -> Scene:
    return Scene(s2_id=s2_id, s2_datetime="2020-06-01T10:00:00Z", s2_assets={"B2": href}, scl=None,
                 s2_offset=-1000.0, crs="EPSG:32633", transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0),
                 shape=shape, grid=grid, s1_id="S1", s1_datetime="2020-06-02T17:00:00Z",
                 s1_assets={"VV": href, "VH": href}, s1_units="linear", gap_days=1.3, s1_collection="sentinel-1-rtc")


@pytest.fixture
def found(monkeypatch):
    """``found[:] = scenes``: what the search returns."""
    scenes: list[Scene] = []
    monkeypatch.setattr(search, "search_scenes", lambda cfg, url: (list(scenes), [], {"paired": len(scenes)}))
    return scenes


def source(tmp_path, tile=32, block=2) -> StacSource:
    cfg = IngestConfig(source="stac", input="http://stac", output=str(tmp_path), tile_size=tile,
                       stac={"block_patches": block})
    return get_source("stac", tile, cfg)


PATCH = 32 * 32 * (4 * 2 + 2 * 12) + 2048  # a 32-px patch's bytes: S1 float32 x 2, S2 uint16 x 12


def test_one_item_per_block_of_whole_patches_located_on_the_grid(tmp_path, found):
    found[:] = [scene("B"), scene("A", shape=(64, 64), grid="32TLR"), scene("A", shape=(64, 64))]
    src = source(tmp_path)
    items, bad = src.list("http://stac")
    # scene B: 100 x 130 px -> 3 x 4 whole 32-px patches -> 2 x 2 blocks of at most 2 x 2;
    # A (listed twice: once) 2 x 2 patches -> one block
    assert bad == [] and [i.key for i in items] == ["A_b0_0", "B_b0_0", "B_b0_1", "B_b1_0", "B_b1_1"]
    b = {i.key: i for i in items}
    assert b["B_b1_1"].location == "33UUP_b1_1" and b["B_b1_1"].index == 3 and b["B_b1_0"].index == 2
    assert b["B_b0_1"].files == (("scene", "B"),)
    assert items[0].location == "32TLR_b0_0"  # the first listing of A is kept
    assert src.counts == {"paired": 3, "scenes": 2, "patches": 16, "blocks": 5}
    # each block sized by its own patches: B's bottom row of blocks holds one patch row
    assert [src.item_bytes(i) for i in items] == [4 * PATCH, 4 * PATCH, 4 * PATCH, 2 * PATCH, 2 * PATCH]
    assert src.estimate_bytes(items[3]) == 2 * PATCH
    assert src._block(b["B_b1_1"]) == [(2, 2), (2, 3)] and src._block(b["B_b0_1"]) == [(0, 2), (0, 3), (1, 2), (1, 3)]


def test_the_scene_table_is_written_when_asked_and_read_back_in_order(tmp_path, found):
    found[:] = [scene("A"), scene("B")]
    src = source(tmp_path)
    src.list("http://stac")
    assert not (tmp_path / "_parts" / "scenes.jsonl").exists()  # not before the plan is checked
    src.write_listing(str(tmp_path))
    reader = source(tmp_path)  # a task's own source: it reads the table
    assert reader._scene("B") == scene("B") and reader._scene("A").s2_assets == {"B2": "s3://b/x.tif"}


def test_a_block_is_read_patch_by_patch_each_with_its_outcome(tmp_path, found, monkeypatch):
    import ingest.stac.read as read
    from ingest.raster import BadInput
    from ingest.records import BadRecord

    calls = []

    class Reader:
        def __init__(self, cfg):
            calls.append("open")

        def read_patch(self, sc, row, col, tile):
            calls.append((sc.s2_id, row, col, tile))
            if (row, col) == (0, 3):
                raise Skipped("cloud", "60% cloud")
            if (row, col) == (1, 2):
                raise BadInput("s3://b/x.tif", "unreadable block")
            return f"pair {row} {col}"

        def close(self):
            calls.append("close")

    monkeypatch.setattr(read, "SceneReader", Reader)
    found[:] = [scene("B")]
    src = source(tmp_path)
    items, _ = src.list("http://stac")
    src.write_listing(str(tmp_path))
    task = source(tmp_path)
    out = list(task.read(items[1]))  # block (0, 1): patches (0, 2), (0, 3), (1, 2), (1, 3)
    assert out[0] == "pair 0 2" and out[3] == "pair 1 3"
    assert isinstance(out[1], Skipped) and out[1].reason == "cloud"
    assert out[2] == BadRecord("B_r1_c2", "s3://b/x.tif", "unreadable block")
    assert list(task.read(items[3])) == ["pair 2 2", "pair 2 3"]
    task.close()
    task.close()
    assert calls == ["open", ("B", 0, 2, 32), ("B", 0, 3, 32), ("B", 1, 2, 32), ("B", 1, 3, 32),
                     ("B", 2, 2, 32), ("B", 2, 3, 32), "close"]  # one reader per task


def test_the_plan_changes_with_the_scene_table(tmp_path, found):
    cfg = IngestConfig(source="stac", input="http://stac", output=str(tmp_path), tile_size=32,
                       stac={"block_patches": 2})
    found[:] = [scene("A")]
    src = source(tmp_path)
    items, _ = src.list("http://stac")
    first = run._plan_id(cfg, items, [len(items)], src.listing_digest())
    found[:] = [scene("A", href="s3://b/other.tif")]  # the same ids, other assets
    again = source(tmp_path)
    items2, _ = again.list("http://stac")
    assert items2 == items and again.listing_digest() != src.listing_digest()
    assert run._plan_id(cfg, items2, [len(items)], again.listing_digest()) != first
    # and a filter changed in the config plans anew too
    cfg2 = cfg.model_copy(update={"stac": cfg.stac.model_copy(update={"max_scl_fraction": 0.5})})
    assert run._plan_id(cfg2, items, [len(items)], src.listing_digest()) != first
    # other sources (no listing digest) keep the plan ids pinned before
    assert run._plan_id(cfg, items, [len(items)]) == run._plan_id(cfg2, items, [len(items)])


def test_outcomes_of_a_block_are_counted_and_quarantined_one_by_one(tmp_path, monkeypatch):
    import numpy as np

    from ingest.records import BadRecord, Pair, PairItem

    def make_pair(key: str) -> Pair:
        return Pair(key=key, location="a", s1=np.zeros((2, 4, 4), np.float32), s2=np.ones((2, 4, 4), np.uint16),
                    meta={"key": key, "s2_bands": ["B2", "B3"], "s2_file": "s3://b/x.tif"})

    def big_pair(key: str) -> Pair:  # larger than a tile: cut into tiles like any source's pair
        rng = np.random.default_rng(0)
        return Pair(key=key, location="a", s1=rng.uniform(-20, 0, (2, 16, 16)).astype(np.float32),
                    s2=rng.integers(1, 999, (2, 16, 16)).astype(np.uint16),
                    meta={"key": key, "s2_bands": ["B2", "B3"], "s2_file": "s3://b/x.tif",
                          "transform": [10.0, 0.0, 500000.0, 0.0, -10.0, 6000000.0]})

    class Source:
        def read(self, item):
            yield Skipped("cloud")
            yield make_pair(f"{item.key}_r0_c0")
            yield BadRecord(f"{item.key}_r0_c1", "s3://b/x.tif", "unreadable")
            yield Skipped("s1_nodata")
            yield make_pair(f"{item.key}_r1_c1")
            yield Skipped("cloud")
            yield big_pair("big")

        def close(self):
            pass

    seen = {}
    monkeypatch.setattr(run, "get_source", lambda name, tile, cfg=None: seen.setdefault("cfg", cfg) and Source())
    cfg = IngestConfig(input="/in", output=str(tmp_path), source="stac", tile_size=8)
    items = (PairItem("a", "a", (("scene", "a"),), index=0),)
    out = run.write_partition(cfg, run.Partition(None, 0, items, "px"))
    assert seen["cfg"] is cfg  # the stac source reads its options from the ingest config
    assert (out["samples"], out["bad"], out["skipped"]) == (6, 1, 3)
    import json

    side = json.loads((tmp_path / "_parts" / "px-000000.tar.json").read_text())
    assert side["keys"] == ["a_r0_c0", "a_r1_c1", "big_r0_c0", "big_r0_c1", "big_r1_c0", "big_r1_c1"]
    assert side["skipped"] == {"cloud": 2, "s1_nodata": 1}
    assert side["bad"] == [{"key": "a_r0_c1", "file": "s3://b/x.tif", "reason": "unreadable"}]


def test_a_skipped_patch_is_counted_by_reason_not_quarantined(tmp_path, monkeypatch):
    from ingest.records import PairItem

    class Source:
        closed = 0

        def read(self, item):
            raise Skipped("cloud" if item.key != "c" else "s1_nodata", "detail")

        def close(self):
            Source.closed += 1

    monkeypatch.setattr(run, "get_source", lambda name, tile, cfg=None: Source())
    cfg = IngestConfig(input="/in", output=str(tmp_path), source="table")
    items = tuple(PairItem(k, k, (("s1", k),)) for k in "abc")
    out = run.write_partition(cfg, run.Partition(None, 0, items, "px"))
    assert (out["samples"], out["bad"], out["skipped"]) == (0, 0, 3) and Source.closed == 1
    import json

    side = json.loads((tmp_path / "_parts" / "px-000000.tar.json").read_text())
    assert side["skipped"] == {"cloud": 2, "s1_nodata": 1} and side["bad"] == [] and side["shard"] is None


def test_the_source_needs_its_config():
    with pytest.raises(ValueError, match="stac source needs the ingest config"):
        get_source("stac", 32)
