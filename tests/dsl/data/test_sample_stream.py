"""dsl.data.pairs.SampleStream on real shards: sample-level dealing, resume on any world size
reading nothing it skips, the byte-offset index (and datasets without one), unreadable shards.

Ranks are simulated: one stream per rank in this process (``loader_workers=0``), the shards and
the index are real files written by the ingest's writer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fixtures.shards import cfg_for, keys_of, write_dataset

from dsl.contracts.manifest import read_manifest
from dsl.contracts.shard_format import MANIFEST
from dsl.contracts.shard_index import INDEX
from dsl.data import make_loader, resume_stream
from dsl.data.pairs import SampleStream
from dsl.data.ranged import RangeReader

SIZES = [23, 7, 31, 1, 0, 19, 26, 12, 30, 17, 25, 9, 28, 14, 22, 5, 27, 11, 29, 24]
TOTAL = sum(SIZES)  # 360


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("samples"), SIZES)


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, int, int]]:
    """Every byte range the streams read, in order."""
    seen: list[tuple[str, int, int]] = []
    real = RangeReader.read

    def read(self, url, start, end):
        seen.append((url, start, end))
        return real(self, url, start, end)

    monkeypatch.setattr(RangeReader, "read", read)
    return seen


def stream(cfg, rank, world, **kw) -> SampleStream:
    return SampleStream(cfg, read_manifest(cfg.shards), rank, world, **kw)


def run_ranks(cfg, world: int, start: int, n_batches: int | None) -> tuple[list[str], int]:
    """Keys the ``world`` ranks read in their next ``n_batches`` (None: to the epoch's end)."""
    keys = []
    n = None
    for rank in range(world):
        s = stream(cfg, rank, world, start_sample=start)
        n = len(s) if n_batches is None else n_batches
        for batch in itertools.islice(iter(s), n):
            assert len(batch["key"]) == cfg.batch_size and batch["skipped"] == 0
            keys += batch["key"]
    return keys, start + n * world * cfg.batch_size


def test_an_epoch_interrupted_at_16_ranks_resumed_at_32_then_8_reads_every_sample_once(ds, reads):
    cfg = cfg_for(ds, batch_size=2, shuffle_block=64)
    keys16, at = run_ranks(cfg, 16, 0, 4)  # 128 samples
    keys32, at = run_ranks(cfg, 32, at, 2)  # 128 more
    keys8, at = run_ranks(cfg, 8, at, None)  # the rest of the epoch, 16 at a time
    keys = keys16 + keys32 + keys8
    assert len(keys) == len(set(keys))  # each sample at most once
    assert len(keys) == 352 and TOTAL - len(keys) < 8 * 2  # only the last world's drop-last tail unread
    # exactly the uninterrupted single-rank epoch's order (a rank's share is its slice of it)
    whole = [k for b in stream(cfg_for(ds, batch_size=1, shuffle_block=64), 0, 1) for k in b["key"]]
    by_position = {}
    for world, ks, base in ((16, keys16, 0), (32, keys32, 128), (8, keys8, 256)):
        per_rank = len(ks) // world
        for r in range(world):
            for i, k in enumerate(ks[r * per_rank : (r + 1) * per_rank]):
                g, j = divmod(i, 2)
                by_position[base + g * world * 2 + r * 2 + j] = k
    assert [by_position[p] for p in range(352)] == whole[:352]
    # nothing skipped was downloaded: one range read per sample trained on, none twice
    assert len(reads) == 352 + TOTAL and len(set(reads[:352])) == 352  # (+ the whole-epoch check above)


def test_a_sample_gets_the_same_crop_on_any_world_size(ds):
    cfg = cfg_for(ds, batch_size=2, crop_size=8)
    rows = {}
    for world in (1, 2, 5):
        for rank in range(world):
            for b in itertools.islice(iter(stream(cfg, rank, world)), 6):
                for k, s1, s2 in zip(b["key"], b["s1"], b["s2"], strict=True):
                    if k in rows:
                        assert np.array_equal(rows[k][0], s1.numpy()) and np.array_equal(rows[k][1], s2.numpy())
                    rows[k] = (s1.numpy(), s2.numpy())
    assert len(rows) > 12  # overlapping samples were compared across world sizes


def test_every_rank_yields_the_same_number_of_full_batches(ds):
    cfg = cfg_for(ds, batch_size=3)
    counts = {len(list(stream(cfg, r, 7))) for r in range(7)}
    assert counts == {TOTAL // 21} and len(stream(cfg, 0, 7)) == TOTAL // 21


def test_a_dataset_without_index_reads_the_same_samples(tmp_path):
    new = write_dataset(tmp_path / "v2", SIZES[:6])
    old = write_dataset(tmp_path / "v1", SIZES[:6], index=False)
    assert read_manifest(old).index is None and read_manifest(new).index is not None
    a = list(make_loader(cfg_for(new, batch_size=4), 0, 1))
    b = list(make_loader(cfg_for(old, batch_size=4), 0, 1))
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(np.array_equal(x["s2"], y["s2"]) for x, y in zip(a, b, strict=True))


def _rewrite_index(root: Path, table: np.ndarray | None = None, data: bytes | None = None, pickle: bool = False,
                   **manifest_changes):
    """Replace index.npy and make the manifest agree with it (size and sha256), or not."""
    import io

    if data is None:
        buf = io.BytesIO()
        np.save(buf, table, allow_pickle=pickle)
        data = buf.getvalue()
    (root / INDEX).write_bytes(data)
    m = json.loads((root / MANIFEST).read_text())
    m["index"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    m["index"].update(manifest_changes)
    (root / MANIFEST).write_text(json.dumps(m))


def test_a_damaged_or_hostile_index_is_refused(tmp_path):
    root = Path(write_dataset(tmp_path / "d", [3, 4]))
    cfg = cfg_for(str(root), batch_size=1)
    table = np.load(root / INDEX)
    good = (root / INDEX).read_bytes()
    (root / INDEX).write_bytes(good[:-8] + b"\1" * 8)  # same size, other bytes
    with pytest.raises(ValueError, match=r"index\.npy: index sha256 differs from the manifest's"):
        stream(cfg, 0, 1)
    _rewrite_index(root, data=good, bytes=len(good) + 1)
    with pytest.raises(ValueError, match=rf"index\.npy: index is {len(good)} bytes, the manifest says {len(good) + 1}"):
        stream(cfg, 0, 1)
    _rewrite_index(root, table[:-1])
    with pytest.raises(ValueError, match=r"index has \(8,\) int64 entries, expected int64 \[9\]"):
        stream(cfg, 0, 1)
    backwards = table.copy()
    backwards[1], backwards[2] = backwards[2], backwards[1]
    _rewrite_index(root, backwards)
    with pytest.raises(ValueError, match=r"sample 1 of shard 0 spans -\d+ bytes"):
        stream(cfg, 0, 1)
    _rewrite_index(root, table.astype(np.float64))
    with pytest.raises(ValueError, match=r"index is float64 \(9,\), expected 1-D int64"):
        stream(cfg, 0, 1)
    _rewrite_index(root, np.array([{"a": 1}], dtype=object).repeat(9), pickle=True)  # a hostile pickle
    with pytest.raises(ValueError, match="not a plain .npy index"):
        stream(cfg, 0, 1)
    mid = table.copy()
    mid[1] += 512  # sample 1 starts at its second member's data: consistent file, wrong offsets
    _rewrite_index(root, mid)
    batches = list(stream(cfg, 0, 1))  # its two ranges no longer match their digests: dropped, counted
    assert sum(b["bad"] for b in batches) == 2 and not {"loc0000", "loc0001"} & set(keys_of(batches))
    past = table.copy()
    past[3] = (root / "pairs-000000.tar").stat().st_size + 512
    _rewrite_index(root, past)
    with pytest.raises(ValueError, match=r"shard 0's samples end at byte \d+, past its \d+ bytes"):
        stream(cfg, 0, 1)


def test_an_unreadable_shard_is_skipped_counted_and_logged(tmp_path, caplog):
    root = Path(write_dataset(tmp_path / "d", [6, 6, 6, 6]))
    cfg = cfg_for(str(root), batch_size=4, read_retries=0)
    s = stream(cfg, 0, 1)
    os.unlink(root / "pairs-000002.tar")  # gone after the job started (a lifecycle rule, a bad disk)
    with caplog.at_level(logging.WARNING, logger="dsl.data.pairs"):
        batches = list(s)
    assert len(batches) == 6 and all(len(b["key"]) == 4 for b in batches)  # the job goes on, equal batches
    keys = [k for b in batches for k in b["key"]]
    lost = {f"loc{i:04d}" for i in range(12, 18)}
    assert not lost & set(keys) and sum(b["skipped"] for b in batches) == 6
    assert all(len(set(b["key"])) == 4 for b in batches)  # stand-ins are other samples, not repeats
    assert "pairs-000002.tar" in caplog.text


def test_resume_stream_is_one_loader_across_epochs(ds):
    cfg = cfg_for(ds, batch_size=5, loader_workers=2)
    per_epoch = TOTAL // 10
    position = {"epoch": 0, "sample": 0}
    got = [(tuple(b["key"]), dict(position)) for b in itertools.islice(resume_stream(cfg, 1, 2, position), per_epoch + 3)]
    assert got[per_epoch - 1][1] == {"epoch": 1, "sample": 0} and got[per_epoch][1] == {"epoch": 1, "sample": 10}
    single = cfg_for(ds, batch_size=5, loader_workers=0)
    expect = [tuple(b["key"]) for e in (0, 1) for b in stream(single, 1, 2, epoch=e)]
    assert [k for k, _ in got] == expect[: per_epoch + 3]
    # resumed mid-epoch at another world size: continues the same order
    resumed = next(iter(stream(single, 0, 1, start_sample=10)))["key"]
    assert resumed == [k for b in stream(cfg_for(ds, batch_size=1), 0, 1) for k in b["key"]][10:15]


def test_selected_keys_only_once_per_epoch(ds):
    cfg = cfg_for(ds, batch_size=2)
    m = read_manifest(ds)
    keys = {m.shards[0].name: ["loc0001", "loc0005", "loc0010"], m.shards[2].name: ["loc0031", "loc0040", "loc0060"]}
    got = [k for b in make_loader(cfg, 0, 1, keys=keys) for k in b["key"]]
    assert sorted(got) == sorted(keys[m.shards[0].name] + keys[m.shards[2].name])
    for train in (True, False):  # evaluation too: else its len() counts them
        with pytest.raises(ValueError, match=r"selected keys \['nope'\] are not in the shard"):
            make_loader(cfg, 0, 1, train=train, keys={m.shards[0].name: ["loc0001", "nope"]})


def test_member_headers_are_parsed_as_tar_parses_them():
    from dsl.data.pairs import _ustar_member

    for name in ("k.s1.npy", "a/b/" + "d" * 90 + "/k_r0_c1.s2.blosc", "é.json"):  # the second uses ustar's prefix
        info = tarfile.TarInfo(name)
        info.size = 123_456
        assert _ustar_member(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), "u", 0) == (name, 123_456)
    header = bytearray(tarfile.TarInfo("k.s1.npy").tobuf(tarfile.USTAR_FORMAT))
    header[300] = 200  # a byte > 127 in an unused field: writers that sum signed bytes differ
    for chksum in (sum(header[:148]) + sum(header[156:]) + 256, sum(header[:148]) + sum(header[156:]) + 256 - 256):
        header[148:156] = b"%06o\0 " % chksum
        assert _ustar_member(bytes(header), "u", 0)[0] == "k.s1.npy"
    header[0] ^= 1
    with pytest.raises(ValueError, match=r"u: byte 7: not a tar header \(bad checksum\)"):
        _ustar_member(bytes(header), "u", 7)
    link = tarfile.TarInfo("k.s1.npy")
    link.type = tarfile.SYMTYPE
    with pytest.raises(ValueError, match=r"u: byte 0: member type b'2' is not a plain file"):
        _ustar_member(link.tobuf(tarfile.USTAR_FORMAT), "u", 0)
    with pytest.raises(ValueError, match="bad number field"):
        _ustar_member(b"k.s1.npy".ljust(124, b"\0") + b"9999" + b"\0" * 384, "u", 0)


def _header(name: str = "k.s1.npy", size: int = 1000, kind: bytes = tarfile.REGTYPE, edit=None,
            signed: bool = False, chksum: bytes = b"%06o\0 ") -> bytes:
    """A ustar header as other writers write it: ``edit`` rewrites fields, then the checksum is set."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    if edit:
        edit(header)
    header[148:156] = b" " * 8
    total = sum(header) - (256 * sum(b > 127 for b in header) if signed else 0)
    header[148:156] = chksum % total
    return bytes(header)


def _set(at: int, value: bytes):
    def edit(header: bytearray) -> None:
        header[at : at + len(value)] = value
    return edit


@pytest.mark.parametrize("header", [
    # number fields left-aligned and NUL-padded (tarfile and GNU tar read them)
    _header(edit=_set(124, b"1750".ljust(12, b"\0")), chksum=b"%o\0\0\0\0"),
    # number fields ended by a space, no NUL
    _header(edit=_set(124, b"%011o " % 1000), chksum=b"%07o "),
    _header(size=0, edit=_set(124, b"\0" * 12)),  # an empty size field: 0
    _header(kind=tarfile.AREGTYPE),  # the old (V7) regular-file type NUL
    _header(name="d" * 93 + ".s1.npy"),  # a 100-byte name: no NUL ends it
    _header(name="p" * 155 + "/k.s1.npy", edit=_set(500, b"x")),  # a 155-byte prefix, something in the pad
    _header(name="\udcff\udcfe.s1.npy"),  # name bytes that are not UTF-8
    # a signed-sum checksum over bytes 127, 128 and 200 (two of them "negative")
    _header(edit=_set(505, bytes([127, 128, 200])), signed=True),
])
def test_member_headers_of_other_writers_are_parsed_as_tar_parses_them(header):
    from dsl.data.pairs import _ustar_member

    info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    assert _ustar_member(header, "u", 0) == (info.name, info.size)


def test_member_header_errors():
    from dsl.data.pairs import _ustar_member

    no_checksum = bytearray(_header())
    no_checksum[148:156] = b"\0" * 8
    with pytest.raises(ValueError) as e:
        _ustar_member(bytes(no_checksum), "u", 512)
    assert str(e.value) == "u: byte 512: not a tar header (bad checksum); the index or shard is damaged"
    with pytest.raises(ValueError) as e:  # an odd type byte > 127 under a signed-sum checksum
        _ustar_member(_header(kind=b"\xc8", signed=True), "u", 0)
    assert str(e.value) == "u: byte 0: member type b'\\xc8' is not a plain file"
