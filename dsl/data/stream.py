"""A training job's endless batch stream, resumable at any batch of any epoch.

The job's position (``{"epoch", "batch"}``: batches of that epoch consumed) is the only state:
it goes into every checkpoint, and a stream started from it yields exactly the batches an
uninterrupted run would have yielded next, skipping the consumed ones undecoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from dsl.contracts.config import DataConfig
from dsl.contracts.manifest import Manifest
from dsl.data.pairs import batches_per_epoch, make_loader


def resume_stream(cfg: DataConfig, rank: int, world_size: int, position: dict,
                  manifest: Manifest | None = None, raw: bool = False) -> Iterator[dict]:
    """Batches for one rank from ``position`` on, epoch after epoch, without end.

    ``position`` is advanced in place as batches are handed out: when a batch is yielded it
    already counts as consumed, so a checkpoint written after the step that used it records a
    position that resumes at the next batch. Every rank ends each epoch on the same batch (the
    loader gives every rank :func:`~dsl.data.pairs.batches_per_epoch` batches).

    Args:
        cfg: The training data settings.
        rank: This rank.
        world_size: Data-parallel ranks.
        position: ``{"epoch": int, "batch": int}``, updated in place.
        manifest: The dataset's manifest (read from ``cfg.shards`` when None).
        raw: Batches of raw values, to normalise on the device (see :func:`make_loader`).

    Raises:
        ValueError: Too few samples for one batch per rank.
    """
    per_epoch = batches_per_epoch(cfg, world_size, manifest)
    if per_epoch < 1:
        raise ValueError(f"{cfg.shards}: too few samples for {world_size} ranks x batch {cfg.batch_size}")
    while True:
        if position["batch"] >= per_epoch:  # the epoch is over (also when resumed right at its end)
            position.update(epoch=position["epoch"] + 1, batch=0)
        loader = make_loader(cfg, rank, world_size, epoch=position["epoch"], start_batch=position["batch"],
                             manifest=manifest, raw=raw)
        start = position["batch"]
        for batch in loader:
            position["batch"] += 1
            yield batch
            if position["batch"] >= per_epoch:
                break
        if position["batch"] == start:  # never spin on an empty loader
            raise RuntimeError(f"{cfg.shards}: no batch at epoch {position['epoch']}, batch {start} "
                               f"of {per_epoch}")


def with_positions(batches: Iterable[dict], position: dict) -> Iterator[tuple[dict, dict]]:
    """Each batch of a :func:`resume_stream` with a copy of ``position`` as it stood after that batch.

    ``position`` runs ahead of training when batches are read ahead (a device prefetch holds
    the next batch while the step uses this one): a checkpoint must record the copy that came
    with the last batch a step used, or a resumed job would skip the batches read ahead.
    """
    for batch in batches:
        yield batch, dict(position)
