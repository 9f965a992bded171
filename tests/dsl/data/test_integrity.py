"""Shard integrity while streaming: bad samples are dropped, counted and named; good ones kept.

Each test damages real shards (written by the ingest's ShardWriter, with the index and sample
digests the ingest writes) in one way and reads a whole training epoch: the batches must hold
every good sample exactly once (stand-ins for the dropped ones are other good samples), no bad
value, and the counts and warnings must say what was dropped and why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from fixtures.shards import SIZE, cfg_for, keys_of, sample_arrays, write_dataset

from dsl.contracts.manifest import read_manifest
from dsl.contracts.shard_format import encode_npy
from dsl.data import pairs as P

SIZES = [6, 6, 6, 6]  # loc0000..loc0023; shard 1 holds loc0006..loc0011
SHARD1 = {f"loc{i:04d}" for i in range(6, 12)}


def epoch(root: str | Path, caplog, **kw) -> tuple[list[dict], str]:
    """One training epoch of rank 0 of 1 (batch 4) and the warnings it logged."""
    cfg = cfg_for(str(root), batch_size=4, read_retries=0, **kw)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsl.data.pairs"):
        batches = list(P.SampleStream(cfg, read_manifest(cfg.shards), 0, 1))
    return batches, caplog.text


def check(batches: list[dict], dropped: set[str], bad: int = 0, skipped: int = 0) -> None:
    keys = keys_of(batches)
    assert len(batches) == 6 and all(len(b["key"]) == 4 == len(set(b["key"])) for b in batches)
    assert not dropped & set(keys)
    good = {f"loc{i:04d}" for i in range(24)} - dropped
    assert good <= set(keys)  # every good sample trained on (stand-ins are extra copies of good ones)
    assert sum(b["bad"] for b in batches) == bad and sum(b["skipped"] for b in batches) == skipped
    for b in batches:
        assert b["s1"].isfinite().all() and b["s2"].isfinite().all()


def with_s1(value: float, which: set[int]):
    def members(idx, m):
        if idx not in which:
            return m
        s1 = sample_arrays(idx, SIZE)[0]
        s1[:] = value
        return [(n, encode_npy(s1) if n.endswith(".s1.npy") else d) for n, d in m]
    return members


def test_a_nan_shard_is_dropped_sample_by_sample(tmp_path, caplog):
    root = write_dataset(tmp_path / "d", SIZES, members=with_s1(np.nan, set(range(6, 12))))
    batches, said = epoch(root, caplog)
    check(batches, SHARD1, bad=6)
    assert "dropping a bad sample: " in said and "pairs-000001.tar: sample 'loc0006': s1 has non-finite values" in said
    # a shard's first three are named, then the 4th (8th, 16th ...) with the count so far
    lines = [line for line in said.splitlines() if "dropping a bad sample: " in line]
    assert len(lines) == 4 and lines[3].endswith("(4 so far in this shard)")
    assert not any("so far in this shard" in line for line in lines[:3])


def test_one_nan_pixel_outside_the_crop_still_drops_the_sample(tmp_path, caplog):
    def members(idx, m):
        if idx != 3:
            return m
        s1 = sample_arrays(idx, SIZE)[0]
        s1[1, SIZE - 1, SIZE - 1] = np.inf  # the corner a 16-px window may never cover this epoch
        return [(n, encode_npy(s1) if n.endswith(".s1.npy") else d) for n, d in m]

    batches, said = epoch(write_dataset(tmp_path / "d", SIZES, members=members), caplog)
    check(batches, {"loc0003"}, bad=1)
    assert "sample 'loc0003': s1 has non-finite values" in said


@pytest.mark.parametrize(("member", "value", "why"), [
    (".s1.npy", np.full((2, SIZE, SIZE), 1e4, np.float32), "s1 has values 10000..10000 outside data.s1_range [-100, 60]"),
    (".s1.npy", np.full((2, SIZE, SIZE), -300, np.float64), "s1 has values -300..-300 outside data.s1_range"),
    (".s2.npy", np.full((13, SIZE, SIZE), 70000, np.float32), "s2 has values 70000..70000 outside data.s2_range"),
    (".s2.npy", np.full((13, SIZE, SIZE), -5000, np.int32), "s2 has values -5000..-5000 outside data.s2_range"),
])
def test_out_of_range_values_are_dropped(tmp_path, caplog, member, value, why):
    def members(idx, m):
        return [(n, encode_npy(value) if idx == 8 and n.endswith(member) else d) for n, d in m]

    batches, said = epoch(write_dataset(tmp_path / "d", SIZES, members=members), caplog)
    check(batches, {"loc0008"}, bad=1)
    assert f"sample 'loc0008': {why}" in said


def test_the_ranges_are_configurable(tmp_path, caplog):
    root = write_dataset(tmp_path / "d", SIZES, members=with_s1(45.0, {17}))  # others: 0..31
    batches, _ = epoch(root, caplog)
    check(batches, set(), bad=0)  # 45 dB is inside the default [-100, 60]
    batches, said = epoch(root, caplog, s1_range=(-100.0, 40.0))
    check(batches, {"loc0017"}, bad=1)
    assert "sample 'loc0017': s1 has values 45..45 outside data.s1_range [-100, 40]" in said


@pytest.mark.parametrize("dtype", [np.complex64, "U4", "datetime64[s]", [("a", "<f4"), ("b", "<f4")], np.bool_])
def test_odd_dtypes_are_bad_samples_not_crashes(tmp_path, caplog, dtype):
    value = np.zeros((2, SIZE, SIZE), dtype=dtype)

    def members(idx, m):
        return [(n, encode_npy(value) if idx == 20 and n.endswith(".s1.npy") else d) for n, d in m]

    batches, said = epoch(write_dataset(tmp_path / "d", SIZES, members=members), caplog)
    check(batches, {"loc0020"}, bad=1)
    assert "pairs-000003.tar: sample 'loc0020': s1" in said


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_bit_fails_the_sample_digest(tmp_path, caplog):
    root = Path(write_dataset(tmp_path / "d", SIZES))
    index = np.load(root / "index.npy")
    shard2 = root / "pairs-000002.tar"
    # one bit of loc0013's S2 data (sample 1 of shard 2, its range ends at entry 16 of the index:
    # json member 1024 bytes, S2 padding 384 before it): it still decodes, same size
    _flip(shard2, int(index[(6 + 1) * 2 + 2]) - 1600)
    batches, said = epoch(root, caplog)
    check(batches, {"loc0013"}, bad=1)
    assert f"{shard2}: bytes [" in said and ("differ from the sample's digest in the manifest's digests (corrupt or "
                                             "replaced shard)") in said


def test_without_digests_a_flipped_bit_goes_unseen(tmp_path, caplog):
    """The digests are what catches it: a dataset written before them trains on the damage."""
    root = Path(write_dataset(tmp_path / "d", SIZES, digests=False))
    index = np.load(root / "index.npy")
    _flip(root / "pairs-000002.tar", int(index[(6 + 1) * 2 + 2]) - 1600)
    batches, _ = epoch(root, caplog)
    check(batches, set(), bad=0)


def test_a_shard_truncated_mid_epoch_is_skipped_and_counted(tmp_path, caplog):
    root = Path(write_dataset(tmp_path / "d", SIZES))
    cfg = cfg_for(str(root), batch_size=4, read_retries=0)
    s = P.SampleStream(cfg, read_manifest(cfg.shards), 0, 1)
    it = iter(s)
    first = next(it)
    shard = root / "pairs-000001.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # the storage lost its second half while the job ran
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="dsl.data.pairs"):
        batches = [first, *it]
    lost = SHARD1 - set(first["key"])
    check(batches, lost, skipped=len(lost) + first["skipped"])
    assert f"the shard is {size // 2} bytes, the manifest says {size} (truncated or replaced)" in caplog.text


def test_a_replaced_shard_of_the_same_size_is_caught_by_the_digests(tmp_path, caplog):
    root = Path(write_dataset(tmp_path / "d", SIZES))
    other = Path(write_dataset(tmp_path / "other", [6, 6, 6, 6], members=with_s1(-7.0, set(range(24)))))
    os.replace(other / "pairs-000001.tar", root / "pairs-000001.tar")  # same layout, other values
    batches, said = epoch(root, caplog)
    check(batches, SHARD1, bad=6)
    assert said.count("differ from the sample's digest") >= 3


def test_warnings_are_bounded_per_shard(tmp_path, caplog):
    root = write_dataset(tmp_path / "d", [40, 8], members=with_s1(np.nan, set(range(40))))
    cfg = cfg_for(str(root), batch_size=2, read_retries=0, shuffle_block=64, samples_per_epoch=8)
    with caplog.at_level(logging.WARNING, logger="dsl.data.pairs"):
        s = P.SampleStream(cfg, read_manifest(cfg.shards), 0, 1, epochs=None)
        it = iter(s)
        batches = [next(it) for _ in range(40)]
    bad = sum(b["bad"] for b in batches)
    assert bad > 16  # NaN samples met again and again: a warning each for the 1st-3rd, then the 4th, 8th ...
    assert len(caplog.records) == 3 + len([n for n in (4, 8, 16, 32, 64) if n <= bad])


def first_three_of_each(lines: list[str]) -> list[int]:
    """How many of shards 1 and 2's warnings came without a count: their first three each
    (stand-ins found bad or unavailable add later, counted ones: 4th, 8th ...)."""
    return [len([x for x in lines if f"pairs-00000{i}.tar" in x and "so far in this shard" not in x]) for i in (1, 2)]


def test_each_shard_has_its_own_warning_count(tmp_path, caplog):
    # shards 1 and 2 all NaN (12 bad samples): each shard's first three named, then its 4th
    root = write_dataset(tmp_path / "d", SIZES, members=with_s1(np.nan, set(range(6, 18))))
    batches, said = epoch(root, caplog)
    lines = [line for line in said.splitlines() if "dropping a bad sample" in line]
    assert first_three_of_each(lines) == [3, 3]


def test_each_unavailable_shard_is_named(tmp_path, caplog):
    root = Path(write_dataset(tmp_path / "d", SIZES))
    for i in (1, 2):
        (root / f"pairs-00000{i}.tar").unlink()  # lost after the manifest was written
    batches, said = epoch(root, caplog)
    assert sum(b["skipped"] for b in batches) == 12
    lines = [line for line in said.splitlines() if "skipping samples of an unavailable shard" in line]
    assert first_three_of_each(lines) == [3, 3]


def test_values_on_the_range_limits_are_kept(tmp_path, caplog):
    # one sample's S1 at exactly data.s1_range's low limit, another's at its high limit: both valid
    members = with_s1(-100.0, {5})
    high = with_s1(60.0, {17})
    root = write_dataset(tmp_path / "d", SIZES, members=lambda idx, m: high(idx, members(idx, m)))
    batches, said = epoch(root, caplog, s1_range=(-100.0, 60.0))
    check(batches, set())
    assert "dropping" not in said
