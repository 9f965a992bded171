"""How ``ingest.run`` reads its sidecars back: a pool of threads, one read (one GET) each, no
existence check first, in the plan's order; a missing one reads as None."""

from __future__ import annotations

import json
import threading

import pytest
from fixtures.faulty_proxy import FaultyProxy
from fixtures.services import make_bucket
from fsspec.implementations.local import LocalFileSystem

import ingest.run as run
from ingest.sources import PairItem


def parts(n: int) -> list[run.Partition]:
    return [run.Partition(None, i, (PairItem(f"k{i}", "l", (("s1", f"/in/{i}"),)),)) for i in range(n)]


class CountingFS(LocalFileSystem):
    """The local filesystem, counting calls; the first ``overlap`` reads wait for each other."""

    def __init__(self, overlap: int = 0):
        super().__init__(skip_instance_cache=True)
        self.calls, self.threads, self.lock = [], set(), threading.Lock()
        self.barrier = threading.Barrier(overlap, timeout=20) if overlap else None

    def _note(self, name: str, path: str) -> None:
        with self.lock:
            self.calls.append((name, path.rsplit("/", 1)[-1]))
            self.threads.add(threading.get_ident())
            first = sum(1 for c in self.calls if c[0] == "cat_file")

        if name == "cat_file" and self.barrier is not None and first <= self.barrier.parties:
            self.barrier.wait()  # only returns once that many reads are in flight at once

    def cat_file(self, path, *args, **kwargs):
        self._note("cat_file", path)
        return super().cat_file(path, *args, **kwargs)

    def exists(self, path, **kwargs):
        self._note("exists", path)
        return super().exists(path, **kwargs)

    def info(self, path, **kwargs):
        self._note("info", path)
        return super().info(path, **kwargs)


def write_sidecars(out, ps: list[run.Partition], skip: set[int] = frozenset()) -> dict[str, dict]:
    (out / run.PARTS).mkdir(parents=True)
    written = {}
    for p in ps:
        if p.index not in skip:
            written[p.shard] = {"partition": p.shard, "keys": [f"k{p.index}"], "n": p.index}
            (out / run.PARTS / (p.shard + ".json")).write_text(json.dumps(written[p.shard]))
    return written


def test_parallel_reads_equal_serial_ones_one_read_each(tmp_path, monkeypatch):
    ps = parts(40)
    written = write_sidecars(tmp_path, ps, skip={7, 31})
    fs = CountingFS(overlap=4)
    monkeypatch.setattr(run, "filesystem", lambda url: (fs, url))
    parallel = list(run.read_sidecars(str(tmp_path), ps, threads=8))
    assert len(fs.threads) >= 4  # the first four reads were in flight together (the barrier let them go)
    assert sorted(fs.calls) == sorted(("cat_file", p.shard + ".json") for p in ps)  # no exists or info
    fs.barrier = None
    serial = list(run.read_sidecars(str(tmp_path), ps, threads=1))
    assert parallel == serial == [(p, written.get(p.shard)) for p in ps]  # in plan order; missing: None
    assert list(run.read_sidecars(str(tmp_path), [])) == []


def test_a_merge_that_stops_early_leaves_no_reads_running(tmp_path, monkeypatch):
    ps = parts(200)
    write_sidecars(tmp_path, ps)
    fs = CountingFS()
    monkeypatch.setattr(run, "filesystem", lambda url: (fs, url))
    reads = run.read_sidecars(str(tmp_path), ps, threads=2)
    next(reads)
    reads.close()  # as the merge does when a sidecar is missing: the queued reads are cancelled
    done = len(fs.calls)
    assert 1 <= done <= len(ps)
    assert not any(t.name.startswith("ThreadPoolExecutor") for t in threading.enumerate())  # pool joined
    assert len(fs.calls) == done  # nothing still running after close() returned


def test_committed_sidecars_list_once_and_a_missing_folder_is_empty(tmp_path):
    assert run.committed_sidecars(str(tmp_path / "nothing")) == set()
    write_sidecars(tmp_path, parts(3), skip={1})
    assert run.committed_sidecars(str(tmp_path)) == {"pairs-000000.tar.json", "pairs-000002.tar.json"}


@pytest.mark.slow  # moto's S3 server behind the counting proxy
def test_on_s3_each_sidecar_is_one_get(s3_server, monkeypatch):
    import s3fs

    bucket = make_bucket("dsl-sidecars").removeprefix("s3://")
    ps = parts(12)
    direct = s3fs.S3FileSystem(skip_instance_cache=True)
    for p in ps[:-2]:
        direct.pipe_file(f"{bucket}/out/{run.PARTS}/{p.shard}.json", json.dumps({"n": p.index}).encode())
    with FaultyProxy(s3_server) as proxy:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=proxy.url)
        monkeypatch.setattr(run, "filesystem", lambda url: (fs, url.removeprefix("s3://")))
        got = list(run.read_sidecars(f"s3://{bucket}/out", ps))
        requests = dict(proxy.requests)
    assert got == [(p, {"n": p.index} if p.index < 10 else None) for p in ps]
    # present or not, one request each (s3fs's plain cat_file would add a HEAD, exists + open two)
    assert requests == {f"/{bucket}/out/{run.PARTS}/{p.shard}.json": 1 for p in ps}
    direct.rm(f"{bucket}/out", recursive=True)


def test_the_reader_pool_is_bounded_by_threads_and_parts(tmp_path, monkeypatch):
    sizes = []

    class Recording(run.ThreadPoolExecutor):
        def __init__(self, max_workers=None):
            sizes.append(max_workers)
            super().__init__(max_workers)

    monkeypatch.setattr(run, "ThreadPoolExecutor", Recording)
    ps = parts(5)
    write_sidecars(tmp_path, ps)
    for threads in (1, 3, 64):
        assert len(list(run.read_sidecars(str(tmp_path), ps, threads=threads))) == 5
    assert sizes == [1, 3, 5]  # never more threads than asked for, nor than sidecars to read
