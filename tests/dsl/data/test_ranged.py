"""``dsl.data.ranged``: byte-range reads that survive storage faults.

Fast tests drive :class:`RangeReader` with local files and a scripted fake filesystem (faults
on demand, sleeps recorded, never slept). Slow tests read from moto's S3 server through
:class:`FaultyProxy`, which resets connections, answers 503 ``SlowDown``, truncates bodies and
sends well-formed but short ones for real; the proxied s3fs client has its own retries (s3fs's and botocore's) turned off, so
every fault reaches the reader.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import http.server
import io
import pickle
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fixtures.faulty_proxy import FaultyProxy
from fixtures.services import make_bucket

from dsl.data.ranged import MAX_READ_BYTES, RangeReader, ShardUnavailable, is_transient

DATA = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()


class Sleeps(list):
    """A ``sleep`` that records instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# ---- a scripted fake filesystem -------------------------------------------------------------


class FakeFile(io.BytesIO):
    """An object's bytes; each ``read`` follows the filesystem's script, then reads normally.

    Script steps: ``("short", n)`` returns only ``n`` of the bytes asked for, ``("raise", exc)``
    raises ``exc``.
    """

    def __init__(self, fs: FakeFS, data: bytes):
        super().__init__(data)
        self.fs, self.size = fs, len(data)

    def read(self, n: int = -1) -> bytes:
        self.fs.reads.append((self.tell(), n))
        step = self.fs.script.pop(0) if self.fs.script else None
        if step is not None and step[0] == "raise":
            raise step[1]
        out = super().read(n)
        return out[: step[1]] if step is not None else out

    def close(self) -> None:
        self.fs.closed += 1
        super().close()


class FakeFS:
    """``filesystem`` for a reader: objects by path, a script of read faults, open/read records."""

    def __init__(self, objects: dict[str, bytes], script: list | None = None, open_error: Exception | None = None):
        self.objects, self.script, self.open_error = objects, list(script or []), open_error
        self.opens: list[str] = []
        self.reads: list[tuple[int, int]] = []  # (offset, size) of every read
        self.closed = 0

    def __call__(self, url: str) -> tuple[FakeFS, str]:
        return self, url.removeprefix("fake://")

    def open(self, path: str, mode: str, **kwargs) -> FakeFile:
        assert mode == "rb" and kwargs.get("cache_type") == "none"  # no read-ahead
        self.opens.append(path)
        if self.open_error is not None:
            raise self.open_error
        return FakeFile(self, self.objects[path])


def reader(fs=None, retries: int = 3, **kw) -> RangeReader:
    kw = {"backoff_s": 0.1, "max_backoff_s": 1.0, "sleep": Sleeps(), "seed": 0, **kw}
    return RangeReader(retries, filesystem=fs, **kw) if fs is not None else RangeReader(retries, **kw)


# ---- fast tests ------------------------------------------------------------------------------


