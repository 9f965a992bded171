"""``dsl.data.pairs`` in detail: the workers' share of a rank's batches, resume at any sample,
the shuffle blocks, the crop windows, the byte ranges read, the shared-memory batches, and every
error message, in one process.

DataLoader workers are other processes, so the worker side is also run here with a faked
``get_worker_info`` (:func:`emulate`), and checked against a real 2-worker DataLoader: what
the workers do is then visible to assertions and to ``make mutate`` (mutmut only traces the
test process). The stream's samples say where they come from (``fixtures.shards``): S1 band 0/1
hold each pixel's row/column, so a crop's window is its top-left value, and key ``locN`` is
global sample id ``N``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures.shards import SIZE, all_batches, cfg_for, write_dataset

import dsl.data.pairs as P
from dsl.contracts.manifest import read_manifest
from dsl.contracts.shard_format import encode_npy
from dsl.data.dealing import crop_fractions
from dsl.data.ranged import RangeReader


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pairs-edges")
    return {
        "three": write_dataset(root / "three", [9, 7, 5]),
        "labels": write_dataset(root / "labels", [6], labels=True),
        "one": write_dataset(root / "one", [1]),
    }


def stream(cfg, rank: int = 0, world: int = 1, train: bool = True, **kw) -> P.SampleStream | P.EvalStream:
    return (P.SampleStream if train else P.EvalStream)(cfg, read_manifest(cfg.shards), rank, world, **kw)


def emulate(cfg, monkeypatch, rank: int = 0, world: int = 1, **kw) -> list[dict]:
    """What a DataLoader with ``cfg.loader_workers`` workers returns: each worker's batches, in turn."""
    s = stream(cfg, rank, world, **kw)
    per = []
    for w in range(s.workers):
        monkeypatch.setattr(P, "get_worker_info", lambda w=w: SimpleNamespace(id=w, num_workers=s.workers))
        per.append(list(s))
    monkeypatch.undo()
    return [p[i] for i in range(max(map(len, per), default=0)) for p in per if i < len(p)]


def keys(batches: list[dict]) -> list[list[str]]:
    return [list(b["key"]) for b in batches]


def windows(batch: dict) -> list[tuple[int, int]]:
    """(row, column) of each crop's top-left pixel."""
    return [(int(batch["s1"][i, 0, 0, 0]), int(batch["s1"][i, 1, 0, 0])) for i in range(len(batch["key"]))]


def same(a: list[dict], b: list[dict]) -> bool:
    return keys(a) == keys(b) and all(torch.equal(x["s1"], y["s1"]) and torch.equal(x["s2"], y["s2"])
                                      for x, y in zip(a, b, strict=True))


def order_of(root: str, **kw) -> list[str]:
    """The epoch's sample order: the keys one rank reads one at a time, in this process."""
    return [k for b in stream(cfg_for(root, batch_size=1, **kw)) for k in b["key"]]


# ---------------------------------------------------------------- workers, resume


@pytest.mark.parametrize(("train", "rank"), [(True, 0), (True, 1), (False, 1)])
def test_a_two_worker_loader_is_its_workers_in_turn(ds, monkeypatch, train, rank):
    cfg = cfg_for(ds["three"], loader_workers=2, batch_size=2)
    real = all_batches(cfg, rank, 2, train=train)
    assert len(real) == len(stream(cfg, rank, 2, train=train)) > 2
    assert same(emulate(cfg, monkeypatch, rank, 2, train=train), real)
    if train:  # the workers split the rank's batches, they do not change them
        assert same(real, all_batches(cfg_for(ds["three"], batch_size=2), rank, 2))


