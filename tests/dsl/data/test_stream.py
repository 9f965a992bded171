"""dsl.data.stream: a resumed stream yields exactly what an uninterrupted one yields next."""

from __future__ import annotations

import itertools

import pytest
from fixtures.shards import cfg_for, write_dataset

from dsl.data import batches_per_epoch, resume_stream


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
    n = 2 * per_epoch + 3  # into the third epoch
    for rank in range(world):
        full = _run(cfg, rank, world, {"epoch": 0, "batch": 0}, n)
        assert [p for _, p in full][per_epoch - 1] == {"epoch": 0, "batch": per_epoch}  # an epoch's last
        assert [p for _, p in full][per_epoch] == {"epoch": 1, "batch": 1}
        for k in (1, per_epoch - 1, per_epoch, per_epoch + 2):  # mid-epoch, at and after its end
            resumed = _run(cfg, rank, world, dict(full[k - 1][1]), n - k)
            assert resumed == full[k:], f"rank {rank}, resumed after batch {k}"


def test_every_rank_gets_the_same_batches_per_epoch(shards):
    cfg = cfg_for(shards, batch_size=2)
    per_epoch = batches_per_epoch(cfg, 2)
    for rank in (0, 1):
        positions = [p for _, p in _run(cfg, rank, 2, {"epoch": 0, "batch": 0}, 2 * per_epoch)]
        assert positions[-1] == {"epoch": 1, "batch": per_epoch}


def test_too_few_samples_is_an_error(shards):
    with pytest.raises(ValueError, match="too few samples for 2 ranks x batch 100"):
        next(resume_stream(cfg_for(shards, batch_size=100), 0, 2, {"epoch": 0, "batch": 0}))