def test_local_paths_and_file_urls_read_exact_ranges(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(DATA)
    with reader() as r:
        assert r.read(str(path), 10, 1010) == DATA[10:1010]
        assert r.read(path.as_uri(), 99_000, 100_000) == DATA[99_000:]
        assert r.read(str(path), 5, 5) == b""
        assert r.read(str(path), 0, 3) == DATA[:3]  # backwards on the same handle
        assert (r.retried, r.failed_reads) == (0, 0)


def test_a_short_read_keeps_its_bytes_and_continues_after_them():
    fs = FakeFS({"a": DATA}, script=[("short", 100), ("raise", ConnectionResetError("reset")), ("short", 50)])
    r = reader(fs, retries=5)
    assert r.read("fake://a", 1000, 2000) == DATA[1000:2000]
    # each retry reopens the object and asks only for what is still missing
    assert fs.reads == [(1000, 1000), (1100, 900), (1100, 900), (1150, 850)]
    assert fs.opens == ["a"] * 4 and fs.closed == 3
    assert r.retried == 3 and r.failed_reads == 0 and not r.bad_urls
    assert r.read("fake://a", 0, 10) == DATA[:10] and len(fs.opens) == 4  # the healthy handle is kept


def test_backoff_doubles_up_to_its_cap_with_seeded_jitter_then_gives_up():
    def fail() -> tuple[RangeReader, Sleeps, ShardUnavailable]:
        fs = FakeFS({"a": DATA}, script=[("raise", TimeoutError("read timed out"))] * 10)
        r = reader(fs, retries=5, backoff_s=0.1, max_backoff_s=0.5, seed=7)
        with pytest.raises(ShardUnavailable) as e:
            r.read("fake://a", 10, 20)
        assert len(fs.opens) == 6  # first attempt + 5 retries, each on a reopened object
        return r, r.sleep, e.value

    r, sleeps, error = fail()
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert len(sleeps) == 5 and all(c / 2 <= s <= c for s, c in zip(sleeps, caps, strict=True))
    assert len(set(sleeps)) == 5  # jittered, not the bare caps
    assert fail()[1] == sleeps  # the same seed, the same waits
    assert r.retried == 5 and r.failed_reads == 1 and "fake://a" in r.bad_urls
    message = str(error)
    assert "fake://a" in message and "[10, 20)" in message and "6 times" in message
    assert "TimeoutError: read timed out" in message
    assert (error.url, error.start, error.end) == ("fake://a", 10, 20)
    assert isinstance(error, OSError)


def test_zero_retries_gives_up_at_the_first_fault():
    fs = FakeFS({"a": DATA}, script=[("raise", OSError("boom"))])
    r = reader(fs, retries=0)
    with pytest.raises(ShardUnavailable, match="failed 1 times"):
        r.read("fake://a", 0, 10)
    assert r.retried == 0 and r.sleep == []


def test_a_failed_url_fails_fast_and_other_urls_still_read():
    fs = FakeFS({"a": DATA, "b": DATA}, script=[("raise", ConnectionError("down"))] * 3)
    r = reader(fs, retries=2)
    with pytest.raises(ShardUnavailable):
        r.read("fake://a", 0, 10)
    opens, reads = len(fs.opens), len(fs.reads)
    with pytest.raises(ShardUnavailable, match=r"fake://a bytes \[50, 60\): shard failed before.*ConnectionError"):
        r.read("fake://a", 50, 60)
    assert (len(fs.opens), len(fs.reads)) == (opens, reads)  # no traffic
    assert r.failed_reads == 2 and r.retried == 2
    assert r.read("fake://b", 0, 10) == DATA[:10]


@pytest.mark.parametrize("error", [FileNotFoundError("no such key"), PermissionError("access denied")])
def test_missing_or_forbidden_objects_are_not_retried(error):
    fs = FakeFS({}, open_error=error)
    r = reader(fs)
    with pytest.raises(ShardUnavailable, match=f"fake://x bytes \\[0, 5\\): {type(error).__name__}, not retried"):
        r.read("fake://x", 0, 5)
    assert fs.opens == ["x"] and r.sleep == [] and r.retried == 0 and "fake://x" in r.bad_urls


def test_a_range_beyond_the_object_is_not_retried(tmp_path):
    path = tmp_path / "short.tar"
    path.write_bytes(DATA[:100])
    r = reader()
    with pytest.raises(ShardUnavailable, match=r"short.tar bytes \[90, 110\): range ends beyond the object's 100"):
        r.read(str(path), 90, 110)
    assert r.sleep == [] and r.failed_reads == 1


@pytest.mark.parametrize("start,end", [(-1, 5), (10, 5), (0, MAX_READ_BYTES + 1)])
def test_bad_ranges_are_refused_before_any_io(start, end):
    fs = FakeFS({"a": DATA})
    with pytest.raises(ValueError, match=rf"fake://a: bad byte range \[{start}, {end}\)"):
        reader(fs).read("fake://a", start, end)
    assert fs.opens == []


def test_an_error_that_is_no_storage_fault_is_not_hidden():
    fs = FakeFS({"a": DATA}, script=[("raise", KeyError("bug"))])
    r = reader(fs)
    with pytest.raises(KeyError):
        r.read("fake://a", 0, 5)
    assert not r.bad_urls and r.sleep == []


def test_settings_are_validated():
    for kw in ({"retries": -1}, {"backoff_s": -1.0}, {"max_backoff_s": -1.0}, {"max_open": 0}):
        with pytest.raises(ValueError, match="RangeReader"):
            RangeReader(**{"retries": 1, "backoff_s": 0.1, "max_backoff_s": 1.0, **kw})


def test_open_files_are_few_and_closed():
    fs = FakeFS({k: DATA for k in "abc"})
    r = reader(fs, max_open=2)
    for k in "abca":
        assert r.read(f"fake://{k}", 0, 4) == DATA[:4]
    assert fs.opens == ["a", "b", "c", "a"] and fs.closed == 2  # a, then b evicted
    r.close()
    assert fs.closed == 4


def test_errors_are_sorted_into_transient_and_permanent():
    def network_error(module: str, status: int | None = None) -> Exception:
        cls = type("SomeError", (Exception,), {"__module__": module})
        e = cls("x")
        if status is not None:
            e.response = {"ResponseMetadata": {"HTTPStatusCode": status}}
        return e

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError()) and is_transient(OSError(16, "busy"))
    assert is_transient(http.client.IncompleteRead(b"")) and is_transient(network_error("aiohttp.client_exceptions"))
    assert is_transient(network_error("botocore.exceptions", 503)) and is_transient(network_error("botocore", 429))
    assert not is_transient(network_error("botocore.exceptions", 403))
    assert not is_transient(FileNotFoundError()) and not is_transient(PermissionError())
    assert not is_transient(ValueError()) and not is_transient(network_error("mylib"))