def test_resume_with_two_workers_continues_exactly(ds, monkeypatch):
    cfg = cfg_for(ds["three"], loader_workers=2, batch_size=2)
    full = emulate(cfg, monkeypatch, 1, 2)
    assert len(full) == 5  # 21 samples // (2 ranks x 2)
    order = order_of(ds["three"])
    rows = {k: (b["s1"][i], b["s2"][i]) for b in stream(cfg_for(ds["three"], batch_size=7)) for i, k in
            enumerate(b["key"])}
    for start in range(22):
        resumed = emulate(cfg, monkeypatch, 1, 2, start_sample=start)
        n = (21 - start) // 4
        assert len(resumed) == len(stream(cfg, 1, 2, start_sample=start)) == n
        # rank 1's part of each global batch of 4 from the resume point on
        assert keys(resumed) == [order[start + 4 * g + 2 : start + 4 * g + 4] for g in range(n)], start
        assert all(torch.equal(b["s1"][i], rows[k][0]) and torch.equal(b["s2"][i], rows[k][1])
                   for b in resumed for i, k in enumerate(b["key"]))  # the same crops, wherever resumed
        if start % 4 == 0:
            assert same(resumed, full[start // 4 :]), f"resumed at sample {start}"
    assert same(all_batches(cfg, 1, 2, start_sample=5), emulate(cfg, monkeypatch, 1, 2, start_sample=5))


def test_a_stream_for_workers_refuses_to_run_in_the_main_process(ds):
    s = stream(cfg_for(ds["three"], loader_workers=2))
    with pytest.raises(RuntimeError) as e:
        next(iter(s))
    assert str(e.value) == "stream built for 2 workers runs in 1; use make_loader"


def test_the_first_epoch_of_seed_0_is_pinned(ds):
    """A seed fixes shard order, shuffle and crops: this epoch is what seed 0 has always given.

    Shards in the order 2, 0, 1 (21 samples), shuffled within blocks of 8 (``cfg_for``).
    """
    batches = all_batches(cfg_for(ds["three"]))
    assert sorted(k for b in keys(batches) for k in b) == [f"loc{i:04d}" for i in range(21)]  # a permutation
    assert keys(batches) == [
        ["loc0020", "loc0017", "loc0000"], ["loc0019", "loc0001", "loc0002"], ["loc0018", "loc0016", "loc0008"],
        ["loc0006", "loc0005", "loc0004"], ["loc0003", "loc0009", "loc0007"], ["loc0010", "loc0014", "loc0015"],
        ["loc0012", "loc0011", "loc0013"]]
    assert [windows(b) for b in batches] == [
        [(7, 7), (9, 9), (2, 8)], [(4, 5), (4, 11), (14, 13)], [(15, 5), (0, 11), (15, 2)],
        [(9, 10), (0, 16), (8, 0)], [(3, 1), (3, 9), (5, 1)], [(12, 8), (12, 15), (7, 9)],
        [(10, 13), (14, 1), (0, 4)]]


def test_seeds_are_taken_modulo_2_to_the_63(ds):
    cfg = cfg_for(ds["three"])
    base = all_batches(cfg.model_copy(update={"seed": 5}))
    assert same(all_batches(cfg.model_copy(update={"seed": 2**63 + 5})), base)
    assert not same(all_batches(cfg.model_copy(update={"seed": 5 + 126})), base)


# ---------------------------------------------------------------- dealing


def test_assign_slots():
    # largest first to the least loaded slot; ties keep the given order
    assert P.assign_slots([5, 9, 9, 2], 2) == [([1, 0], 1, 0), ([2, 3], 1, 0)]
    assert P.assign_slots([3, 1, 2], 3) == [([0], 1, 0), ([2], 1, 0), ([1], 1, 0)]
    # fewer shards than slots: the slots on a shard take every k-th sample
    assert P.assign_slots([4, 6], 5) == [([0], 3, 0), ([1], 2, 0), ([0], 3, 1), ([1], 2, 1), ([0], 3, 2)]


def test_shuffle_blocks_shuffle_the_shards_laid_end_to_end(ds):
    """``data.shuffle_block``: 1 reads whole shards in a seeded order, n shuffles each run of n."""
    shards = [[f"loc{i:04d}" for i in range(a, b)] for a, b in ((0, 9), (9, 16), (16, 21))]
    laid = order_of(ds["three"], shuffle_block=1)
    assert laid == shards[2] + shards[0] + shards[1]  # whole shards, each in its own order
    for block in (8, 5):
        order = order_of(ds["three"], shuffle_block=block)
        assert order != laid
        for lo in range(0, 21, block):  # each block: a permutation of the same run of the layout
            assert sorted(order[lo : lo + block]) == sorted(laid[lo : lo + block]), (block, lo)
    assert sorted(order_of(ds["three"], shuffle_block=64)) == sorted(laid)


def test_a_pass_of_one_sample_cycles(ds):
    batches = all_batches(cfg_for(ds["one"], batch_size=1, samples_per_epoch=3))
    assert keys(batches) == [["loc0000"]] * 3


# ---------------------------------------------------------------- batches and crops


def test_crop_windows_span_the_whole_image(ds):
    s = stream(cfg_for(ds["three"]))
    raw = list(P.read_shard(s.urls[0]))[:3]
    c = 16
    batch = s.batcher(raw, np.array([[0.0, 0.99999], [0.99999, 0.0], [0.5, 0.25]]))
    assert windows(batch) == [(0, SIZE - c), (SIZE - c, 0), (int(0.5 * (SIZE - c + 1)), int(0.25 * (SIZE - c + 1)))]
    assert windows(s.batcher(raw, None)) == [((SIZE - c) // 2, (SIZE - c) // 2)] * 3  # evaluation: centre
    assert batch["s1"].dtype == torch.float32 and batch["s1"].shape == (3, 2, c, c) and batch["s2"].shape == (3, 13, c, c)


@pytest.mark.parametrize(("seed", "epoch"), [(0, 0), (0, 1), (7, 2)])
def test_training_windows_are_the_samples_crop_fractions(ds, seed, epoch):
    """A sample's window is ``crop_fractions(id, seed, epoch)`` scaled to the free span (here 17)."""
    for b in all_batches(cfg_for(ds["three"], seed=seed), epoch=epoch):
        f = crop_fractions(np.array([int(k[3:]) for k in b["key"]]), seed, epoch)
        assert windows(b) == [(int(y * (SIZE - 16 + 1)), int(x * (SIZE - 16 + 1))) for y, x in f]


def test_centre_crop_of_a_non_square_patch(tmp_path):
    def wide(idx, members):
        s1 = np.stack(np.mgrid[0:20, 0:32]).astype(np.float32)
        s2 = np.zeros((13, 20, 32), np.uint16)
        return [(members[0][0], encode_npy(s1)), (members[1][0], encode_npy(s2)), members[2]]

    root = write_dataset(tmp_path / "d", [1], members=wide)
    (batch,) = all_batches(cfg_for(root, batch_size=1), train=False)
    assert windows(batch) == [(2, 8)]


def test_empty_batches_in_the_main_process_and_in_a_worker(monkeypatch):
    t = P._empty((2, 3))
    assert t.shape == (2, 3) and t.dtype == torch.float32 and not t.is_shared()
    made = []
    new_shared = torch.UntypedStorage._new_shared

    def spy(size, *args, **kwargs):
        made.append(size)
        return new_shared(size, *args, **kwargs)

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", spy)
    monkeypatch.setattr(P, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    t = P._empty((2, 3, 4))
    assert made == [96]  # born in shared memory: 24 float32s
    assert t.shape == (2, 3, 4) and t.dtype == torch.float32 and t.is_shared() and t.storage_offset() == 0
    assert t.untyped_storage().nbytes() == 96
    t.fill_(1.5)
    assert t.sum().item() == 36.0
    monkeypatch.delattr(torch.UntypedStorage, "_new_shared")  # an older torch: copied to shared memory
    t = P._empty((5, 2))
    assert t.shape == (5, 2) and t.dtype == torch.float32 and t.is_shared() and made == [96]


def sample_ranges(shard: str) -> dict[str, tuple[int, int]]:
    """Each key's byte range in a shard, from its tar headers: first header to last padded data."""
    out: dict[str, tuple[int, int]] = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            key = m.name.split(".", 1)[0]
            end = m.offset_data + m.size + (-m.size % tarfile.BLOCKSIZE)
            out[key] = (out.get(key, (m.offset, 0))[0], end)
    return out


@pytest.mark.parametrize("labels", [False, True])
def test_training_reads_only_each_samples_own_bytes(ds, monkeypatch, labels):
    reads = []
    read = RangeReader.read

    def spy(self, url, start, end):
        reads.append((url, start, end))
        return read(self, url, start, end)

    monkeypatch.setattr(RangeReader, "read", spy)
    shard = str(Path(ds["labels"]) / "pairs-000000.tar")
    batches = all_batches(cfg_for(ds["labels"], batch_size=2), start_sample=1, labels=labels)
    ranges = sample_ranges(shard)
    got = [k for b in batches for k in b["key"]]
    assert len(got) == 4  # samples 1..4 of the epoch's 6: one read each, exactly its own members
    assert sorted(reads) == sorted((shard, *ranges[k]) for k in got)


def test_evaluation_reads_only_the_wanted_members(ds, monkeypatch):
    """Whole-shard reads skip the members a batch does not use (``json``; labels unless asked)."""
    seen = []
    read_shard = P.read_shard

    def spy(url, wanted, keys=None, expect=None):
        for sample in read_shard(url, wanted, keys, expect):
            seen.append(frozenset(k for k in sample if not k.startswith("__")))
            yield sample

    monkeypatch.setattr(P, "read_shard", spy)
    all_batches(cfg_for(ds["labels"]), train=False)
    assert len(seen) == 6 and set(seen) == {frozenset({"s1.npy", "s2.npy"})}
    seen.clear()
    all_batches(cfg_for(ds["labels"]), labels=True, train=False)
    assert len(seen) == 6 and set(seen) == {frozenset({"s1.npy", "s2.npy", "cls", "multi.npy"})}


# ---------------------------------------------------------------- reading shards


class NonSeekable(io.RawIOBase):
    """A pipe-like stream: readable, not seekable."""

    def __init__(self, path: str):
        self._f = open(path, "rb")  # noqa: SIM115 - closed with the stream

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, b) -> int:
        return self._f.readinto(b)

    def close(self) -> None:
        self._f.close()
        super().close()


def test_read_shard_streams_a_pipe_and_refuses_other_member_types(tmp_path, ds, monkeypatch):
    shard = str(Path(ds["three"]) / "pairs-000002.tar")
    want = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in P.read_shard(shard)]
    assert want == [(f"loc{i:04d}", ["s1.npy", "s2.npy"]) for i in range(16, 21)]  # the default members
    monkeypatch.setattr(P, "gopen", lambda url, mode: NonSeekable(url))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in P.read_shard(shard)] == want
    monkeypatch.undo()
    for kind, extra in [(tarfile.DIRTYPE, {}), (tarfile.SYMTYPE, {"linkname": "/etc/passwd"}),
                        (tarfile.LNKTYPE, {"linkname": "loc0016.s2.npy"}), (tarfile.CHRTYPE, {})]:
        other = tmp_path / f"other-{kind.decode()}.tar"
        with tarfile.open(shard) as src, tarfile.open(other, "w", format=tarfile.USTAR_FORMAT) as dst:
            d = tarfile.TarInfo("loc0016.s1.npy.x")
            d.type = kind
            for k, v in extra.items():
                setattr(d, k, v)
            dst.addfile(d)
            for m in src.getmembers():
                dst.addfile(m, src.extractfile(m))
        with pytest.raises(ValueError) as e:  # never skipped silently, never followed
            list(P.read_shard(str(other), ("s1.npy", "json")))
        assert str(e.value) == f"{other}: byte 0: member type {kind!r} is not a plain file"


def test_read_shard_refuses_pax_names_and_huge_members(tmp_path, ds):
    shard = Path(ds["three"]) / "pairs-000002.tar"
    pax = tmp_path / "pax.tar"
    with tarfile.open(shard) as src, tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as dst:
        big = tarfile.TarInfo("loc0016.s1.npy.x")
        big.pax_headers = {"comment": "x" * 200_000}  # the CVE-2024-6232 shape: refused unparsed
        dst.addfile(big, io.BytesIO(b""))
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
    with pytest.raises(ValueError, match=rf"{pax}: byte 0: member type b'x' is not a plain file"):
        list(P.read_shard(str(pax)))
    for name in ("/abs/loc0016.s1.npy", "../up/loc0016.s1.npy", "a/../../loc0016.s1.npy"):
        bad = tmp_path / "name.tar"
        with tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as dst:
            dst.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
        with pytest.raises(ValueError) as e:
            list(P.read_shard(str(bad)))
        assert str(e.value) == f"{bad}: byte 0: member name {name!r} is absolute or leaves the shard"
    huge = tmp_path / "huge.tar"
    info = tarfile.TarInfo("k.s1.npy")
    info.size = P.MAX_SAMPLE_BYTES + 1
    huge.write_bytes(info.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024)  # claims 256 MB, holds none
    with pytest.raises(ValueError) as e:
        list(P.read_shard(str(huge)))
    assert str(e.value) == f"{huge}: byte 0: member k.s1.npy claims {P.MAX_SAMPLE_BYTES + 1} bytes (at most {P.MAX_SAMPLE_BYTES})"


def test_read_shard_checks_the_manifest_size_and_sha256_as_it_streams(ds):
    shard = Path(ds["three"]) / "pairs-000002.tar"
    data = shard.read_bytes()
    good = (len(data), hashlib.sha256(data).hexdigest())
    assert len(list(P.read_shard(str(shard), expect=good))) == 5
    for expect in ((len(data) + 512, good[1]), (len(data), "0" * 64)):
        with pytest.raises(ValueError, match=rf"{shard}: the shard is {len(data)} bytes with sha256 "
                                             r"[0-9a-f]{12}\.\.\., the manifest says .* \(corrupt, truncated or replaced\)"):
            list(P.read_shard(str(shard), expect=expect))


def cut_shard(path, member: str):
    """A shard of one 10,000-byte ``member``, cut after 3,000 bytes."""
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(member)
        info.size = 10_000
        tar.addfile(info, io.BytesIO(b"\1" * 10_000))
    path.write_bytes(path.read_bytes()[:3000])
    return path


def test_read_shard_errors_name_the_shard(tmp_path, monkeypatch):
    cut = cut_shard(tmp_path / "cut.tar", "k.s1.npy")
    with pytest.raises(ValueError) as e:
        list(P.read_shard(str(cut), ("s1.npy",)))
    assert str(e.value) == f"{cut}: byte 512: member k.s1.npy runs past the end of the shard (truncated)"
    cut.write_bytes(cut.read_bytes()[:300])
    with pytest.raises(ValueError) as e:
        list(P.read_shard(str(cut), ("s1.npy",)))
    assert str(e.value) == f"{cut}: byte 0: the shard ends inside a header (truncated)"

    def no_args(_):
        raise EOFError
        yield

    monkeypatch.setattr(P, "group_by_keys", no_args)
    with pytest.raises(OSError) as e:
        list(P.read_shard(str(cut), ("s1.npy",)))
    assert str(e.value) == f"{cut}: cannot read shard: EOFError()"


# ---------------------------------------------------------------- every message


def test_stream_arguments_are_checked(ds):
    cfg = cfg_for(ds["three"])
    for train in (True, False):
        for rank, world in ((2, 2), (-1, 2)):
            with pytest.raises(ValueError) as e:
                stream(cfg, rank, world, train=train)
            assert str(e.value) == f"rank {rank} is outside world_size {world}"
        stream(cfg, 1, 2, train=train)
    with pytest.raises(ValueError) as e:
        stream(cfg_for(ds["one"], batch_size=1), 1, 2)
    assert str(e.value) == "data.batch_size 1 x 2 ranks exceeds the 1 samples per epoch: not one full batch"
    lone = stream(cfg_for(ds["one"], batch_size=1), 1, 2, train=False)  # evaluation: a rank may get nothing
    assert len(lone) == 0 and list(lone) == []
    with pytest.raises(ValueError) as e:
        stream(cfg_for(ds["three"], batch_size=11), 0, 2)
    assert str(e.value) == "data.batch_size 11 x 2 ranks exceeds the 21 samples per epoch: not one full batch"
    assert len(stream(cfg_for(ds["three"], batch_size=10), 0, 2)) == 1  # exactly one full batch
    for start, n in ((21, 0), (19, 0), (18, 1), (17, 1), (0, 7)):  # full batches left after a sample
        s = stream(cfg, start_sample=start)
        assert len(s) == len(list(s)) == n, start
    longer = cfg_for(ds["three"], samples_per_epoch=30)
    assert len(stream(longer, start_sample=25)) == 1
    for c, start, total in ((cfg, 22, 21), (cfg, -1, 21), (longer, 31, 30)):
        with pytest.raises(ValueError) as e:
            stream(c, start_sample=start)
        assert str(e.value) == f"start_sample {start} outside the epoch's {total} samples"
    for kw in ({"start_sample": 1}, {"epoch": 1}):
        with pytest.raises(ValueError) as e:
            P.make_loader(cfg, 0, 1, train=False, **kw)
        assert str(e.value) == "epoch and start_sample are for training streams; evaluation reads the split whole"


def test_key_selections_are_checked(ds):
    cfg = cfg_for(ds["three"])
    unknown = {f"x{i}.tar": ["a"] for i in range(4)}
    with pytest.raises(ValueError) as e:
        stream(cfg, keys=unknown)
    assert str(e.value) == "key selection names shards ['x0.tar', 'x1.tar', 'x2.tar'] that are not in split None"
    with pytest.raises(ValueError) as e:
        stream(cfg, keys={"pairs-000000.tar": []})
    assert str(e.value) == "the key selection keeps no sample of split None"
    with pytest.raises(ValueError) as e:  # found when the stream is made, before any batch is read
        stream(cfg_for(ds["three"], batch_size=1), keys={"pairs-000001.tar": ["z3", "loc0010", "z1", "z2", "z0"]})
    assert str(e.value) == f"{Path(ds['three']) / 'pairs-000001.tar'}: selected keys ['z0', 'z1', 'z2'] are not in the shard"
    # an epoch longer than the selection repeats the selected samples only, each as often
    chosen = {"pairs-000002.tar": ["loc0020", "loc0016"], "pairs-000000.tar": ["loc0003"]}
    s = stream(cfg_for(ds["three"], batch_size=1, samples_per_epoch=9), keys=chosen)
    assert len(s) == 9 and Counter(k for b in s for k in b["key"]) == {"loc0003": 3, "loc0016": 3, "loc0020": 3}
    assert P.batches_per_epoch(cfg, 1, keys={"a": ["k1", "k2", "k1"], "b": ["k3"]}) == 1
    assert P.batches_per_epoch(cfg_for(ds["three"], samples_per_epoch=12), 2, keys={"a": ["k1"]}) == 2
    assert P.batches_per_epoch(cfg, 2) == 3


def bad_member(which: str, value: bytes):
    def members(idx, m):
        return [(name, value if idx == 1 and name.endswith(which) else data) for name, data in m]
    return members


@pytest.mark.parametrize(("which", "array", "why"), [
    (".s1.npy", np.zeros((2, 32), np.float32), "s1 (2, 32) / s2 (13, 32, 32)"),
    (".s2.npy", np.zeros((13, 32), np.uint16), "s1 (2, 32, 32) / s2 (13, 32)"),
    (".s2.npy", np.zeros((13, 32, 30), np.uint16), "s1 (2, 32, 32) / s2 (13, 32, 30)"),
    (".s1.npy", np.zeros((3, 32, 32), np.float32), "s1 (3, 32, 32) / s2 (13, 32, 32)"),
])
def test_samples_that_do_not_match_the_manifest(tmp_path, which, array, why):
    root = write_dataset(tmp_path / "d", [3], members=bad_member(which, encode_npy(array)))
    with pytest.raises(ValueError) as e:
        all_batches(cfg_for(root), train=False)
    assert str(e.value) == (f"{root}/pairs-000000.tar: sample 'loc0001': {why} do not match the manifest's "
                            "[2, H, W] / [13, H, W] on one grid")


@pytest.mark.parametrize(("h", "w"), [(12, 32), (32, 12)])
def test_a_patch_smaller_than_the_crop(tmp_path, h, w):
    def small(idx, m):
        s1 = np.zeros((2, h, w), np.float32)
        s2 = np.zeros((13, h, w), np.uint16)
        return [(m[0][0], encode_npy(s1)), (m[1][0], encode_npy(s2)), m[2]] if idx == 1 else m

    root = write_dataset(tmp_path / "d", [3], members=small)
    with pytest.raises(ValueError) as e:
        all_batches(cfg_for(root), train=False)
    assert str(e.value) == f"{root}/pairs-000000.tar: sample 'loc0001' is {h}x{w}, smaller than data.crop_size 16"


def test_missing_and_corrupt_members(tmp_path):
    def drop_s2(idx, m):
        return [x for x in m if not (idx == 1 and x[0].endswith(".s2.npy"))]

    a = write_dataset(tmp_path / "a", [3], members=drop_s2)
    b = write_dataset(tmp_path / "b", [3], members=bad_member(".s1.npy", b""))
    c = write_dataset(tmp_path / "c", [3], members=bad_member(".s1.npy", encode_npy(np.zeros(3))[:-9]))
    def message(root) -> str:
        """Evaluation stops at a bad sample; training drops it and logs the same message."""
        with pytest.raises(ValueError) as e:
            all_batches(cfg_for(root), train=False)
        handler = Records()
        logging.getLogger("dsl.data.pairs").addHandler(handler)
        try:
            batches = all_batches(cfg_for(root, batch_size=1))
        finally:
            logging.getLogger("dsl.data.pairs").removeHandler(handler)
        assert sorted(b["bad"] for b in batches) == [0, 0, 1] and all(b["skipped"] == 0 for b in batches)
        assert "loc0001" not in [k for b in batches for k in b["key"]]
        (logged,) = handler.messages
        assert logged == "dropping a bad sample: " + str(e.value)
        return str(e.value)

    assert message(a) == f"{a}/pairs-000000.tar: sample 'loc0001' has no member s2.npy"
    got = message(b)
    assert re.fullmatch(re.escape(f"{b}/pairs-000000.tar: sample 'loc0001': s1.npy: corrupt .npy (") + r".+\)", got), got
    # the reader's own message stands
    assert message(c).startswith(f"{c}/pairs-000000.tar: sample 'loc0001': s1.npy: not a plain numeric .npy (")


class Records(logging.Handler):
    """Collects formatted warnings (works in DataLoader worker processes' parent too)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_label_members_are_checked(tmp_path):
    root = write_dataset(tmp_path / "a", [3], labels=True, members=bad_member(".cls", b"seven" * 6))
    with pytest.raises(ValueError) as e:
        all_batches(cfg_for(root), labels=True, train=False)
    assert str(e.value) == (f"{root}/pairs-000000.tar: sample 'loc0001': cls is not a decimal integer: "
                            f"{(b'seven' * 6)[:20]!r}")
    root = write_dataset(tmp_path / "b", [3], labels=True, members=bad_member(".multi.npy", encode_npy(np.zeros(7))))
    with pytest.raises(ValueError) as e:
        all_batches(cfg_for(root), labels=True, train=False)
    assert str(e.value) == f"{root}/pairs-000000.tar: sample 'loc0001': multi.npy has shape (7,), expected (8,)"
    root = write_dataset(tmp_path / "c", [3], labels=True, members=bad_member(".cls", b" 5\n"))
    (batch,) = all_batches(cfg_for(root), labels=True, train=False)
    assert batch["cls"].tolist() == [0, 5, 2] and batch["cls"].dtype == torch.int64
    assert batch["multi"].dtype == torch.float32 and batch["multi"][2].tolist() == [0, 0, 1, 0, 0, 1, 0, 0]


# ---------------------------------------------------------------- evaluation streams


def test_evaluation_batches_are_normalised_unless_raw_is_asked_for(ds):
    cfg = cfg_for(ds["three"], batch_size=4)
    m = read_manifest(cfg.shards)
    plain = next(iter(P.EvalStream(cfg, m, 0, 1)))  # the constructor's default: normalised
    assert (plain["s1"].dtype, plain["s2"].dtype) == (torch.float32, torch.float32)
    raw = next(iter(P.EvalStream(cfg, m, 0, 1, raw=True)))
    assert (raw["s1"].dtype, raw["s2"].dtype) == (torch.float16, torch.uint16)
    assert raw["key"] == plain["key"] and torch.equal(raw["s2"].float(), plain["s2"])


def test_an_evaluation_selection_counts_only_its_samples(ds):
    chosen = {"pairs-000000.tar": ["loc0001", "loc0005"], "pairs-000002.tar": ["loc0016", "loc0019", "loc0020"]}
    s = stream(cfg_for(ds["three"], batch_size=2), train=False, keys=chosen)
    batches = list(s)
    assert len(s) == len(batches) == 3  # 5 samples in batches of 2
    assert sorted(k for b in batches for k in b["key"]) == sorted(chosen["pairs-000000.tar"] + chosen["pairs-000002.tar"])


def test_evaluation_selection_errors(tmp_path, ds):
    root = write_dataset(tmp_path / "val", [3], split="val")
    with pytest.raises(ValueError) as e:
        stream(cfg_for(root, split="val"), train=False, keys={"x.tar": ["a"]})
    assert str(e.value) == "key selection names shards ['x.tar'] that are not in split 'val'"
    with pytest.raises(ValueError) as e:
        stream(cfg_for(ds["three"]), train=False, keys={"pairs-000001.tar": ["z3", "loc0010", "z1", "z2", "z0"]})
    assert str(e.value) == f"{Path(ds['three']) / 'pairs-000001.tar'}: selected keys ['z0', 'z1', 'z2'] are not in the shard"


def test_an_evaluation_stream_for_workers_refuses_to_run_in_the_main_process(ds):
    s = stream(cfg_for(ds["three"], loader_workers=2), train=False)
    with pytest.raises(RuntimeError) as e:
        next(iter(s))
    assert str(e.value) == "stream built for 2 workers runs in 1; use make_loader"


# ---------------------------------------------------------------- selections, stand-ins


def test_a_shard_that_does_not_hold_the_manifests_count_is_refused(tmp_path):
    root = Path(write_dataset(tmp_path / "d", [3, 4]))
    (root / "pairs-000001.tar").write_bytes((root / "pairs-000000.tar").read_bytes())  # 3 samples, not 4
    with pytest.raises(ValueError) as e:
        stream(cfg_for(str(root), batch_size=1), keys={"pairs-000000.tar": ["loc0000"], "pairs-000001.tar": ["loc0003"]})
    assert str(e.value) == f"{root / 'pairs-000001.tar'}: holds 3 samples, the manifest says 4"


def _gone(root: Path, *shards: int) -> None:
    for n in shards:
        (root / f"pairs-{n:06d}.tar").unlink()


def test_stand_ins_of_a_selection_are_selected_samples_even_in_batches_of_one(tmp_path):
    root = Path(write_dataset(tmp_path / "d", [6, 6, 6, 6]))
    chosen = {f"pairs-{n:06d}.tar": [f"loc{6 * n + 4:04d}", f"loc{6 * n + 5:04d}"] for n in range(4)}
    s = stream(cfg_for(str(root), batch_size=1, read_retries=0), keys=chosen)
    _gone(root, 2)  # loc0016 and loc0017 unreadable
    batches = list(s)
    assert len(batches) == 8 and sum(b["skipped"] for b in batches) == 2
    got = [k for b in batches for k in b["key"]]
    assert set(got) <= {k for ks in chosen.values() for k in ks} - {"loc0016", "loc0017"}


def test_stand_ins_are_pinned_and_the_same_on_a_rerun(tmp_path):
    """Seed 0's stand-ins: a rerun (or a resumed job) trains on the same samples.

    Shards 1 and 5 (loc0004-0007, loc0020-0023) are gone; the first 4 batches read none of them.
    """
    root = Path(write_dataset(tmp_path / "d", [4] * 8))
    cfg = cfg_for(str(root), batch_size=4, read_retries=0)
    _gone(root, 1, 5)
    runs = [[(b["key"], b["skipped"]) for b in stream(cfg)][4:] for _ in range(2)]
    assert runs[0] == runs[1] == [
        (["loc0025", "loc0012", "loc0003", "loc0002"], 2),  # for loc0020, loc0023
        (["loc0014", "loc0001", "loc0000", "loc0030"], 2),  # for loc0021, loc0022
        (["loc0029", "loc0028", "loc0031", "loc0013"], 1),  # for loc0004
        (["loc0030", "loc0011", "loc0028", "loc0029"], 3)]  # for loc0005, loc0007, loc0006


def test_stand_ins_are_the_samples_their_ids_name(tmp_path):
    """A batch of holes only, in a universe of 8: candidates already in the batch are skipped."""
    root = Path(write_dataset(tmp_path / "d", [4, 6, 4]))
    chosen = {"pairs-000000.tar": ["loc0000", "loc0002", "loc0003"], "pairs-000001.tar": ["loc0004", "loc0009"],
              "pairs-000002.tar": ["loc0010", "loc0011", "loc0013"]}
    s = stream(cfg_for(str(root), batch_size=4), keys=chosen)
    _, order, ids = next(s.batch_ids())
    reader = RangeReader(*s.retry)
    try:
        new, samples = s._replace(reader, order, ids, [None] * 4)
    finally:
        reader.close()
    assert not set(new.tolist()) & set(ids.tolist()) and len(set(new.tolist())) == 4
    shard_of = {k: n for n, ks in enumerate(chosen.values()) for k in ks}
    for i, sample in zip(new, samples, strict=True):
        key = f"loc{int(i):04d}"
        assert key in shard_of and sample["__key__"] == key
        assert sample["__url__"] == str(root / f"pairs-{shard_of[key]:06d}.tar")


def test_a_batch_without_readable_stand_ins_gives_up_after_64_draws_per_sample(tmp_path, monkeypatch):
    root = Path(write_dataset(tmp_path / "d", [2] * 5))
    s = stream(cfg_for(str(root), batch_size=2, read_retries=0))
    _gone(root, *range(5))
    draws = []
    real = np.random.default_rng

    class Counted:
        def __init__(self, *args):
            self.rng = real(*args)

        def integers(self, *args):
            draws.append(args)
            return self.rng.integers(*args)

        def __getattr__(self, name):
            return getattr(self.rng, name)

    monkeypatch.setattr(np.random, "default_rng", Counted)
    with pytest.raises(P.ShardUnavailable) as e:
        next(iter(s))
    urls = sorted(str(root / f"pairs-{n:06d}.tar") for n in range(5))
    assert str(e.value) == (f"2 samples of a batch have no good stand-in in 128 draws: 0 samples found bad so far, "
                            f"unreadable shards {urls[:3]} (see the warnings above)")
    assert len(draws) == 64 * 2


def _sample_bytes(*members: tuple[str, bytes]) -> bytes:
    """Members as the writer lays them out: ustar header, data, padding to 512."""
    out = b""
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out += info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return out


def test_split_sample_takes_every_member_of_its_range():
    """Members of any size, an empty last one; end-of-archive blocks after them end the sample."""
    data = _sample_bytes(("k.s1.npy", b"\1" * 512), ("k.s2.npy", b"\2" * 700), ("k.json", b""))
    want = {"__url__": "u", "__key__": "k", "s1.npy": b"\1" * 512, "s2.npy": b"\2" * 700, "json": b""}
    for tail in (b"", b"\0" * 1024):
        got = P.split_sample(data + tail, "u", 4096)
        assert {k: v if k.startswith("__") else bytes(v) for k, v in got.items()} == want


def test_split_sample_errors_name_the_shard_and_byte():
    two = _sample_bytes(("k.s1.npy", b"\1" * 700), ("k.s2.npy", b"\2" * 1000))
    cases = [
        (two[:-512], "u: byte 5632: member k.s2.npy runs past its sample's index range"),  # 4096 + 512 + 1024
        (two[:1536] + b"\7" + two[1537:], "u: byte 5632: not a tar header (bad checksum); the index or shard is damaged"),
        (two + _sample_bytes(("j.s1.npy", b"")), "u: byte 4096: index range holds samples 'k' and 'j'"),
        (b"\0" * 1024, "u: byte 4096: no member in the sample's index range"),
        (b"", "u: byte 4096: no member in the sample's index range"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError) as e:
            P.split_sample(data, "u", 4096)
        assert str(e.value) == message


def test_whole_shard_reads_seek_past_unwanted_members(ds, monkeypatch):
    """A seekable shard: only headers and the wanted members' bytes are read."""
    shard = str(Path(ds["three"]) / "pairs-000000.tar")
    read = []

    class Counted(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read.append(len(data))
            return data

        def readinto(self, b):
            n = super().readinto(b)
            read.append(n)
            return n

    monkeypatch.setattr(P, "gopen", lambda url, mode: Counted(url, "rb"))
    assert len(list(P.read_shard(shard, ("json",)))) == 9
    assert 0 < sum(read) < Path(shard).stat().st_size // 4


def test_an_unopenable_shard_is_named(tmp_path):
    url = str(tmp_path / "missing.tar")
    with pytest.raises(OSError) as e:
        next(P.read_shard(url))
    assert str(e.value).startswith(f"{url}: cannot open shard: ")


def test_a_given_manifest_is_not_read_again(ds, tmp_path):
    m = read_manifest(ds["three"])
    elsewhere = cfg_for(str(tmp_path / "no-manifest-here"))
    assert P.batches_per_epoch(elsewhere, 1, manifest=m) == 7  # 21 samples // 3


def test_training_batches_carry_their_epoch(ds):
    s = stream(cfg_for(ds["three"], batch_size=7), epoch=2, epochs=2)
    assert [b["epoch"] for b in s] == [2, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("workers", [2, 3])
def test_worker_w_builds_the_ranks_batches_w_w_plus_n_and_so_on(ds, workers):
    s = stream(cfg_for(ds["three"], batch_size=2), 1, 2, epochs=2)
    every = [(e, ids.tolist()) for e, _, ids in s.batch_ids()]  # the defaults: one worker, all batches
    assert len(every) == 2 * len(s) == 10
    assert [[f"loc{i:04d}" for i in ids] for _, ids in every] == keys(list(s))
    per = [[(e, ids.tolist()) for e, _, ids in s.batch_ids(w, workers)] for w in range(workers)]
    assert per == [every[w::workers] for w in range(workers)]


def test_unreadable_samples_are_logged_and_only_they_are_replaced(tmp_path, caplog):
    root = Path(write_dataset(tmp_path / "d", [4] * 8))
    _gone(root, 1)
    with caplog.at_level("WARNING", logger="dsl.data.pairs"):
        batches = list(stream(cfg_for(str(root), batch_size=4, read_retries=0)))
    assert sum(b["skipped"] for b in batches) == 4  # loc0004-0007 only, whatever the batch's shard order
    said = {r.getMessage() for r in caplog.records}
    assert said and all(m.startswith(f"skipping samples of an unavailable shard: {root / 'pairs-000001.tar'} ")
                        for m in said)


def test_empty_batches_of_any_dtype_in_a_worker(monkeypatch):
    monkeypatch.setattr(P, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    t = P._empty((2, 3, 4), torch.uint16)
    assert t.dtype == torch.uint16 and t.shape == (2, 3, 4) and t.is_shared() and t.untyped_storage().nbytes() == 48
    for cls in torch.UntypedStorage.__mro__:  # an older torch: no _new_shared anywhere, copied to shared memory
        if "_new_shared" in vars(cls):
            monkeypatch.delattr(cls, "_new_shared")
    assert not hasattr(torch.UntypedStorage, "_new_shared")
    t = P._empty((5, 2), torch.float16)
    assert t.dtype == torch.float16 and t.shape == (5, 2) and t.is_shared()


def test_raw_training_crops_are_the_normalised_crops(ds):
    """crop 8 of 32 px (not half the patch): the raw window is the same window."""
    cfg = cfg_for(ds["three"], crop_size=8)
    for plain, raw in zip(all_batches(cfg), all_batches(cfg, raw=True), strict=True):
        assert raw["key"] == plain["key"] and raw["s2"].dtype == torch.uint16
        assert torch.equal(raw["s1"].float(), plain["s1"]) and torch.equal(raw["s2"].float(), plain["s2"])


def test_a_decoder_failure_of_another_kind_is_a_corrupt_member(ds, monkeypatch):
    def cut_short(name, data, where):
        raise EOFError("cut short")

    monkeypatch.setattr(P, "decode_array", cut_short)
    with pytest.raises(ValueError) as e:
        all_batches(cfg_for(ds["three"]), train=False)
    shard = Path(ds["three"]) / "pairs-000000.tar"
    assert str(e.value) == f"{shard}: sample 'loc0000': s1.npy: corrupt member (cut short)"


def test_index_errors_name_the_index_or_the_headers(tmp_path):
    root = Path(write_dataset(tmp_path / "v2", [3, 4]))
    table = np.load(root / "index.npy")
    past = table.copy()
    past[-1] = (root / "pairs-000001.tar").stat().st_size + 512
    np.save(root / "index.npy", past)
    m = json.loads((root / "manifest.json").read_text())
    data = (root / "index.npy").read_bytes()
    m["index"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError) as e:  # checked for every shard, not only the selected ones
        stream(cfg_for(str(root), batch_size=1), keys={"pairs-000000.tar": ["loc0000"]})
    assert str(e.value).startswith(f"{root / 'index.npy'}: shard 1's samples end at byte {past[-1]}, past its ")
    old = Path(write_dataset(tmp_path / "v1", [3, 4], index=False))
    m = json.loads((old / "manifest.json").read_text())
    m["shards"][1]["bytes"] = 1024
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError) as e:
        stream(cfg_for(str(old), batch_size=1))
    assert str(e.value).startswith(f"{old} (tar headers): shard 1's samples end at byte ")
    assert str(e.value).endswith(", past its 1024 bytes")


def test_make_loader_settings(ds, monkeypatch):
    cfg = cfg_for(ds["three"], batch_size=4)
    raw = next(iter(P.make_loader(cfg, 0, 1, train=False, raw=True)))
    assert (raw["s1"].dtype, raw["s2"].dtype) == (torch.float16, torch.uint16)
    for pin, cuda in ((True, False), (False, True), (True, True)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        loader = P.make_loader(cfg.model_copy(update={"pin_memory": pin}), 0, 1)
        assert loader.pin_memory is (pin and cuda)
    monkeypatch.undo()
    assert P.make_loader(cfg.model_copy(update={"loader_workers": 2}), 0, 1).prefetch_factor == 2


def test_selecting_every_sample_is_the_unselected_epoch(ds):
    every = {f"pairs-{n:06d}.tar": [f"loc{i:04d}" for i in range(a, b)]
             for n, (a, b) in enumerate(((0, 9), (9, 16), (16, 21)))}
    cfg = cfg_for(ds["three"], batch_size=1)
    assert keys(list(stream(cfg, keys=every))) == keys(list(stream(cfg)))


def test_an_evaluation_stream_checks_each_shard_against_the_manifest(tmp_path):
    root = Path(write_dataset(tmp_path / "e", [4, 3]))
    manifest = json.loads((root / "manifest.json").read_text())
    shard = next(s for s in manifest["shards"] if s["name"] == "pairs-000001.tar")
    assert shard["sha256"] and shard["bytes"]
    shard["sha256"] = "0" * 64  # the shard on disk is no longer the manifest's
    (root / "manifest.json").write_text(json.dumps(manifest))
    cfg = cfg_for(str(root), batch_size=2)
    with pytest.raises(ValueError, match=r"pairs-000001\.tar: the shard is \d+ bytes with sha256 .*corrupt"):
        list(stream(cfg, train=False))


class Trickle(io.RawIOBase):
    """A stream that returns at most ``chunk`` bytes per read (a socket, an HTTP body), not seekable."""

    def __init__(self, data: bytes, chunk: int = 700):
        self.data, self.chunk, self.at = data, chunk, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.chunk if n < 0 else min(n, self.chunk)
        out = self.data[self.at:self.at + n]
        self.at += len(out)
        return out


def test_short_reads_give_the_same_members_and_digest(ds):
    shard = Path(ds["three"]) / "pairs-000002.tar"
    data = shard.read_bytes()
    whole = list(P._members(io.BytesIO(data), "u", P.S1_MEMBERS + P.S2_MEMBERS))
    assert len(whole) > 5
    expect = (len(data), hashlib.sha256(data).hexdigest())
    for chunk in (700, 4096):
        assert list(P._members(Trickle(data, chunk), "u", P.S1_MEMBERS + P.S2_MEMBERS, expect=expect)) == whole


def test_a_member_of_exactly_the_limit_is_read_not_refused(tmp_path):
    edge = tmp_path / "edge.tar"
    info = tarfile.TarInfo("k.s1.npy")
    info.size = P.MAX_SAMPLE_BYTES
    edge.write_bytes(info.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024)  # claims 256 MB, holds none
    with pytest.raises(ValueError) as e:
        list(P.read_shard(str(edge)))
    assert str(e.value) == f"{edge}: byte 512: member k.s1.npy runs past the end of the shard (truncated)"


def test_a_skipped_member_cut_short_is_named_when_the_shard_is_hashed(tmp_path):
    cut = cut_shard(tmp_path / "cut.tar", "k.s2.npy")
    with pytest.raises(ValueError) as e:  # hashed: read through, not skipped by seeking
        list(P.read_shard(str(cut), ("s1.npy",), expect=(3000, "0" * 64)))
    assert str(e.value) == f"{cut}: byte 512: member k.s2.npy runs past the end of the shard (truncated)"


def test_a_shard_that_is_not_the_manifest_s_names_both_sizes_and_digests(ds):
    shard = Path(ds["three"]) / "pairs-000002.tar"
    data = shard.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError) as e:
        list(P.read_shard(str(shard), expect=(len(data) + 512, "abcdef0123456789" * 4)))
    assert str(e.value) == (f"{shard}: the shard is {len(data)} bytes with sha256 {digest[:12]}..., the manifest "
                            f"says {len(data) + 512} bytes, abcdef012345... (corrupt, truncated or replaced)")


def test_a_read_error_is_named_by_its_message(tmp_path, monkeypatch):
    def failing(_):
        raise EOFError("connection reset at byte 4096")
        yield

    shard = tmp_path / "x.tar"
    shard.write_bytes(b"\0" * 1024)
    monkeypatch.setattr(P, "group_by_keys", failing)
    with pytest.raises(OSError) as e:
        list(P.read_shard(str(shard)))
    assert str(e.value) == f"{shard}: cannot read shard: connection reset at byte 4096"


@pytest.mark.parametrize("drop", [("sha256",), ("sha256", "bytes")])
def test_an_evaluation_stream_reads_shards_the_manifest_gives_no_digest_for(tmp_path, drop):
    root = Path(write_dataset(tmp_path / "e", [4, 3]))
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["shards"]:
        for field in drop:
            shard[field] = None  # an older manifest: nothing to check the shard against
    (root / "manifest.json").write_text(json.dumps(manifest))
    batches = list(stream(cfg_for(str(root), batch_size=2), train=False))
    assert sorted(k for b in batches for k in b["key"]) == [f"loc{i:04d}" for i in range(7)]


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


@pytest.mark.parametrize("second, why", [
    ("k.__url__", "member name 'k.__url__' is not <key>.<ext>"),
    ("noext", "member name 'noext' is not <key>.<ext>"),
    ("k.s1.npy", "member 'k.s1.npy' comes twice"),
])
def test_a_sample_s_bad_member_is_named_at_its_byte_in_the_shard(second, why):
    data = _member("k.s1.npy", b"x" * 10) + _member(second, b"y" * 10)
    with pytest.raises(ValueError) as e:
        P.split_sample(data, "s3://b/pairs-000003.tar", 10240)
    assert str(e.value) == f"s3://b/pairs-000003.tar: byte {10240 + 1024}: {why}"


@pytest.mark.parametrize("size_field", [b"-0000000017\0", b"+0000000017\0", b"0o000000017\0", b"0000_000017\0"])
def test_a_signed_or_decorated_size_with_a_good_checksum_is_refused(size_field):
    header = bytearray(_member("k.s1.npy", b"")[:512])
    header[124:136] = size_field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)  # a checksum that matches: only the size field is wrong
    with pytest.raises(ValueError) as e:
        P.split_sample(bytes(header) + b"\0" * 1024, "u", 0)
    assert str(e.value) == "u: byte 0: not a tar header (bad number field); the index or shard is damaged"
