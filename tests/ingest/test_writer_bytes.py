"""``ingest.writer`` byte for byte: the hand-written tar against tarfile and np.save, the commit
and abort of local and object-store (fsspec ``memory://``) shards, and the atomic small files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

import fsspec
import numpy as np
import pytest

from dsl.contracts.shard_index import sample_digest, scan_offsets
from ingest.sources.base import Pair
from ingest.writer import BLOCK, RECORD, ShardWriter, npy_chunks, sample_members, write_text_atomic


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(2, 2, 3),
    np.arange(24, dtype=np.uint16).reshape(2, 3, 4)[:, :, ::2],  # not contiguous
    np.zeros(8, dtype=np.uint8),
])
def test_npy_chunks_are_np_save(array):
    chunks = npy_chunks(array)
    assert len(chunks) == 2 and b"".join(bytes(c) for c in chunks) == npy_bytes(array)
    assert sum(len(c) for c in chunks) == len(npy_bytes(array))


def pair(dfc: bool) -> Pair:
    s1, s2 = np.ones((2, 4, 4), np.float32), np.full((13, 4, 4), 7, np.uint16)
    extra = {"cls": 3, "multi": np.eye(8, dtype=np.uint8)[3]} if dfc else {}
    return Pair(key="loc1", location="loc1", s1=s1, s2=s2, meta={"key": "loc1", "source": "t"}, dfc=np.full((4, 4), 3, np.uint8) if dfc
                else None, extra=extra)


def test_sample_members_in_the_shard_format():
    plain = sample_members(pair(False), "train", "plain")
    assert [n for n, _ in plain] == ["loc1.s1.npy", "loc1.s2.npy", "loc1.json"]
    compact = sample_members(pair(True), None)  # the default; its bytes: test_sample_encoding.py
    assert [n for n, _ in compact] == ["loc1.s1.blosc", "loc1.s2.blosc", "loc1.dfc.npy", "loc1.cls", "loc1.multi.npy",
                                       "loc1.json"]
    labelled = dict(sample_members(pair(True), None, "plain"))
    assert list(labelled) == ["loc1.s1.npy", "loc1.s2.npy", "loc1.dfc.npy", "loc1.cls", "loc1.multi.npy", "loc1.json"]
    assert labelled["loc1.cls"] == [b"3"]
    joined = {n: b"".join(bytes(c) for c in chunks) for n, chunks in labelled.items()}
    assert joined["loc1.multi.npy"] == npy_bytes(np.eye(8, dtype=np.uint8)[3])
    assert joined["loc1.dfc.npy"] == npy_bytes(np.full((4, 4), 3, np.uint8))
    assert json.loads(joined["loc1.json"]) == {"key": "loc1", "source": "t", "split": None}
    assert json.loads(b"".join(bytes(c) for c in plain[2][1]))["split"] == "train"
    assert pair(False).meta == {"key": "loc1", "source": "t"}  # the pair's own meta is left alone


def fill(name: str, n: int) -> bytes:
    return bytes([sum(name.encode()) % 251 + 1]) * n


def members(sizes: dict[str, int]) -> list[tuple[str, list]]:
    return [(name, [fill(name, n)]) for name, n in sizes.items()]


def check_tar(path: Path, info: dict, sizes: dict[str, int], samples: int) -> None:
    data = path.read_bytes()
    info = dict(info)
    offsets, digests = info.pop("offsets"), info.pop("digests")
    assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "samples": samples}
    # each sample's digest is of exactly its index range: what a loader's range read gets
    assert digests == [sample_digest(data[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    # the recorded offsets are where tar's own reader finds each sample, and the last one's end
    assert offsets == scan_offsets(str(path)) and len(offsets) == samples + 1
    assert offsets[-1] == len(data.rstrip(b"\0")) + -len(data.rstrip(b"\0")) % 512
    assert len(data) % RECORD == 0
    with tarfile.open(path) as tar:
        got = tar.getmembers()
        assert [m.name for m in got] == list(sizes)
        for m in got:
            assert (m.size, m.mode, m.mtime, m.isreg()) == (sizes[m.name], 0o444, 0, True)
            assert tar.extractfile(m).read() == fill(m.name, sizes[m.name])


def test_local_shard_is_a_plain_tar_committed_by_rename(tmp_path):
    url = str(tmp_path / "a" / "b" / "pairs-000000.tar")  # folders made on the way
    w = ShardWriter(url)
    assert w.local and re.fullmatch(re.escape(url) + r"\.tmp-[0-9a-f]{8}", w.tmp_path)
    assert os.path.dirname(w.tmp_path) == os.path.dirname(url) and not os.path.exists(url)
    sizes = {"k0.s1.npy": 700, "k0.json": 513, "k1.s1.npy": 1, "k1.json": 0}  # data ends at 4608
    w.add(members(dict(list(sizes.items())[:2])))
    w.add(members(dict(list(sizes.items())[2:])))
    assert w.count == 2
    info = w.commit()
    assert not os.path.exists(w.tmp_path) and os.listdir(os.path.dirname(url)) == ["pairs-000000.tar"]
    check_tar(Path(url), info, sizes, 2)
    assert info["bytes"] == RECORD and Path(url).read_bytes()[4608:] == b"\0" * (RECORD - 4608)
    # the same samples again: byte-identical (mtime 0), so a rerun's shard equals the first
    again = ShardWriter(url)
    again.add(members(dict(list(sizes.items())[:2])))
    again.add(members(dict(list(sizes.items())[2:])))
    assert again.commit() == info


def test_end_of_archive_then_a_full_record(tmp_path):
    # data ends 1024 bytes before a record boundary: the two zero blocks fill it exactly
    url = str(tmp_path / "s.tar")
    w = ShardWriter(url)
    w.add(members({"k.bin": RECORD - 3 * BLOCK}))  # header + 17 blocks of data = 9216
    info = w.commit()
    assert info["bytes"] == RECORD
    check_tar(Path(url), info, {"k.bin": RECORD - 3 * BLOCK}, 1)
    assert Path(url).read_bytes()[-2 * BLOCK:] == b"\0" * (2 * BLOCK)


def test_names_keep_undecodable_bytes(tmp_path):
    name = os.fsdecode(b"loc\xff.json")  # a file name that was not UTF-8, surrogate-escaped
    w = ShardWriter(str(tmp_path / "s.tar"))
    w.add([(name, [b"{}"])])
    w.commit()
    with tarfile.open(tmp_path / "s.tar", encoding="utf-8", errors="surrogateescape") as tar:
        assert tar.getnames() == [name]


def test_abort_leaves_nothing(tmp_path):
    url = str(tmp_path / "s.tar")
    w = ShardWriter(url)
    w.add(members({"k.json": 3}))
    w.abort()
    assert w._file.closed and os.listdir(tmp_path) == []
    w.abort()  # twice is fine


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    yield fs
    fs.store.clear()


def test_object_store_shard_is_one_put_from_a_local_temp(memfs):
    before = set(os.listdir(tempfile.gettempdir()))
    w = ShardWriter("memory://bucket/ds/pairs-000001.tar")
    assert not w.local and w.tmp_path.endswith(".tar") and os.path.dirname(w.tmp_path) == tempfile.gettempdir()
    assert not memfs.exists("/bucket/ds/pairs-000001.tar")
    w.add(members({"k.s1.npy": 10}))
    info = w.commit()
    assert not os.path.exists(w.tmp_path) and set(os.listdir(tempfile.gettempdir())) == before
    data = memfs.cat_file("/bucket/ds/pairs-000001.tar")
    assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "samples": 1,
                    "offsets": [0, 1024], "digests": [sample_digest(data[:1024])]}
    assert len(data) == RECORD and data[2 * BLOCK:] == b"\0" * (RECORD - 2 * BLOCK)  # one member, then zeros
    w = ShardWriter("memory://bucket/ds/pairs-000002.tar")
    w.abort()
    assert not os.path.exists(w.tmp_path) and not memfs.exists("/bucket/ds/pairs-000002.tar")


def test_a_failed_upload_leaves_no_temp(memfs, monkeypatch):
    w = ShardWriter("memory://bucket/ds/pairs-000003.tar")
    w.add(members({"k.json": 2}))

    def boom(*_):
        raise OSError("simulated: upload refused")

    monkeypatch.setattr(w.fs, "put_file", boom)
    with pytest.raises(OSError, match="simulated"):
        w.commit()
    assert not os.path.exists(w.tmp_path)


def test_write_text_atomic_local_and_remote(tmp_path, memfs):
    path = tmp_path / "x" / "y" / "_parts" / "plan.json"
    write_text_atomic(str(path), "first")
    write_text_atomic(str(path), "second")  # replaces, in a folder that exists now
    assert path.read_text() == "second" and os.listdir(path.parent) == ["plan.json"]
    write_text_atomic("memory://bucket/ds/manifest.json", '{"a": 1}')
    assert memfs.cat_file("/bucket/ds/manifest.json") == b'{"a": 1}'


def test_npy_chunks_view_the_data_as_unsigned_bytes():
    """The data chunk compares equal to the bytes np.save writes, bytes >= 128 included."""
    array = np.arange(250, 256, dtype=np.uint8)
    header, data = npy_chunks(array)
    assert data == npy_bytes(array)[len(header):] and data.format == "B" and data.tolist() == list(range(250, 256))


def test_s1_member_at_the_ends_of_the_fixed_point_range():
    """Values rounding just past int16 are clipped to its ends (error < 0.01 dB), not wrapped."""
    import warnings

    from ingest.writer import s1_member

    for value in (-32768.6 / 64, 32767.6 / 64):
        ext, _, error = s1_member(np.full((2, 4, 4), value, np.float32))
        assert ext == "s1.blosc" and 0.009 < error <= 0.01, value
    assert s1_member(np.zeros((2, 0, 0), np.float32))[:1] == ("s1.blosc",)  # nothing to compare: no error
    for bad in (np.nan, 1e38):  # out of the fixed point: full precision, float32, without a warning
        s1 = np.zeros((2, 4, 4), np.float64)
        s1[0, 0, 0] = bad
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ext, chunks, error = s1_member(s1)
        assert ext == "s1.npy" and error == 0.0
        assert b"".join(bytes(c) for c in chunks) == npy_bytes(s1.astype(np.float32))
