"""ingest.listing.find_files: the paths fs.find gives, listed folder by folder concurrently."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from ingest.listing import _prefixes, find_files
from ingest.synth import synthesise


class Wrapped:
    """A filesystem that passes every call on and counts ``find`` calls in flight.

    ``barrier``: every ``find`` waits there (timeout: sequential calls break it instead of
    hanging), so a test passes only if that many walks run at the same time.
    ``fail``: ``find`` of this folder raises ``PermissionError`` (a multi-line message).
    """

    def __init__(self, fs, protocol: str = "wrapped", barrier: threading.Barrier | None = None,
                 fail: str | None = None, prefix: bool = False):
        self.fs, self.protocol, self.barrier, self.fail = fs, protocol, barrier, fail
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        self.finds: list[tuple[str, str]] = []
        if prefix:  # as s3fs and gcsfs: find(path, prefix=...) walks names starting with prefix
            self.find = self._find_prefix

    def _strip_protocol(self, path):
        return self.fs._strip_protocol(path)

    def unstrip_protocol(self, path):
        return f"{self.protocol}://{path}"

    def invalidate_cache(self, path=None):
        self.fs.invalidate_cache(path)

    def ls(self, path, detail=True, **kwargs):
        return self.fs.ls(path, detail=detail, **kwargs)

    def find(self, path, **kwargs):
        return self._find_prefix(path, **kwargs)

    def _find_prefix(self, path, prefix="", **kwargs):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.finds.append((path, prefix))
        try:
            if self.barrier is not None:
                self.barrier.wait()
            if self.fail and path.endswith(self.fail):
                raise PermissionError("Access Denied\n<Error><Code>AccessDenied</Code></Error>")
            found = self.fs.find(path, **kwargs)
            return [p for p in found if p[len(path) + 1:].startswith(prefix)]
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def tree(tmp_path) -> Path:
    raw = tmp_path / "raw"
    synthesise(raw, "dfc2020", 6, seed=3, size=16)
    (raw / "README.txt").write_text("a file at the top")
    (raw / "ROIs0000_test" / "NOTES.txt").write_text("a file one level down")
    return raw


def test_local_is_fs_find(tree):
    fs = LocalFileSystem()
    expected = sorted(fs.find(str(tree)))
    assert len(expected) > 20
    assert find_files(str(tree)) == expected
    assert find_files(tree.as_uri()) == expected
    fs = Wrapped(LocalFileSystem(), protocol="file")
    assert find_files(str(tree), fs) == expected and fs.finds == [(str(tree), "")]  # one walk: no round trips to save


def test_concurrent_walk_matches_find(tree):
    # a non-local protocol takes the object-store path over the same local tree
    fs = Wrapped(LocalFileSystem())
    expected = sorted(LocalFileSystem().find(str(tree)))
    assert find_files(str(tree), fs, workers=4) == expected  # 2 folders < 4 workers: one level deeper
    assert fs.finds and all(Path(p).parent.parent == tree for p, _ in fs.finds)
    fs.finds.clear()
    assert find_files(str(tree), fs, workers=1) == expected  # 2 folders: walked as they are
    assert fs.finds and all(p != str(tree) for p, _ in fs.finds)  # never one walk of the whole root


def test_memory_store_matches_find(tree):
    mem = fsspec.filesystem("memory")
    root = f"/listing-{uuid.uuid4().hex}"
    try:
        for f in sorted(tree.rglob("*")):
            if f.is_file():
                mem.pipe(f"{root}/{f.relative_to(tree)}", f.read_bytes())
        assert find_files(f"memory://{root}") == sorted(mem.find(root))
    finally:
        mem.rm(root, recursive=True)


def test_walks_overlap_in_time(tree):
    folders = sorted(p for p in tree.iterdir() if p.is_dir())
    # one barrier party per folder: walks made one after another would break it instead
    fs = Wrapped(LocalFileSystem(), barrier=threading.Barrier(len(folders), timeout=20))
    assert find_files(str(tree), fs, workers=len(folders)) == sorted(LocalFileSystem().find(str(tree)))
    assert fs.most == len(folders) == len(fs.finds)


def test_sequential_walks_break_the_barrier(tree):
    """The overlap test's guard bites: one worker cannot bring two walks to the barrier."""
    fs = Wrapped(LocalFileSystem(), barrier=threading.Barrier(2, timeout=0.5))
    with pytest.raises(OSError, match="BrokenBarrierError"):
        find_files(str(tree), fs, workers=1)


