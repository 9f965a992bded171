"""``ingest.run``'s plan and scheduler, without Ray: the split by location, the partitions, the
plan id a resume recognises, and how partitions are handed to Ray tasks (a stand-in ``ray``
module records it), plus the command's output. ``test_ingest_commit.py`` covers the commit."""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

import dsl.runtime.ray_start as ray_start
import ingest.run as run
from dsl.contracts.config import Config, ConfigError, IngestConfig
from ingest.raster import BadInput
from ingest.sources import PairItem
from ingest.sources.base import Pair


def item(key: str, location: str, split: str | None = None) -> PairItem:
    return PairItem(key=key, location=location, files=(("s1", f"/in/{key}.tif"),), split=split)


def h(location: str) -> float:
    return int(hashlib.sha1(location.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def test_split_by_location_hash():
    # h: a .527, b .913, c .518, d .235, e .347, f .289, g .332, h .156
    got = {loc: run.assign_split(item("k", loc), 0.3) for loc in "abcdefgh"}
    assert got == {"a": "train", "b": "train", "c": "train", "d": "val", "e": "train", "f": "val", "g": "train",
                   "h": "val"}
    assert run.assign_split(item("k", "e"), h("e")) == "train"  # exactly the fraction: not below it
    assert run.assign_split(item("k", "e"), h("e") + 1e-9) == "val"
    for fraction in (0.0, -1.0):  # no split of our own: the source's (or none)
        assert run.assign_split(item("k", "d", split="validation"), fraction) == "validation"
        assert run.assign_split(item("k", "d"), fraction) is None


def test_partitions_per_split_in_scatter_order():
    # sha1("0:<key>") starts k7 1f3f, k6 4034, k5 9891, k2 c2b3, k1 d87d (train); k0 72b6, k4 aad1, k3 bec4
    items = [item(f"k{i}", loc) for i, loc in enumerate("dabhfceg")]
    parts = run.plan_partitions(items, 2, 0.3, "px")
    assert [(p.split, p.index, [i.key for i in p.items], p.shard) for p in parts] == [
        ("train", 0, ["k7", "k6"], "px-train-000000.tar"),
        ("train", 1, ["k5", "k2"], "px-train-000001.tar"),
        ("train", 2, ["k1"], "px-train-000002.tar"),
        ("val", 0, ["k0", "k4"], "px-val-000000.tar"),
        ("val", 1, ["k3"], "px-val-000001.tar"),
    ]
    # without a split: one series, the source's own splits sorted with None first (a 4618 < d e3f2)
    items = [item("b", "x", "test"), item("a", "y"), item("c", "z", "test"), item("d", "w")]
    parts = run.plan_partitions(items, 5, 0.0, "pairs")
    assert [(p.split, p.index, [i.key for i in p.items], p.shard) for p in parts] == [
        (None, 0, ["a", "d"], "pairs-000000.tar"), ("test", 0, ["b", "c"], "pairs-test-000000.tar")]
    assert run.Partition(None, 3, ()).shard == "pairs-000003.tar"


def test_plan_id_is_stable_and_covers_what_shapes_the_output():
    items = [PairItem(key=f"k{i}", location=f"l{i % 3}", files=(("s1", f"/x/{i}.tif"),)) for i in range(4)]
    cfg = IngestConfig(input="/in")
    pid = run._plan_id(cfg, items, 3)
    # a plan written by an earlier run of this version must be recognised by the next
    # (and not one of the key-ordered plans before the scatter: those wrote other partitions)
    assert pid == "1c9aa0300df9006e4414736b84628e032f2e6198ae5ea6b91d1c4f4e455576b8"
    changed = [cfg.model_copy(update={k: v}) for k, v in
               {"source": "zarr", "input": "/other", "prefix": "p2", "val_fraction": 0.1, "tile_size": 128,
                "shuffle_seed": 1, "hashed_prefixes": True, "encoding": "plain"}.items()]
    assert len({pid, *(run._plan_id(c, items, 3) for c in changed), run._plan_id(cfg, items, 4),
                run._plan_id(cfg, items[:3], 3)}) == 11
    # hashed_prefixes counts as resolved: False is what None means for a local output
    same = cfg.model_copy(update={"workers": 7, "output": "/else", "progress": False, "max_bad_fraction": 0.5,
                                  "hashed_prefixes": False})
    assert run._plan_id(same, items, 3) == pid


def test_read_json(tmp_path):
    assert run._read_json(str(tmp_path / "missing.json")) is None
    (tmp_path / "p.json").write_text('{"plan_id": "x"}')
    assert run._read_json(str(tmp_path / "p.json")) == {"plan_id": "x"}


class FakeRay(ModuleType):
    """``ray`` as ``_run_tasks`` uses it; a task runs when it is waited for."""

    def __init__(self):
        super().__init__("ray")
        self.options, self.puts, self.in_flight, self.submitted, self.finished = None, [], [], 0, 0

    def remote(self, **options):
        self.options = options

        def wrap(fn):
            def submit(*args):
                self.submitted += 1
                self.in_flight.append(self.submitted - self.finished)
                return SimpleNamespace(fn=fn, args=args)
            return SimpleNamespace(remote=submit)
        return wrap

    def put(self, obj):
        self.puts.append(obj)
        return SimpleNamespace(value=obj)

    def wait(self, pending, num_returns):
        assert num_returns == 1
        self.finished += 1
        return pending[:1], pending[1:]

    def get(self, refs):
        return [r.fn(*[a.value if isinstance(a, SimpleNamespace) else a for a in r.args]) for r in refs]


class Bar:
    made: list[Bar] = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.postfix, self.closed = kwargs, [], [], False
        Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def set_postfix(self, **kw):
        self.postfix.append(kw)

    def close(self):
        self.closed = True


@pytest.fixture
def fake_ray(monkeypatch):
    ray = FakeRay()
    started = []
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(ray_start, "init_ray", lambda address, num_cpus: started.append((address, num_cpus)))
    monkeypatch.setattr("tqdm.tqdm", Bar)
    Bar.made.clear()
    return ray, started


@pytest.mark.parametrize(("address", "progress", "cpus"), [(None, True, 3), ("ray://head:10001", False, None)])
def test_partitions_run_as_bounded_ray_tasks(fake_ray, monkeypatch, address, progress, cpus):
    ray, started = fake_ray
    done = []

    def write_partition(c, part):
        assert c is cfg  # the config Ray shipped to the task
        done.append(part.index)
        return {"bad": part.index % 2, "seconds": 0.5 * part.index, "items": len(part.items)}

    monkeypatch.setattr(run, "write_partition", write_partition)
    cfg = IngestConfig(input="/in", workers=3, address=address, progress=progress)
    todo = [run.Partition(None, i, tuple(item(f"k{i}{j}", "l") for j in range(i + 1))) for i in range(5)]
    busy = run._run_tasks(cfg, todo, 40, 7, 2)
    assert started == [(address, cpus)]
    assert ray.options == {"num_cpus": 1, "max_retries": 2} and ray.puts == [cfg]
    assert done == [0, 1, 2, 3, 4] and busy == 0.5 * (0 + 1 + 2 + 3 + 4)
    assert max(ray.in_flight) == 3  # never more than cfg.workers tasks at once
    (bar,) = Bar.made
    assert bar.kwargs == {"total": 40, "initial": 7, "unit": "pair", "disable": not progress, "desc": "ingest"}
    assert bar.updates == [1, 2, 3, 4, 5] and bar.closed
    assert bar.postfix == [{"bad": 2}, {"bad": 2}, {"bad": 3}, {"bad": 3}, {"bad": 4}, {"bad": 4}]


def test_command_needs_an_input_and_prints_what_it_wrote(monkeypatch, capsys):
    with pytest.raises(ConfigError) as e:
        run.command(Config(), None)
    assert str(e.value) == "ingest.input is required (--input PATH_OR_URL)"
    manifest = SimpleNamespace(samples=12, shards=[1, 2, 3], samples_by_split={"train": 12}, bad=2)
    monkeypatch.setattr(run, "ingest", lambda cfg: manifest)
    cfg = Config.model_validate({"ingest": {"input": "/raw", "output": "/out"}})
    assert run.command(cfg, None) == 0
    assert capsys.readouterr().out == "wrote 12 pairs in 3 shards ({'train': 12}), 2 quarantined, to /out\n"


# ---------------------------------------------------------------- one partition, a stand-in source


class FakeSource:
    """A source whose items are read as given tiles: ``tiles[key]`` is a list of S2 band lists."""

    def __init__(self, tiles: dict[str, list[list[str]] | str], estimate=None):
        self.tiles, self.estimate = tiles, estimate or {}

    def read(self, it: PairItem):
        spec = self.tiles[it.key]
        if isinstance(spec, str):
            raise BadInput(f"/in/{it.key}.tif", spec)
        return [Pair(key=f"{it.key}_{i}", location=it.location, s1=np.full((2, 4, 4), i, np.float32),
                     s2=np.full((len(bands), 4, 4), 10 * i, np.uint16),
                     meta={"key": f"{it.key}_{i}", "s2_bands": bands, "s2_file": f"/in/{it.key}_s2.tif"})
                for i, bands in enumerate(spec)]

    def estimate_bytes(self, it: PairItem) -> float:
        value = self.estimate.get(it.key, 1000.0)
        if value is None:
            raise BadInput(f"/in/{it.key}.tif", "no header")
        return value


def test_write_partition_quarantines_a_band_set_that_differs(tmp_path, monkeypatch):
    made = []
    source = FakeSource({"a": [["B1", "B2"], ["B1", "B3"], ["B1", "B2"]], "b": "unreadable", "c": [["B1", "B2"]]})
    monkeypatch.setattr(run, "get_source", lambda name, tile, cfg=None: made.append((name, tile)) or source)
    cfg = IngestConfig(input="/in", output=str(tmp_path), source="table", tile_size=64)
    part = run.Partition("train", 4, (item("a", "x"), item("b", "y"), item("c", "z")), "px")
    out = run.write_partition(cfg, part)
    assert made == [("table", 64)]
    seconds = out.pop("seconds")
    assert 0 <= seconds < 60
    assert out == {"shard": "px-train-000004.tar", "samples": 3, "bad": 2, "skipped": 0, "items": 3}
    side = json.loads((tmp_path / "_parts" / "px-train-000004.tar.json").read_text())
    assert side["partition"] == "px-train-000004.tar" and side["items"] == 3 and side["s2_bands"] == ["B1", "B2"]
    assert side["keys"] == ["a_0", "a_2", "c_0"]  # the tile after the odd one is still written
    assert side["bad"] == [
        {"key": "a_1", "file": "/in/a_s2.tif", "reason": "band set ['B1', 'B3'] differs from ['B1', 'B2']"},
        {"key": "b", "file": "/in/b.tif", "reason": "unreadable"}]
    assert side["shard"]["name"] == "px-train-000004.tar" and side["shard"]["split"] == "train"
    with tarfile.open(tmp_path / "px-train-000004.tar") as tar:
        meta = json.loads(tar.extractfile("a_2.json").read())
    assert meta["split"] == "train"


def test_a_partition_of_bad_items_commits_no_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "get_source", lambda name, tile, cfg=None: FakeSource({"a": "broken"}))
    out = run.write_partition(IngestConfig(input="/in", output=str(tmp_path)), run.Partition(None, 0, (item("a", "x"),)))
    assert (out["samples"], out["bad"]) == (0, 1)
    side = json.loads((tmp_path / "_parts" / "pairs-000000.tar.json").read_text())
    assert side["shard"] is None and side["s2_bands"] is None and side["stats"]["s2"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_parts"]


def test_items_per_shard_from_the_first_readable_header():
    items = [item("a", "x"), item("b", "y"), item("c", "z")]
    assert run.items_per_shard(FakeSource({}, {"a": None, "b": 250_000.0}), items, 1.0) == 4
    assert run.items_per_shard(FakeSource({}, {"a": 500_000.25}), items, 1.0) == 1  # floor, not more
    assert run.items_per_shard(FakeSource({}, {"a": 5e6}), items, 1.0) == 1  # bigger than a shard: one each
    assert run.items_per_shard(FakeSource({}, {"a": None, "b": None, "c": None}), items, 1.0) == 1


def test_splits_are_planned_in_name_order_none_first():
    items = [item("b", "x", "B"), item("a", "y"), item("c", "z", "A")]
    assert [p.split for p in run.plan_partitions(items, 5, 0.0, "pairs")] == [None, "A", "B"]


# ---------------------------------------------------------------- partitions cut by bytes


def test_partitions_cut_by_each_items_bytes():
    # plan order (sha1 "0:<key>"): k7 k6 k0 k5 k4 k3 k2 k1
    items = [item(f"k{i}", "l") for i in range(8)]
    size = {"k7": 300, "k6": 300, "k0": 500, "k5": 1200, "k4": 100, "k3": 900, "k2": 50, "k1": 50}
    parts = run.plan_partitions(items, None, 0.0, "px", sizes=[size[it.key] for it in items], shard_bytes=1000)
    assert [[i.key for i in p.items] for p in parts] == [
        ["k7", "k6"],  # 600: k0 would make 1100
        ["k0"],
        ["k5"],  # bigger than a shard: alone, never cut
        ["k4", "k3"],  # exactly 1000 fits
        ["k2", "k1"]]
    assert [(p.split, p.index) for p in parts] == [(None, i) for i in range(5)]
    each_too_big = run.plan_partitions(items, None, 0.0, "px", sizes=[2000] * 8, shard_bytes=1000)
    assert [len(p.items) for p in each_too_big] == [1] * 8  # one each, no empty partition before the first
    # the same order as the count-based plan, and independent of the listing order
    assert [i for p in parts for i in p.items] == list(run.plan_partitions(items, 100, 0.0, "px")[0].items)
    backwards = items[::-1]
    assert run.plan_partitions(backwards, None, 0.0, "px", sizes=[size[it.key] for it in backwards],
                               shard_bytes=1000) == parts
    # per split, as the count-based plan
    placed = [item(f"k{i}", loc) for i, loc in enumerate("dabhfceg")]
    split = run.plan_partitions(placed, None, 0.3, "px", sizes=[100] * 8, shard_bytes=250)
    assert [(p.split, p.index, [i.key for i in p.items]) for p in split] == [
        ("train", 0, ["k7", "k6"]), ("train", 1, ["k5", "k2"]), ("train", 2, ["k1"]),
        ("val", 0, ["k0", "k4"]), ("val", 1, ["k3"])]
    with pytest.raises(ValueError, match="^sizes needs one size per item and shard_bytes$"):
        run.plan_partitions(items, None, 0.0, "px", sizes=[1] * 7, shard_bytes=10)


class SizedSource:
    """Items sized by ``item_bytes`` from a table (None: this one cannot be sized cheaply)."""

    def __init__(self, sizes: dict[str, int | None]):
        self.sizes, self.calls = sizes, []

    def item_bytes(self, it: PairItem) -> int | None:
        self.calls.append(it.key)
        return self.sizes[it.key]


def test_item_sizes_are_all_or_nothing():
    items = [item(k, "l") for k in "abc"]
    assert run.item_sizes(SizedSource({"a": 5, "b": 7, "c": 0}), items) == [5, 7, 0]
    partial = SizedSource({"a": 5, "b": None, "c": 3})
    assert run.item_sizes(partial, items) is None and partial.calls == ["a", "b"]  # stops at the first unknown
    assert run.item_sizes(FakeSource({}), items) is None  # a source without item_bytes
    from ingest.sources.base import Source
    assert Source().item_bytes(items[0]) is None  # the base class: not cheap


class ListedSource(FakeSource):
    def __init__(self, tiles, sizes=None, estimate=None):
        super().__init__(tiles, estimate)
        if sizes is not None:
            self.item_bytes = lambda it: sizes[it.key]

    def list(self, input_url):
        return [item(k, f"loc-{k}") for k in self.tiles], []


def test_an_ingest_cuts_by_bytes_when_the_source_sizes_its_items(tmp_path, monkeypatch):
    tiles = {k: [["B1"]] * n for k, n in zip("abcdef", (1, 3, 1, 2, 1, 1), strict=True)}
    monkeypatch.setattr(run, "_run_tasks", lambda cfg, todo, *_: sum(run.write_partition(cfg, p)["seconds"] for p in todo))
    cfg = IngestConfig(input="/in", output=str(tmp_path / "bytes"), shard_size_mb=0.003, progress=False)
    by_bytes = ListedSource(tiles, sizes={k: 1000 * len(v) for k, v in tiles.items()})
    monkeypatch.setattr(run, "get_source", lambda name, tile, cfg=None: by_bytes)
    m = run.ingest(cfg)
    items, _ = by_bytes.list("/in")
    parts = run.plan_partitions(items, None, 0.0, "pairs", sizes=[by_bytes.item_bytes(i) for i in items],
                                shard_bytes=3000)
    assert [s.samples for s in m.shards] == [sum(len(tiles[i.key]) for i in p.items) for p in parts]
    assert all(s.samples <= 3 for s in m.shards) and m.samples == 9
    plan = json.loads((tmp_path / "bytes" / "_parts" / "plan.json").read_text())
    assert plan == {"plan_id": run._plan_id(cfg, items, [len(p.items) for p in parts]),
                    "partitions": [p.shard for p in parts]}
    # the same input sized by the probe: another plan (so another plan id), 3 items a partition
    probed = ListedSource(tiles, estimate={k: 1000 for k in tiles})
    monkeypatch.setattr(run, "get_source", lambda name, tile, cfg=None: probed)
    m2 = run.ingest(cfg.model_copy(update={"output": str(tmp_path / "count")}))
    assert [s.samples for s in m2.shards] == [
        sum(len(tiles[i.key]) for i in p.items) for p in run.plan_partitions(items, 3, 0.0, "pairs")]
    assert m2.plan_id != m.plan_id


# ---------------------------------------------------------------- linear planning


def test_the_plan_hashes_each_key_once_and_each_place_once(monkeypatch):
    calls = []

    def sha1(data=b""):
        calls.append(data)
        return hashlib.sha1(data)

    monkeypatch.setattr(run, "hashlib", SimpleNamespace(sha1=sha1, sha256=hashlib.sha256))
    items = [item(f"k{i}", f"l{i % 7}") for i in range(500)]
    parts = run.plan_partitions(items, 10, 0.3, "px")
    assert len(calls) == 500 + 7  # not a hash per comparison, nor a location hash per item
    assert sum(len(p.items) for p in parts) == 500


def test_what_is_left_to_do_compares_no_partitions(monkeypatch):
    compared = []
    monkeypatch.setattr(run.Partition, "__eq__", lambda a, b: compared.append(1) or a is b)
    parts = run.plan_partitions([item(f"k{i}", "l") for i in range(50)], 3, 0.0, "px")
    committed = {p.shard + ".json" for p in parts[::2]} | {"plan.json"}
    todo, already = run.pending(parts, committed)
    assert todo == parts[1::2] and already == sum(len(p.items) for p in parts[::2])
    assert compared == []  # a list membership test per partition would be O(P^2) (5 min at 100k)


def test_the_plan_id_hashes_each_item_as_asdict_did():
    from dataclasses import asdict
    items = [PairItem(key="k1", location="Zürich \"x\"", files=(("s1", "/a b.tif"), ("s2", "s3://b/é.tif")),
                      split="test", index=3), item("k2", "l")]
    cfg = IngestConfig(input="/in")
    h = hashlib.sha256()
    opts = {k: getattr(cfg, k) for k in ("source", "input", "prefix", "val_fraction", "tile_size", "shuffle_seed",
                                         "encoding")}
    opts["hashed_prefixes"] = False
    h.update(json.dumps({"opts": opts, "per_shard": 3, "format": run.FORMAT_VERSION}, sort_keys=True).encode())
    for it in items:
        h.update(json.dumps(asdict(it), sort_keys=True).encode())
    assert run._plan_id(cfg, items, 3) == h.hexdigest()


def test_items_that_fill_a_shard_exactly_share_it():
    assert run._cuts([0, 1, 2], None, [100, 150, 250], 250) == [(0, 2), (2, 3)]
    assert run._cuts([0, 1, 2], None, [100, 151, 250], 250) == [(0, 1), (1, 2), (2, 3)]
    assert run._cuts([0], None, [900], 250) == [(0, 1)]  # larger than a shard: alone, never dropped
