"""``dsl.data.pairs`` in detail: the dealing, the worker roles of a resume, the crop windows, the
shared-memory batches, and every error message, in one process.

DataLoader workers are other processes, so the worker side is also run here with a faked
``get_worker_info`` (:func:`emulate`), and checked against a real 2-worker DataLoader: what
the workers do is then visible to assertions and to ``make mutate`` (mutmut only traces the
test process). The stream's samples say where they come from (``fixtures.shards``): S1 band 0/1
hold each pixel's row/column, so a crop's window is its top-left value.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures.shards import SIZE, all_batches, cfg_for, write_dataset

import dsl.data.pairs as P
from dsl.contracts.manifest import read_manifest
from dsl.contracts.shard_format import encode_npy


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pairs-edges")
    return {
        "three": write_dataset(root / "three", [9, 7, 5]),
        "labels": write_dataset(root / "labels", [6], labels=True),
        "one": write_dataset(root / "one", [1]),
    }


def stream(cfg, rank: int = 0, world: int = 1, **kw) -> P.PairStream:
    return P.PairStream(cfg, read_manifest(cfg.shards), rank, world, **kw)


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


# ---------------------------------------------------------------- workers, roles, resume


@pytest.mark.parametrize(("train", "rank"), [(True, 0), (True, 1), (False, 1)])
def test_a_two_worker_loader_is_its_workers_in_turn(ds, monkeypatch, train, rank):
    cfg = cfg_for(ds["three"], loader_workers=2, batch_size=2)
    real = all_batches(cfg, rank, 2, train=train)
    assert len(real) == len(stream(cfg, rank, 2, train=train)) > 2
    assert same(emulate(cfg, monkeypatch, rank, 2, train=train), real)


def test_resume_with_two_workers_continues_exactly(ds, monkeypatch):
    cfg = cfg_for(ds["three"], loader_workers=2, batch_size=2, shuffle_buffer=3)
    full = emulate(cfg, monkeypatch, 1, 2)
    n = len(full)
    assert n == 5  # 21 samples // (2 ranks x 2)
    for k in range(n + 1):
        resumed = emulate(cfg, monkeypatch, 1, 2, start_batch=k)
        assert same(resumed, full[k:]), f"resumed at batch {k}"
        assert len(stream(cfg, 1, 2, start_batch=k)) == n - k


def test_a_stream_for_workers_refuses_to_run_in_the_main_process(ds):
    s = stream(cfg_for(ds["three"], loader_workers=2))
    with pytest.raises(RuntimeError) as e:
        next(iter(s))
    assert str(e.value) == "stream built for 2 workers runs in 1; use make_loader"


def test_the_first_epoch_of_seed_0_is_pinned(ds):
    """A seed fixes shard order, shuffle and crops: this epoch is what seed 0 has always given."""
    batches = all_batches(cfg_for(ds["three"]))
    assert keys(batches) == [
        ["loc0002", "loc0004", "loc0001"], ["loc0000", "loc0007", "loc0005"], ["loc0008", "loc0006", "loc0011"],
        ["loc0003", "loc0013", "loc0014"], ["loc0009", "loc0016", "loc0017"], ["loc0018", "loc0015", "loc0020"],
        ["loc0010", "loc0019", "loc0012"]]
    assert [windows(b) for b in batches] == [
        [(14, 1), (10, 11), (4, 8)], [(11, 16), (5, 4), (0, 6)], [(14, 16), (12, 4), (16, 4)],
        [(13, 0), (6, 0), (12, 15)], [(15, 12), (9, 9), (13, 16)], [(2, 2), (14, 5), (14, 16)],
        [(16, 1), (14, 2), (10, 3)]]


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


def test_shuffle_buffer():
    assert list(P._shuffle(iter(range(10)), 3, np.random.default_rng(0))) == [2, 1, 4, 0, 6, 7, 8, 9, 5, 3]
    assert list(P._shuffle(iter(range(5)), 2, np.random.default_rng(1))) == [0, 1, 3, 2, 4]
    for size in (0, 1):  # no buffer: the order as read
        assert list(P._shuffle(iter(range(6)), size, np.random.default_rng(0))) == list(range(6))
    out = list(P._shuffle(iter(range(50)), 7, np.random.default_rng(2)))
    assert sorted(out) == list(range(50)) and out != list(range(50))


def test_a_pass_of_one_sample_cycles(ds):
    batches = all_batches(cfg_for(ds["one"], batch_size=1, samples_per_epoch=3))
    assert keys(batches) == [["loc0000"]] * 3


# ---------------------------------------------------------------- batches and crops


def test_crop_windows_span_the_whole_image(ds):
    s = stream(cfg_for(ds["three"]))
    raw = list(P.read_shard(s.urls[0]))[:3]
    c = 16
    batch = s._batch(raw, np.array([[0.0, 0.99999], [0.99999, 0.0], [0.5, 0.25]]))
    assert windows(batch) == [(0, SIZE - c), (SIZE - c, 0), (int(0.5 * (SIZE - c + 1)), int(0.25 * (SIZE - c + 1)))]
    assert windows(s._batch(raw, None)) == [((SIZE - c) // 2, (SIZE - c) // 2)] * 3  # evaluation: centre
    assert batch["s1"].dtype == torch.float32 and batch["s1"].shape == (3, 2, c, c) and batch["s2"].shape == (3, 13, c, c)


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


def test_only_the_wanted_members_are_read(ds, monkeypatch):
    seen = []
    read_shard = P.read_shard

    def spy(url, wanted, keys=None):
        seen.append(wanted)
        return read_shard(url, wanted, keys)

    monkeypatch.setattr(P, "read_shard", spy)
    all_batches(cfg_for(ds["labels"], samples_per_epoch=3))
    assert seen and set(seen) == {("s1.npy", "s2.npy")}
    seen.clear()
    all_batches(cfg_for(ds["labels"], samples_per_epoch=3), labels=True)
    assert seen and set(seen) == {("s1.npy", "s2.npy", "cls", "multi.npy")}


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


def test_read_shard_streams_a_pipe_and_skips_folders(tmp_path, ds, monkeypatch):
    shard = str(Path(ds["three"]) / "pairs-000002.tar")
    want = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in P.read_shard(shard)]
    assert want == [(f"loc{i:04d}", ["s1.npy", "s2.npy"]) for i in range(16, 21)]  # the default members
    monkeypatch.setattr(P, "gopen", lambda url, mode: NonSeekable(url))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in P.read_shard(shard)] == want
    monkeypatch.undo()
    with_dir = tmp_path / "dir.tar"
    with tarfile.open(shard) as src, tarfile.open(with_dir, "w") as dst:
        d = tarfile.TarInfo("loc0016.s1.npy.d")
        d.type = tarfile.DIRTYPE
        dst.addfile(d)
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
    got = list(P.read_shard(str(with_dir), ("s1.npy", "json")))
    assert [sorted(k for k in s if not k.startswith("__")) for s in got] == [["json", "s1.npy"]] * 5


def test_read_shard_errors_name_the_shard(tmp_path, monkeypatch):
    cut = tmp_path / "cut.tar"
    with tarfile.open(cut, "w") as tar:
        info = tarfile.TarInfo("k.s1.npy")
        info.size = 10_000
        tar.addfile(info, io.BytesIO(b"\1" * 10_000))
    cut.write_bytes(cut.read_bytes()[:3000])
    with pytest.raises(OSError) as e:
        list(P.read_shard(str(cut), ("s1.npy",)))
    assert str(e.value) == f"{cut}: cannot read shard: 'unexpected end of data'"

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
    for rank, world in ((2, 2), (-1, 2)):
        with pytest.raises(ValueError) as e:
            stream(cfg, rank, world)
        assert str(e.value) == f"rank {rank} is outside world_size {world}"
    stream(cfg, 1, 2)
    with pytest.raises(ValueError) as e:
        stream(cfg_for(ds["one"], loader_workers=1), 1, 2)
    assert str(e.value) == (f"{ds['one']}: slot 1 (rank 1, worker 0) gets no samples: 1 samples in 1 shards for 2 "
                            "rank x worker slots; use fewer data.loader_workers")
    with pytest.raises(ValueError) as e:
        stream(cfg_for(ds["three"], batch_size=11), 0, 2)
    assert str(e.value) == "data.batch_size 11 x 2 ranks exceeds the 21 samples per epoch: not one full batch"
    assert len(stream(cfg_for(ds["three"], batch_size=10), 0, 2)) == 1  # exactly one full batch
    assert len(stream(cfg, start_batch=7)) == 0  # the epoch's end: nothing left
    for start in (8, -1):
        with pytest.raises(ValueError) as e:
            stream(cfg, start_batch=start)
        assert str(e.value) == f"start_batch {start} outside the epoch's 7 batches"
    with pytest.raises(ValueError) as e:
        stream(cfg, start_batch=1, train=False)
    assert str(e.value) == "start_batch is for training streams; evaluation reads the split whole"


def test_key_selections_are_checked(ds):
    cfg = cfg_for(ds["three"])
    unknown = {f"x{i}.tar": ["a"] for i in range(4)}
    with pytest.raises(ValueError) as e:
        stream(cfg, keys=unknown)
    assert str(e.value) == "key selection names shards ['x0.tar', 'x1.tar', 'x2.tar'] that are not in split None"
    with pytest.raises(ValueError) as e:
        stream(cfg, keys={"pairs-000000.tar": []})
    assert str(e.value) == "the key selection keeps no sample of split None"
    s = stream(cfg_for(ds["three"], batch_size=1), keys={"pairs-000001.tar": ["nowhere"]})
    with pytest.raises(ValueError) as e:
        next(iter(s))
    assert str(e.value) == (f"shards ['{Path(ds['three']) / 'pairs-000001.tar'}'] yielded no samples "
                            "(manifest says otherwise)")
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

    root = write_dataset(tmp_path / "a", [3], members=drop_s2)
    with pytest.raises(ValueError) as e:
        all_batches(cfg_for(root), train=False)
    assert str(e.value) == f"{root}/pairs-000000.tar: sample 'loc0001' has no member s2.npy"
    root = write_dataset(tmp_path / "b", [3], members=bad_member(".s1.npy", b""))  # np.load: EOFError
    with pytest.raises(ValueError) as e:
        all_batches(cfg_for(root), train=False)
    assert re.fullmatch(re.escape(f"{root}/pairs-000000.tar: sample 'loc0001': s1.npy: corrupt .npy (") + r".+\)",
                        str(e.value)), str(e.value)
    assert isinstance(e.value.__cause__, EOFError)
    root = write_dataset(tmp_path / "c", [3], members=bad_member(".s1.npy", encode_npy(np.zeros(3))[:-9]))
    with pytest.raises(ValueError) as e:  # the reader's own message stands
        all_batches(cfg_for(root), train=False)
    assert str(e.value).startswith(f"{root}/pairs-000000.tar: sample 'loc0001': s1.npy: not a plain numeric .npy (")


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
