"""Shuffle quality at ingest: each split's items are scattered over its shards by a seeded hash,
so no shard (and no batch read from consecutive shards) is one scene or region.

Keys here are grouped by location as real sources' are (``loc007_12``: scene 7, patch 12), so
key order would make every shard two or three places. The plan runs as ``ingest`` runs it; the
last test ingests in this process (a stand-in source, partitions run serially, no Ray).
"""

from __future__ import annotations

import random
import tarfile
from collections import Counter

import numpy as np
import pytest

import ingest.run as run
from dsl.contracts.config import IngestConfig
from ingest.sources import PairItem
from ingest.sources.base import Pair

LOCATIONS, PER_LOCATION, PER_SHARD, BATCH = 50, 40, 100, 64


def grouped_items(locations: int = LOCATIONS, per_location: int = PER_LOCATION) -> list[PairItem]:
    return [PairItem(key=f"loc{loc:03d}_{i}", location=f"loc{loc:03d}", files=(("s1", f"/in/{loc}_{i}.tif"),))
            for loc in range(locations) for i in range(per_location)]


def shard_share(parts: list[run.Partition]) -> float:
    """The largest share one location has of any full shard."""
    full = [p for p in parts if len(p.items) == PER_SHARD]
    return max(max(Counter(i.location for i in p.items).values()) / PER_SHARD for p in full)


def batch_share(parts: list[run.Partition]) -> float:
    """The largest share one location has of a batch, reading the shards one after the other
    without any shuffle (a reader's worst case: its buffer adds mixing on top)."""
    stream = [i.location for p in parts for i in p.items]
    batches = [stream[j : j + BATCH] for j in range(0, len(stream) - BATCH + 1, BATCH)]
    return max(max(Counter(b).values()) / BATCH for b in batches)


def key_order(items: list[PairItem]) -> list[run.Partition]:
    """The plan before the scatter: the items sorted by key, cut into shards."""
    ordered = sorted(items, key=lambda i: i.key)
    return [run.Partition(None, j // PER_SHARD, tuple(ordered[j : j + PER_SHARD]))
            for j in range(0, len(ordered), PER_SHARD)]


def test_no_shard_is_one_location():
    items = grouped_items()
    parts = run.plan_partitions(items, PER_SHARD, 0.0, "pairs")
    assert [len(p.items) for p in parts] == [PER_SHARD] * 20
    assert sorted(i.key for p in parts for i in p.items) == sorted(i.key for i in items)  # each once
    # key order: a shard holds 2.5 locations, one has 40% of it; scattered: 1/50 is 2% on average
    assert shard_share(key_order(items)) == 0.4
    assert shard_share(parts) <= 0.10
    assert len({i.location for i in parts[0].items}) >= 30


def test_batches_read_in_shard_order_mix_locations():
    items = grouped_items()
    parts = run.plan_partitions(items, PER_SHARD, 0.0, "pairs")
    assert batch_share(key_order(items)) == 40 / 64  # a batch is two locations
    assert batch_share(parts) <= 8 / 64  # 64 of 2,000 drawn at random: ~1.3 per location


def test_the_plan_is_deterministic_whatever_the_listing_order():
    items = grouped_items()
    plan = run.plan_partitions(items, PER_SHARD, 0.2, "pairs", seed=3)
    shuffled = list(items)
    random.Random(1).shuffle(shuffled)
    assert run.plan_partitions(shuffled, PER_SHARD, 0.2, "pairs", seed=3) == plan
    assert run.plan_partitions(items[::-1], PER_SHARD, 0.2, "pairs", seed=3) == plan
    assert run.plan_partitions(items, PER_SHARD, 0.2, "pairs", seed=3) == plan


def test_another_seed_scatters_differently_over_the_same_shards():
    items = grouped_items()
    a = run.plan_partitions(items, PER_SHARD, 0.2, "pairs", seed=0)
    b = run.plan_partitions(items, PER_SHARD, 0.2, "pairs", seed=1)
    assert [(p.split, p.index, len(p.items)) for p in a] == [(p.split, p.index, len(p.items)) for p in b]
    shard_of = {i.key: (p.split, p.index) for p in a for i in p.items}
    moved = sum(shard_of[i.key] != (p.split, p.index) for p in b for i in p.items)
    assert moved > 0.8 * len(items)  # a new shuffle, not a shift
    assert shard_share(b) <= 0.25  # as well mixed: the val split holds only 8 locations, see below


def test_the_split_stays_by_location():
    items = grouped_items()
    parts = run.plan_partitions(items, PER_SHARD, 0.2, "pairs", seed=5)
    split_of: dict[str, set] = {}
    for p in parts:
        for i in p.items:
            assert run.assign_split(i, 0.2) == p.split  # the scatter does not move an item's split
            split_of.setdefault(i.location, set()).add(p.split)
    assert all(len(s) == 1 for s in split_of.values())  # no location in both train and val
    val_locations = sum(s == {"val"} for s in split_of.values())
    assert val_locations == 8 and {p.split for p in parts} == {"train", "val"}
    # each split is mixed over its own locations: train has 42 (one location ~2.4% of a shard)
    assert shard_share([p for p in parts if p.split == "train"]) <= 0.12


# ---------------------------------------------------------------- an item's tiles stay together


class TiledSource:
    """Each item reads as ``tiles`` tiles (keys ``<item>_t<n>``), as the table source's rasters do."""

    tiles = 3

    def list(self, input_url: str):
        return grouped_items(10, 6), []

    def read(self, it: PairItem):
        return [Pair(key=f"{it.key}_t{n}", location=it.location, s1=np.zeros((2, 4, 4), np.float32),
                     s2=np.zeros((2, 4, 4), np.uint16),
                     meta={"key": f"{it.key}_t{n}", "s2_bands": ["B2", "B3"], "s2_file": "/in/x.tif"})
                for n in range(self.tiles)]

    def estimate_bytes(self, it: PairItem) -> float:
        return 1000.0  # with shard_size_mb=0.008: eight items per partition


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setattr(run, "get_source", lambda name, tile_size, cfg=None: TiledSource())

    def tasks(cfg, todo, total_items, already, listing_bad):
        for p in todo:
            run.write_partition(cfg, p)
        return 0.0

    monkeypatch.setattr(run, "_run_tasks", tasks)


def test_an_items_tiles_are_written_together_by_one_partition(tmp_path, in_process):
    cfg = IngestConfig(source="table", input="/in", output=str(tmp_path), shard_size_mb=0.008, progress=False)
    m = run.ingest(cfg)
    assert m.samples == 60 * 3 and len(m.shards) == 8
    seen: dict[str, str] = {}
    for s in m.shards:
        with tarfile.open(tmp_path / s.name) as tar:
            keys = [n.name.split(".", 1)[0] for n in tar.getmembers() if n.name.endswith(".json")]
        items = [k.rsplit("_t", 1)[0] for k in keys]
        # an item's tiles are consecutive in one shard, in tile order
        runs = [items[j] for j in range(len(items)) if j == 0 or items[j] != items[j - 1]]
        assert len(runs) == len(set(runs)) and all(keys[j].endswith(f"_t{j % 3}") for j in range(len(keys)))
        for it in items:
            assert seen.setdefault(it, s.name) == s.name
        assert len({k.split("_", 1)[0] for k in keys}) >= 4  # eight items from ten locations: mixed
    assert len(seen) == 60
