"""dsl.data.stream: a resumed stream yields exactly what an uninterrupted one yields next."""

from __future__ import annotations

import itertools

import pytest
import torch
from fixtures.shards import cfg_for, keys_of, write_dataset

import dsl.data.pairs as pairs_module
import dsl.data.stream as stream_module
from dsl.contracts.manifest import read_manifest
from dsl.contracts.shard_format import MANIFEST
from dsl.data import batches_per_epoch, make_loader, resume_stream
from dsl.data.stream import epoch_length


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("stream"), [13, 9, 5])


def _run(cfg, rank: int, world: int, position: dict, n: int) -> list[tuple[tuple[str, ...], dict]]:
    """The next ``n`` batches' keys, each with the position a checkpoint after it would record."""
    out = []
    for batch in itertools.islice(resume_stream(cfg, rank, world, position), n):
        out.append((tuple(batch["key"]), dict(position)))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_resume_from_any_batch_continues_the_same_stream(shards, world):
    cfg = cfg_for(shards, batch_size=2)
    per_epoch = batches_per_epoch(cfg, world)
    step = world * cfg.batch_size  # samples one global batch consumes
    n = 2 * per_epoch + 3  # into the third epoch
    for rank in range(world):
        full = _run(cfg, rank, world, {"epoch": 0, "sample": 0}, n)
        positions = [p for _, p in full]
        assert positions[0] == {"epoch": 0, "sample": step}
        assert positions[per_epoch - 2] == {"epoch": 0, "sample": (per_epoch - 1) * step}
        assert positions[per_epoch - 1] == {"epoch": 1, "sample": 0}  # an epoch's last: rolled over
        assert positions[per_epoch] == {"epoch": 1, "sample": step}
        for k in (1, per_epoch - 1, per_epoch, per_epoch + 2):  # mid-epoch, at and after its end
            resumed = _run(cfg, rank, world, dict(full[k - 1][1]), n - k)
            assert resumed == full[k:], f"rank {rank}, resumed after batch {k}"
        # a position left at an epoch's end (not rolled over) resumes with the next epoch
        at_end = _run(cfg, rank, world, {"epoch": 0, "sample": per_epoch * step}, n - per_epoch)
        assert at_end == full[per_epoch:]


def test_every_rank_gets_the_same_batches_per_epoch(shards):
    cfg = cfg_for(shards, batch_size=2)
    per_epoch = batches_per_epoch(cfg, 2)
    runs = [_run(cfg, rank, 2, {"epoch": 0, "sample": 0}, 2 * per_epoch) for rank in (0, 1)]
    for run in runs:  # both ranks roll over after the same batch
        positions = [p for _, p in run]
        assert positions[per_epoch - 1] == {"epoch": 1, "sample": 0} and positions[-1] == {"epoch": 2, "sample": 0}
        assert all(p["epoch"] == 0 for p in positions[: per_epoch - 1])
    for e in (0, 1):  # and never share a sample within an epoch
        epoch = [{k for keys, _ in run[e * per_epoch : (e + 1) * per_epoch] for k in keys} for run in runs]
        assert not epoch[0] & epoch[1] and len(epoch[0]) == len(epoch[1]) == per_epoch * 2


def test_a_position_saved_on_two_ranks_resumes_on_one(shards):
    """The position counts samples, not batches: another world size continues the same order."""
    cfg = cfg_for(shards, batch_size=2)
    position = {"epoch": 0, "sample": 0}
    for _ in itertools.islice(resume_stream(cfg, 1, 2, position), 3):
        pass
    assert position == {"epoch": 0, "sample": 12}
    order = keys_of(list(make_loader(cfg_for(shards, batch_size=1), 0, 1)))
    resumed = _run(cfg, 0, 1, position, 2)
    assert [list(k) for k, _ in resumed] == [order[12:14], order[14:16]]
    assert resumed[-1][1] == {"epoch": 0, "sample": 16}


def test_too_few_samples_is_an_error(shards):
    with pytest.raises(ValueError, match="too few samples for 2 ranks x batch 100"):
        next(resume_stream(cfg_for(shards, batch_size=100), 0, 2, {"epoch": 0, "sample": 0}))


def test_an_epoch_of_exactly_one_global_batch_runs(shards):
    cfg = cfg_for(shards, batch_size=2, samples_per_epoch=4)
    position = {"epoch": 0, "sample": 0}
    got = [dict(position) for _ in itertools.islice(resume_stream(cfg, 1, 2, position), 2)]
    assert got == [{"epoch": 1, "sample": 0}, {"epoch": 2, "sample": 0}]


def test_batches_are_normalised_unless_raw_is_asked_for(shards):
    cfg = cfg_for(shards, batch_size=2)
    plain = next(resume_stream(cfg, 0, 1, {"epoch": 0, "sample": 0}))
    assert (plain["s1"].dtype, plain["s2"].dtype) == (torch.float32, torch.float32)
    raw = next(resume_stream(cfg, 0, 1, {"epoch": 0, "sample": 0}, raw=True))
    assert (raw["s1"].dtype, raw["s2"].dtype) == (torch.float16, torch.uint16)
    assert raw["key"] == plain["key"] and torch.equal(raw["s2"].float(), plain["s2"])


def test_a_given_manifest_is_all_the_stream_reads_of_it(tmp_path):
    """The training loop passes the manifest it has: the stream must not read it again."""
    root = write_dataset(tmp_path / "d", [5, 4])
    cfg = cfg_for(root, batch_size=2)
    manifest = read_manifest(root)
    expect = [b["key"] for b in itertools.islice(resume_stream(cfg, 0, 1, {"epoch": 0, "sample": 0}), 5)]
    (tmp_path / "d" / MANIFEST).unlink()
    position = {"epoch": 0, "sample": 0}
    got = [b["key"] for b in itertools.islice(resume_stream(cfg, 0, 1, position, manifest=manifest), 5)]
    assert got == expect and position == {"epoch": 1, "sample": 2}  # 9 samples: 4 batches per epoch
    assert epoch_length(cfg, manifest) == 9


def test_without_a_manifest_the_stream_reads_it_once(shards, monkeypatch):
    calls = []

    def counted(url):
        calls.append(url)
        return read_manifest(url)

    monkeypatch.setattr(stream_module, "read_manifest", counted)
    monkeypatch.setattr(pairs_module, "read_manifest", counted)
    next(resume_stream(cfg_for(shards, batch_size=2), 0, 1, {"epoch": 0, "sample": 0}))
    assert calls == [shards]
