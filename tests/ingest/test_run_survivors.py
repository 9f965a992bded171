"""``ingest.run.ingest`` end to end in this process, with a stand-in source: what the manifest,
``plan.json``, the quarantine file and the error messages say, and what a rerun redoes.

The real plan, writer, sidecars and manifest run; the source is a table of tiles held in memory
and the partitions run one after the other in this process instead of as Ray tasks, so the
whole file takes well under a second (``test_ingest_commit.py`` does the same with rasters).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest

import ingest.run as run
from dsl.contracts.config import IngestConfig
from dsl.contracts.provenance import code_version
from dsl.contracts.shard_index import sample_digest, scan_offsets
from ingest.raster import BadInput
from ingest.sources import BadRecord, PairItem
from ingest.sources.base import Pair

BANDS = ["B2", "B3"]


class TableSource:
    """A source listing ``tiles``' keys as items; ``tiles[key]`` is the item's tiles as
    ``(sample key, S2 band names)``, or a string: the item's file is unreadable for that reason.
    """

    def __init__(self, tiles: dict[str, list[tuple[str, list[str]]] | str], listing_bad=()):
        self.tiles, self.listing_bad = tiles, list(listing_bad)

    def list(self, input_url: str):
        items = [PairItem(key=k, location=f"loc-{k}", files=(("s1", f"{input_url}/{k}.tif"),)) for k in self.tiles]
        return items, self.listing_bad

    def read(self, it: PairItem):
        spec = self.tiles[it.key]
        if isinstance(spec, str):
            raise BadInput(f"/in/{it.key}.tif", spec)
        return [Pair(key=key, location=it.location, s1=np.full((2, 4, 4), i, np.float32),
                     s2=np.full((len(bands), 4, 4), 10 * i, np.uint16),
                     meta={"key": key, "s2_bands": bands, "s2_file": f"/in/{it.key}_s2.tif"})
                for i, (key, bands) in enumerate(spec)]

    def estimate_bytes(self, it: PairItem) -> float:
        return 1000.0  # with shard_size_mb=0.002: two items per partition


def tiles(key: str, n: int = 1, bands: list[str] = BANDS) -> list[tuple[str, list[str]]]:
    return [(f"{key}_{i}", bands) for i in range(n)]


class Tasks:
    """``_run_tasks`` in this process: records its arguments, runs the partitions serially
    (all but those named in ``skip``) and reports ``seconds`` of task time."""

    def __init__(self, seconds: float = 0.0, skip: tuple[str, ...] = ()):
        self.calls, self.seconds, self.skip = [], seconds, skip

    def __call__(self, cfg, todo, total_items, already, listing_bad):
        self.calls.append({"todo": [p.shard for p in todo], "total": total_items, "already": already,
                           "listing_bad": listing_bad})
        for p in todo:
            if p.shard not in self.skip:
                run.write_partition(cfg, p)
        return self.seconds


@pytest.fixture
def setup(monkeypatch):
    """``setup(source, seconds=..., skip=...)``: use ``source`` and in-process tasks; returns
    the tasks recorder and the list of ``get_source`` calls."""

    def use(source, **task_kw):
        made = []
        tasks = Tasks(**task_kw)
        monkeypatch.setattr(run, "get_source", lambda name, tile_size, cfg=None: made.append((name, tile_size)) or source)
        monkeypatch.setattr(run, "_run_tasks", tasks)
        return tasks, made
    return use


def config(out, **kw) -> IngestConfig:
    base = {"source": "table", "input": "/in", "output": str(out), "shard_size_mb": 0.002, "progress": False}
    return IngestConfig(**{**base, **kw})


# ---------------------------------------------------------------- the manifest and the plan


def test_manifest_records_the_run_and_plan_json_pins_the_plan(tmp_path, setup, monkeypatch):
    source = TableSource({"a": tiles("a", 2), "b": tiles("b"), "c": "no header", "d": tiles("d", 3), "e": tiles("e")},
                         listing_bad=[BadRecord("z", "/in/z.tif", "no s2 file")])
    tasks, made = setup(source, seconds=1.23456)
    # a fixed clock: 2023-11-14T22:13:20Z at the start, 12.34567 s later at the end
    clock = iter([1_700_000_000.0, 1_700_000_012.34567])
    now = []

    def gmtime(secs=None):
        return time.gmtime(now[-1] if secs is None else secs)

    monkeypatch.setattr(run, "time", SimpleNamespace(time=lambda: now.append(next(clock)) or now[-1], gmtime=gmtime,
                                                     strftime=time.strftime, perf_counter=time.perf_counter))
    cfg = config(tmp_path, tile_size=64, max_bad_fraction=0.5, workers=5, address="ray://x:1")
    m = run.ingest(cfg)

    assert made == [("table", 64)] * 4  # with the configured tile size: the listing, then each partition
    items, _ = source.list("/in")
    parts = run.plan_partitions(items, 2, 0.0, "pairs")
    shards = [p.shard for p in parts]
    assert tasks.calls == [{"todo": shards, "total": 5, "already": 0, "listing_bad": 1}]

    plan_id = run._plan_id(cfg, items, 2)
    assert json.loads((tmp_path / "_parts" / "plan.json").read_text()) == {"plan_id": plan_id, "partitions": shards}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_parts", "digests.npy", "index.npy", "manifest.json",
                                                          *shards, "quarantine.jsonl"]
    # the index the writer recorded is what the shards' own tar headers say, in manifest order
    index = np.load(tmp_path / "index.npy", allow_pickle=False)
    assert index.tolist() == [o for s in m.shards for o in scan_offsets(str(tmp_path / s.name))]
    assert m.index.model_dump() == {"name": "index.npy", "bytes": (tmp_path / "index.npy").stat().st_size,
                                    "sha256": hashlib.sha256((tmp_path / "index.npy").read_bytes()).hexdigest()}
    assert all("offsets" not in s.model_dump() for s in m.shards)
    # the sample digests, in the same order: each of its sample's byte range
    digests = np.load(tmp_path / "digests.npy", allow_pickle=False)
    ranges = [(s.name, o[j], o[j + 1]) for s in m.shards
              for o in [scan_offsets(str(tmp_path / s.name))] for j in range(len(o) - 1)]
    assert digests.dtype == np.uint64 and digests.tolist() == [
        sample_digest((tmp_path / n).read_bytes()[a:b]) for n, a, b in ranges]
    assert m.digests.model_dump() == {"name": "digests.npy", "bytes": (tmp_path / "digests.npy").stat().st_size,
                                      "sha256": hashlib.sha256((tmp_path / "digests.npy").read_bytes()).hexdigest()}
    assert all("digests" not in s.model_dump() for s in m.shards)

    assert (m.source, m.input, m.plan_id, m.quarantine, m.stats_split) == ("table", "/in", plan_id,
                                                                          "quarantine.jsonl", "all")
    assert m.options == cfg.model_dump(mode="json", exclude={"progress", "address", "workers"})
    assert "workers" not in m.options and m.options["tile_size"] == 64
    assert m.code_version == code_version()
    assert m.created == "2023-11-14T22:13:20Z"
    assert (m.seconds, m.task_seconds) == (12.346, 1.235)
    assert (m.samples, m.bad, m.samples_by_split) == (7, 2, {"all": 7})
    assert json.loads((tmp_path / "manifest.json").read_text()) == json.loads(m.to_json())

    side = json.loads((tmp_path / "_parts" / f"{shards[0]}.json").read_text())
    assert side["stats"]["s1"]["integer"] is False and side["stats"]["s2"]["integer"] is True


def test_a_rerun_redoes_only_partitions_without_a_sidecar(tmp_path, setup):
    source = TableSource({k: tiles(k) for k in "abcde"})
    tasks, _ = setup(source, seconds=2.0)
    cfg = config(tmp_path)
    first = run.ingest(cfg)
    shards = [s.name for s in first.shards]
    assert shards == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]
    (tmp_path / "_parts" / f"{shards[1]}.json").unlink()  # killed before partition 1 committed

    second = run.ingest(cfg)
    assert tasks.calls[1] == {"todo": [shards[1]], "total": 5, "already": 3, "listing_bad": 0}
    assert second.samples == 5 and second.plan_id == first.plan_id and second.task_seconds == 2.0

    third = run.ingest(cfg)  # nothing left to do: no tasks, no task time
    assert len(tasks.calls) == 2 and third.task_seconds == 0.0 and third.samples == 5


def test_a_rerun_on_an_object_store_skips_committed_partitions(setup):
    out = f"memory://ingest-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    tasks, _ = setup(TableSource({k: tiles(k) for k in "abc"}))
    try:
        cfg = config(out)
        assert run.ingest(cfg).samples == 3
        assert run.ingest(cfg).samples == 3
        assert [c["todo"] for c in tasks.calls] == [["pairs-000000.tar", "pairs-000001.tar"]]
    finally:
        fs.rm(out.removeprefix("memory://"), recursive=True)


def test_another_input_in_the_same_output_is_refused(tmp_path, setup):
    setup(TableSource({k: tiles(k) for k in "abc"}))
    first = run.ingest(config(tmp_path))
    setup(TableSource({k: tiles(k) for k in "abcd"}))
    cfg = config(tmp_path)
    items, _ = TableSource({k: tiles(k) for k in "abcd"}).list("/in")
    new = run._plan_id(cfg, items, 2)
    with pytest.raises(run.IngestError) as e:
        run.ingest(cfg)
    assert str(e.value) == (f"{tmp_path} holds an ingest of a different input or options (plan "
                            f"{first.plan_id[:12]} vs {new[:12]}); write to a new output or delete it")


# ---------------------------------------------------------------- errors that name what is wrong


def test_no_pairs_names_the_input_and_source(tmp_path, setup):
    setup(TableSource({}, listing_bad=[BadRecord("a", "/in/a.tif", "no s2 file")]))
    with pytest.raises(run.IngestError) as e:
        run.ingest(config(tmp_path))
    assert str(e.value) == "no pairs found under /in for source 'table' (1 bad)"


def test_a_partition_left_without_sidecar_is_named(tmp_path, setup):
    setup(TableSource({k: tiles(k) for k in "abc"}), skip=("pairs-000001.tar",))
    with pytest.raises(run.IngestError) as e:
        run.ingest(config(tmp_path))
    assert str(e.value) == "partition pairs-000001.tar has no sidecar after the run; rerun to resume"
    assert not (tmp_path / "manifest.json").exists()


def test_band_sets_that_differ_between_shards_are_refused(tmp_path, setup):
    setup(TableSource({"a": tiles("a"), "b": tiles("b"), "c": tiles("c", bands=["B2", "B4"])}))
    with pytest.raises(run.IngestError) as e:
        run.ingest(config(tmp_path))
    assert str(e.value) == "pairs-000001.tar: S2 bands ['B2', 'B4'] differ from ['B2', 'B3'] in other shards"


def test_duplicate_keys_across_shards_name_the_first_five(tmp_path, setup):
    dups = [(f"d{i}", BANDS) for i in range(1, 8)]  # seven keys, each written by both partitions
    setup(TableSource({"a": [("a0", BANDS), *dups], "b": [], "c": dups}))
    with pytest.raises(run.IngestError) as e:
        run.ingest(config(tmp_path))
    assert str(e.value) == "duplicate sample keys across shards: ['d1', 'd2', 'd3', 'd4', 'd5']"


# ---------------------------------------------------------------- quarantine


def test_quarantine_lines_are_sorted_json_with_sorted_fields(tmp_path, setup):
    setup(TableSource({"b": "truncated", "c": tiles("c"), "a": "not a tiff"},
                      listing_bad=[BadRecord("b", "/in/b_s1.tif", "no s2 file")]))
    run.ingest(config(tmp_path, max_bad_fraction=1.0))
    assert (tmp_path / "quarantine.jsonl").read_text() == (
        '{"file": "/in/a.tif", "key": "a", "reason": "not a tiff"}\n'
        '{"file": "/in/b.tif", "key": "b", "reason": "truncated"}\n'
        '{"file": "/in/b_s1.tif", "key": "b", "reason": "no s2 file"}\n')


def test_bad_fraction_at_the_limit_passes_above_it_fails_naming_the_quarantine(tmp_path, setup):
    setup(TableSource({"a": tiles("a", 3), "b": "unreadable"}))
    m = run.ingest(config(tmp_path / "at", max_bad_fraction=0.25))  # 1 bad of 4: exactly the limit
    assert (m.samples, m.bad) == (3, 1)
    out = tmp_path / "above"
    with pytest.raises(run.IngestError) as e:
        run.ingest(config(out, max_bad_fraction=0.2))
    assert str(e.value) == (
        f"1 of 4 inputs are bad (25.0% > --max-bad-fraction 20.0%); see {out}/quarantine.jsonl. The 3 valid "
        "samples are committed in shards; rerun with a higher --max-bad-fraction to write the manifest")
    assert (out / "quarantine.jsonl").exists() and not (out / "manifest.json").exists()


def test_items_without_tiles_make_an_empty_dataset_not_a_failure(tmp_path, setup):
    setup(TableSource({"a": [], "b": []}))  # e.g. rasters smaller than one tile: no samples, none bad
    m = run.ingest(config(tmp_path, max_bad_fraction=0.0))
    assert (m.samples, m.bad, m.shards, m.bands.s2) == (0, 0, [], None)
    assert m.stats.s2 == {} and m.stats.s1 == {}
    assert (tmp_path / "quarantine.jsonl").read_text() == ""
    assert (m.index, m.digests) == (None, None) and not (tmp_path / "index.npy").exists()


class SizedSource(TableSource):
    """Item ``key`` has one tile of each size in ``sizes[key]`` ((H, W) each), in that order."""

    def __init__(self, sizes: dict[str, list[tuple[int, int]]]):
        super().__init__({k: tiles(k, len(v)) for k, v in sizes.items()})
        self.sizes = sizes

    def read(self, it: PairItem):
        return [Pair(key=f"{it.key}_{i}", location=it.location, s1=np.zeros((2, h, w), np.float32),
                     s2=np.zeros((len(BANDS), h, w), np.uint16),
                     meta={"key": f"{it.key}_{i}", "s2_bands": BANDS, "s2_file": f"/in/{it.key}_s2.tif"})
                for i, (h, w) in enumerate(self.sizes[it.key])]


def test_the_manifest_records_the_smallest_patch_a_crop_must_fit(tmp_path, setup):
    from dsl.contracts.config import ConfigError, DataConfig
    from dsl.data.checks import check_crop

    # five partitions of about two items: the smallest patch sits in a later one, not the first
    # (and within its partition, a larger tile after it)
    setup(SizedSource({"a": [(32, 32)], "b": [(36, 48)], "c": [(32, 40)], "d": [(24, 28), (48, 48)], "e": [(48, 32)]}))
    m = run.ingest(config(tmp_path))
    assert m.patch_min == [24, 28]
    check_crop(DataConfig(shards=str(tmp_path), crop_size=24), m)
    with pytest.raises(ConfigError) as e:
        check_crop(DataConfig(shards=str(tmp_path), crop_size=25), m)
    assert str(e.value) == (f"data.crop_size 25 is larger than the patches of {tmp_path}: the smallest stored patch "
                            "is 24x28; use data.crop_size <= 24")


# ---------------------------------------------------------------- a source with a listing (stac's hooks)


class ListingSource(TableSource):
    """A table source with what the stac source adds: per-patch skips, its listing's digest
    (pinned in the plan) and the listing it writes beside the output for the tasks."""

    def __init__(self, tiles, digest: str = "scenes-v1"):
        super().__init__(tiles)
        self.digest, self.listings = digest, []
        self.counts = {"s2_scenes": 7, "paired": 5}  # what the search found, for the manifest

    def read(self, it: PairItem):
        from ingest.records import Skipped

        return [Skipped("cloud"), *super().read(it), Skipped("cloud"), Skipped("s1_nodata")]

    def listing_digest(self) -> str:
        return self.digest

    def write_listing(self, output: str) -> None:
        self.listings.append(output)


def test_a_source_s_listing_is_pinned_in_the_plan_and_written_beside_the_output(tmp_path, monkeypatch):
    source = ListingSource({k: tiles(k) for k in "abcde"})
    configs = []
    monkeypatch.setattr(run, "get_source", lambda name, tile_size, cfg=None: configs.append(cfg) or source)
    monkeypatch.setattr(run, "_run_tasks", Tasks())
    cfg = config(tmp_path)
    m = run.ingest(cfg)
    assert configs[0] is cfg  # the source reads its own options (ingest.stac) from the config
    assert source.listings == [str(tmp_path)]
    assert m.skipped == {"cloud": 10, "s1_nodata": 5} and m.samples == 5
    assert m.listing == {"s2_scenes": 7, "paired": 5}
    items, _ = source.list("/in")
    assert m.plan_id == run._plan_id(cfg, items, 2, "scenes-v1") != run._plan_id(cfg, items, 2)
    source.digest = "scenes-v2"  # the search now returns other scenes: not the pinned plan
    with pytest.raises(run.IngestError, match="holds an ingest of a different input or options"):
        run.ingest(cfg)


def test_sidecars_written_before_skips_and_patch_sizes_still_merge(tmp_path, setup):
    setup(ListingSource({k: tiles(k) for k in "abcde"}))
    cfg = config(tmp_path)
    first = run.ingest(cfg)
    assert first.patch_min == [4, 4]
    for side in (tmp_path / "_parts").glob("*.tar.json"):
        record = json.loads(side.read_text())
        if record["partition"] != "pairs-000001.tar":
            continue
        # as older ingests wrote them: no skips, no patch size, no offsets (the index is read
        # from the shard's own headers), no sample digests (the dataset then has none)
        del record["skipped"], record["patch_min"], record["shard"]["offsets"], record["shard"]["digests"]
        side.write_text(json.dumps(record))
    again = run.ingest(cfg)  # a rerun: every partition committed, the manifest merged again
    assert again.samples == 5 and again.patch_min == [4, 4]
    assert again.index == first.index and first.digests is not None and again.digests is None
    assert sum(again.skipped.values()) < sum(first.skipped.values())


def test_unreadable_statistics_name_the_sidecar(tmp_path, setup):
    setup(TableSource({k: tiles(k) for k in "abc"}))
    cfg = config(tmp_path)
    run.ingest(cfg)
    side = tmp_path / "_parts" / "pairs-000000.tar.json"
    record = json.loads(side.read_text())
    record["stats"]["s1"] = {"garbled": True}
    side.write_text(json.dumps(record))
    with pytest.raises(run.IngestError) as e:
        run.ingest(cfg)
    assert str(e.value).startswith(f"{tmp_path}/_parts/pairs-000000.tar.json: unreadable statistics (")


def test_an_input_whose_first_items_all_fail_is_refused_naming_the_first(tmp_path, setup):
    source = TableSource({f"k{i:03d}": tiles(f"k{i:03d}") for i in range(run.PROBE_ITEMS + 1)})

    def unreadable(it):
        raise BadInput(f"/in/{it.key}.tif", "not a GeoTIFF")

    source.estimate_bytes = unreadable
    setup(source)
    with pytest.raises(run.IngestError) as e:
        run.ingest(config(tmp_path))
    assert str(e.value) == (f"none of the first {run.PROBE_ITEMS} of {run.PROBE_ITEMS + 1} inputs reads (the first: "
                            f"{BadInput('/in/k000.tif', 'not a GeoTIFF')}); is --input the right dataset?")