def test_readers_and_errors_cross_process_boundaries(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(DATA)
    r = RangeReader(2, 0.0, 0.0, seed=1)
    r.read(str(path), 0, 10)
    r.bad_urls["gone"] = "why"
    copy = pickle.loads(pickle.dumps(r))  # open files are left behind, reopened on demand
    assert copy.bad_urls == {"gone": "why"} and not copy._open
    assert copy.read(str(path), 5, 15) == DATA[5:15]
    r.close()
    copy.close()
    e = pickle.loads(pickle.dumps(ShardUnavailable("m", "u", 1, 2)))
    assert (str(e), e.url, e.start, e.end) == ("m", "u", 1, 2)
    assert str(ShardUnavailable("only a message")) == "only a message"  # as DataLoader re-raises it


# ---- the proxy itself, in front of a stdlib server ------------------------------------------------


@contextlib.contextmanager
def tiny_server(body: bytes) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering every GET with ``body``; its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_proxy_injects_each_fault_and_leaves_nothing_running():
    threads = threading.active_count()
    with tiny_server(DATA[:1000]) as upstream, FaultyProxy(upstream, seed=3) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")

        def get(path: str) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        assert get("/x?q=1") == (200, DATA[:1000])
        proxy.faults = {"503": 1.0}
        status, body = get("/x")
        assert status == 503 and b"<Code>SlowDown</Code>" in body
        proxy.faults = {"reset": 1.0}
        with pytest.raises(ConnectionResetError) as reset:
            get("/x")
        assert reset.value.errno == errno.ECONNRESET  # an RST, not a clean close (RemoteDisconnected)
        proxy.faults = {"truncate": 1.0}
        with pytest.raises(http.client.IncompleteRead):
            get("/x")
        proxy.faults = {"short": 1.0}
        assert get("/x") == (200, DATA[:500])
        proxy.faults = {}
        proxy.fail_paths = {"/bad"}
        assert get("/bad")[0] == 503 and get("/x")[0] == 200
        # the proxy's thread counts after the client has its answer: wait for the counts, bounded
        expected = ({"/x": 6, "/bad": 1}, {"/x": 4, "/bad": 1}, {"503": 2, "reset": 1, "truncate": 1, "short": 1},
                    1000 + 500 + 500 + 1000 + len(body))
        deadline = time.monotonic() + 10
        while (counts := (proxy.requests, proxy.faulted, proxy.kinds, proxy.bytes_served.get("/x"))) != expected:
            assert time.monotonic() < deadline, counts
            time.sleep(0.01)
        with pytest.raises(ValueError, match="kinds must be in"):
            proxy.faults = {"slow": 0.5}
        with pytest.raises(ValueError, match="summing to <= 1"):
            proxy.faults = {"503": 0.6, "reset": 0.6}
        proxy.fail_paths = set()
        idle = http.client.HTTPConnection(host, int(port), timeout=10)  # kept alive through close()
        idle.request("GET", "/x")
        assert idle.getresponse().read() == DATA[:1000]
        closing = time.monotonic()
    assert time.monotonic() - closing < 5  # the idle connection was cut, not waited for
    assert threading.active_count() == threads  # server and connection threads all joined
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5)


# ---- through the faulty proxy to moto's S3 -------------------------------------------------------

BUCKET = "dsl-ranged"


