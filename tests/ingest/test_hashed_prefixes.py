"""Hashed prefixes: on object stores shards go under ``<4 hex>/`` so request rates spread over
key prefixes; the manifest names carry the prefix, so readers only join them to the root.

The local ingests run in this process (a stand-in source, partitions run serially); the S3 one
is the real command on a local Ray against moto's server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import s3fs
from fixtures.services import make_bucket

import ingest.run as run
from dsl.cli import main as cli
from dsl.contracts.config import IngestConfig
from dsl.contracts.shard_format import hashed_shard_path, shard_name
from dsl.contracts.storage import join, register_webdataset_handlers
from dsl.data.pairs import read_shard
from ingest.sources import PairItem
from ingest.sources.base import Pair
from ingest.synth import synthesise

HASHED = re.compile(r"[0-9a-f]{4}/pairs-\d{6}\.tar")


def test_the_prefix_is_four_hex_of_the_shard_names_sha1():
    name = "pairs-train-000001.tar"
    assert hashed_shard_path(name) == hashlib.sha1(name.encode()).hexdigest()[:4] + "/" + name
    prefixes = [hashed_shard_path(shard_name("pairs", "train", i)).split("/")[0] for i in range(64)]
    # consecutive shard numbers land all over the key space: every first hex digit is used
    assert len(set(prefixes)) == 64 and len({p[0] for p in prefixes}) == 16


@pytest.mark.parametrize(("output", "setting", "expected"), [
    ("/data/shards", None, False), ("work/shards", None, False), ("file:///data/shards", None, False),
    ("s3://bucket/shards", None, True), ("gs://bucket/shards", None, True), ("memory://shards", None, True),
    ("s3://bucket/shards", False, False), ("/data/shards", True, True)])
def test_on_by_default_for_object_stores_only(output, setting, expected):
    assert run.hashed_prefixes(IngestConfig(output=output, hashed_prefixes=setting)) is expected


def test_a_partition_knows_its_file_name_and_its_path():
    items = [PairItem(key=k, location=k, files=()) for k in "abc"]
    hashed = run.plan_partitions(items, 2, 0.0, "pairs", hashed=True)
    assert [(p.shard, p.path) for p in hashed] == [
        ("pairs-000000.tar", hashed_shard_path("pairs-000000.tar")),
        ("pairs-000001.tar", hashed_shard_path("pairs-000001.tar"))]
    assert [p.path for p in run.plan_partitions(items, 2, 0.0, "pairs")] == ["pairs-000000.tar", "pairs-000001.tar"]


# ---------------------------------------------------------------- local ingests, in this process


class Source:
    """Five items of one tile each."""

    def list(self, input_url: str):
        return [PairItem(key=k, location=k, files=(("s1", f"/in/{k}.tif"),)) for k in "abcde"], []

    def read(self, it: PairItem):
        return [Pair(key=it.key, location=it.location, s1=np.zeros((2, 4, 4), np.float32),
                     s2=np.ones((2, 4, 4), np.uint16), meta={"key": it.key, "s2_bands": ["B2", "B3"],
                                                             "s2_file": f"/in/{it.key}.tif"})]

    def estimate_bytes(self, it: PairItem) -> float:
        return 1000.0  # with shard_size_mb=0.002: two items per partition


@pytest.fixture
def in_process(monkeypatch):
    """Partitions run serially in this process; returns each run's todo (shard file names)."""
    calls = []
    monkeypatch.setattr(run, "get_source", lambda name, tile_size, cfg=None: Source())

    def tasks(cfg, todo, total_items, already, listing_bad):
        calls.append([p.shard for p in todo])
        for p in todo:
            run.write_partition(cfg, p)
        return 0.0

    monkeypatch.setattr(run, "_run_tasks", tasks)
    return calls


def config(out, **kw) -> IngestConfig:
    return IngestConfig(source="table", input="/in", output=str(out), shard_size_mb=0.002, progress=False, **kw)


def test_a_local_ingest_writes_no_prefixes_by_default(tmp_path, in_process):
    m = run.ingest(config(tmp_path))
    assert [s.name for s in m.shards] == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["_parts"]