def test_error_names_the_prefix_in_one_line(tree):
    fs = Wrapped(LocalFileSystem(), protocol="s3", fail="ROIs0000_test")
    with pytest.raises(PermissionError) as e:
        find_files(str(tree), fs, workers=1)
    assert str(e.value) == f"listing s3://{tree}/ROIs0000_test failed: PermissionError: Access Denied"
    with pytest.raises(FileNotFoundError, match=r"^listing wrapped://.*/nowhere failed: FileNotFoundError"):
        find_files(str(tree / "nowhere"), Wrapped(LocalFileSystem()))


def test_many_folders_walked_by_name_prefix(tmp_path):
    names = [f"S2A_{d:03d}" for d in range(40)] + ["S1B_1", "S1B_10"]
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / f"{n}_B01.tif").write_bytes(b"x")
    expected = sorted(LocalFileSystem().find(str(tmp_path)))
    fs = Wrapped(LocalFileSystem(), prefix=True)
    assert find_files(str(tmp_path), fs, workers=1, max_units=8) == expected
    assert 1 < len(fs.finds) <= 8 and all(p == str(tmp_path) and pre for p, pre in fs.finds)
    # a filesystem without prefix walks: the parent whole, once
    fs = Wrapped(LocalFileSystem())
    assert find_files(str(tmp_path), fs, workers=1, max_units=8) == expected and fs.finds == [(str(tmp_path), "")]


def test_prefixes_cover_every_name():
    names = ["S2A_001", "S2A_002", "S2B_001", "S1A_7", "S1"]
    for budget in range(1, 8):
        cut = _prefixes(names, budget)
        assert len(cut) <= budget and all(any(n.startswith(p) for p in cut) for n in names)
    assert _prefixes(names, 3) == ["S1", "S2A_00", "S2B_00"]  # the longest that fit
    assert _prefixes(names, 1) == ["S"]
    assert _prefixes(["S1B_1", "S1B_10", "S1B_2"], 2) == ["S1B_1", "S1B_2"]


@pytest.mark.slow  # starts moto's S3 server
def test_s3_matches_find_and_walks_concurrently(tmp_path, s3_server):
    import s3fs
    from fixtures.services import make_bucket

    raw = tmp_path / "raw"
    synthesise(raw, "sen12ms", 6, seed=4, size=16)
    bucket = make_bucket("dsl-listing")
    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    prefix = f"{bucket}/raw-{uuid.uuid4().hex[:8]}"
    s3.put(str(raw), prefix, recursive=True)
    try:
        root = prefix[len("s3://"):]
        expected = sorted(s3.find(root))
        assert len(expected) == len([p for p in raw.rglob("*") if p.is_file()])
        assert find_files(prefix) == expected
        # the scene folders (one level below the seasons) listed at the same time, through real s3fs
        scenes = [p for season in raw.iterdir() for p in season.iterdir()]
        fs = Wrapped(s3, protocol="s3", barrier=threading.Barrier(len(scenes), timeout=20))
        assert find_files(root, fs, workers=len(scenes)) == expected and fs.most == len(scenes)
        # many folders: walked by name prefix (s3fs's find(prefix=...)), still the same paths
        assert find_files(prefix, workers=2, max_units=2) == expected
        # one line naming the prefix: a bucket that is not there
        with pytest.raises(FileNotFoundError, match=r"^listing s3://dsl-no-such-bucket-x/raw failed: [^\n]*$"):
            find_files("s3://dsl-no-such-bucket-x/raw")
    finally:
        s3.rm(prefix, recursive=True)