@pytest.fixture
def s3(s3_server) -> Iterator[tuple[FaultyProxy, dict[str, bytes]]]:
    """A proxy in front of moto and objects behind it (path -> bytes, written past the proxy)."""
    import s3fs

    make_bucket(BUCKET)
    rng = np.random.default_rng(1)
    objects = {f"{BUCKET}/{name}": rng.integers(0, 256, size, dtype=np.uint8).tobytes()
               for name, size in [("a.tar", 300_000), ("b.tar", 1_000_000), ("c.tar", 40_000), ("big.tar", 4 << 20)]}
    direct = s3fs.S3FileSystem(skip_instance_cache=True)
    for path, data in objects.items():
        direct.pipe_file(path, data)
    with FaultyProxy(s3_server, seed=1234) as proxy:
        yield proxy, objects
    direct.rm(list(objects))


def via(proxy: FaultyProxy):
    """``filesystem`` for a reader: s3fs at the proxy, its own retries off (one attempt each).

    botocore's ``max_attempts`` counts retries only; ``total_max_attempts`` counts the first try too.
    """
    import s3fs

    # skip_instance_cache: a cached instance would keep talking to whatever endpoint it was made for
    fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=proxy.url,
                           config_kwargs={"retries": {"total_max_attempts": 1}})
    fs.retries = 1  # s3fs's own retry loop (a class attribute, not a constructor argument)
    return lambda url: (fs, url.removeprefix("s3://"))


@pytest.mark.slow
def test_faulty_store_still_gives_exact_bytes(s3):
    proxy, objects = s3
    proxy.faults = {"503": 0.08, "reset": 0.08, "truncate": 0.08, "short": 0.06}
    r = RangeReader(10, 0.001, 0.01, seed=0, filesystem=via(proxy))
    rng = np.random.default_rng(2)
    names = [p for p in objects if not p.endswith("big.tar")]
    for _ in range(200):
        path = names[rng.integers(len(names))]
        data = objects[path]
        start = int(rng.integers(0, len(data) - 1))
        end = int(rng.integers(start + 1, min(len(data), start + 65536) + 1))
        assert r.read(f"s3://{path}", start, end) == data[start:end]
    r.close()
    assert r.failed_reads == 0 and not r.bad_urls
    assert r.retried > 0 and all(proxy.kinds[k] > 0 for k in ("503", "reset", "truncate", "short")), (r.retried, proxy.kinds)


@pytest.mark.slow
def test_a_shard_that_keeps_failing_is_given_up_then_fails_fast(s3):
    proxy, objects = s3
    bad = f"{BUCKET}/a.tar"
    proxy.fail_paths = {f"/{bad}"}
    sleeps = Sleeps()
    r = RangeReader(3, 0.001, 0.01, sleep=sleeps, seed=0, filesystem=via(proxy))
    with pytest.raises(ShardUnavailable, match=rf"s3://{bad} bytes \[0, 100\): failed 4 times, last error: OSError"):
        r.read(f"s3://{bad}", 0, 100)
    assert proxy.requests[f"/{bad}"] == 4 and len(sleeps) == 4 - 1 and r.retried == 3
    with pytest.raises(ShardUnavailable, match="failed before"):
        r.read(f"s3://{bad}", 500, 600)
    assert proxy.requests[f"/{bad}"] == 4  # fail fast: nothing more reached the store
    good = f"{BUCKET}/c.tar"
    assert r.read(f"s3://{good}", 10, 20) == objects[good][10:20]
    r.close()


@pytest.mark.slow
def test_a_missing_object_is_not_retried(s3):
    proxy, _ = s3
    sleeps = Sleeps()
    r = RangeReader(3, 0.001, 0.01, sleep=sleeps, filesystem=via(proxy))
    with pytest.raises(ShardUnavailable, match=rf"s3://{BUCKET}/nope.tar bytes \[0, 10\): FileNotFoundError, not retried"):
        r.read(f"s3://{BUCKET}/nope.tar", 0, 10)
    assert proxy.requests[f"/{BUCKET}/nope.tar"] == 1 and sleeps == [] and r.retried == 0


@pytest.mark.slow
def test_reading_two_small_ranges_of_a_big_object_downloads_only_them(s3):
    proxy, objects = s3
    path = f"{BUCKET}/big.tar"
    r = RangeReader(2, 0.001, 0.01, filesystem=via(proxy))
    for start in (1 << 20, 3 << 20):
        assert r.read(f"s3://{path}", start, start + 1024) == objects[path][start:start + 1024]
    r.close()
    assert 2048 <= proxy.bytes_served[f"/{path}"] < 256 << 10, proxy.bytes_served