def test_hashed_prefixes_asked_for_locally_resolve_and_resume(tmp_path, in_process):
    cfg = config(tmp_path, hashed_prefixes=True)
    m = run.ingest(cfg)
    plain = ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]
    assert [s.name for s in m.shards] == [hashed_shard_path(p) for p in plain]
    assert all(HASHED.fullmatch(s.name) for s in m.shards)
    assert not list(tmp_path.glob("*.tar"))
    # sidecars stay flat under their plain names: one listing of _parts finds them all
    assert {p.name for p in (tmp_path / "_parts").iterdir()} == {"plan.json", *(p + ".json" for p in plain)}
    for s in m.shards:
        assert (tmp_path / s.name).stat().st_size == s.bytes
        assert len(list(read_shard(join(str(tmp_path), s.name), wanted=("json",)))) == s.samples

    (tmp_path / "_parts" / "pairs-000001.tar.json").unlink()  # killed before partition 1 committed
    again = run.ingest(cfg)
    assert in_process == [plain, ["pairs-000001.tar"]]
    assert [s.model_dump() for s in again.shards] == [s.model_dump() for s in m.shards]
    run.ingest(cfg)
    assert len(in_process) == 2  # all committed: nothing to run


# ---------------------------------------------------------------- S3, the real command


@pytest.mark.slow
def test_an_ingest_to_s3_writes_under_hashed_prefixes_and_resumes(tmp_path, ray_session, monkeypatch, capsys):
    raw = tmp_path / "raw"
    synthesise(raw, "sen12ms", 12, seed=4, size=32)
    out = f"{make_bucket('dsl-prefixes')}/shards/s12"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    todo, real = [], run._run_tasks

    def recorded(cfg, parts, *rest):
        todo.append([p.shard for p in parts])
        return real(cfg, parts, *rest)

    monkeypatch.setattr(run, "_run_tasks", recorded)
    args = ["ingest", "--source", "sen12ms", "--input", str(raw), "--output", out, "--workers", "2",
            "--shard-size-mb", "0.1", "--no-progress"]
    try:
        assert cli(args) == 0, capsys.readouterr().err
        manifest = json.loads(fs.cat(f"{out}/manifest.json"))
        shards = manifest["shards"]
        names = [s["name"] for s in shards]
        assert len(names) >= 3 and all(HASHED.fullmatch(n) for n in names), names
        assert all(n == hashed_shard_path(n.split("/")[1]) for n in names)
        assert len({n.split("/")[0] for n in names}) >= 2
        root = {p.rsplit("/", 1)[-1] for p in fs.ls(out, detail=False)}
        assert root == {n.split("/")[0] for n in names} | {"_parts", "manifest.json", "index.npy", "digests.npy",
                                                              "quarantine.jsonl"}
        sidecars = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{out}/_parts", detail=False)}
        assert sidecars == {"plan.json", *(n.split("/")[1] + ".json" for n in names)}

        register_webdataset_handlers()
        for s in shards:  # a reader joins the manifest name to the dataset URL, nothing else
            assert fs.info(join(out, s["name"]))["size"] == s["bytes"]
            assert len(list(read_shard(join(out, s["name"]), wanted=("json",)))) == s["samples"]
        assert sum(s["samples"] for s in shards) == manifest["samples"] == 12

        # killed before one partition committed (its shard half-written or gone): a rerun redoes it
        victim = names[1]
        fs.rm(f"{out}/_parts/{victim.split('/')[1]}.json")
        fs.rm(f"{out}/{victim}")
        assert cli(args) == 0, capsys.readouterr().err
        fs.invalidate_cache()
        assert todo == [[n.split("/")[1] for n in sorted(names, key=lambda n: n.split("/")[1])],
                        [victim.split("/")[1]]]
        again = json.loads(fs.cat(f"{out}/manifest.json"))
        assert [(s["name"], s["sha256"]) for s in again["shards"]] == [(s["name"], s["sha256"]) for s in shards]
        assert fs.info(f"{out}/{victim}")["size"] == shards[1]["bytes"]
        assert cli(args) == 0 and len(todo) == 2  # everything committed: no task runs
    finally:
        fs.rm(out, recursive=True)
