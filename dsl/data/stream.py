"""A training job's endless batch stream, resumable at any sample of any epoch.

The job's position (``{"epoch", "sample"}``: samples of that epoch all ranks together consumed)
is the only state: it goes into every checkpoint, and a stream started from it yields exactly the
batches an uninterrupted run would have yielded next, on any number of ranks, reading nothing it
skips (:class:`~dsl.data.pairs.SampleStream`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from dsl.contracts.config import DataConfig
from dsl.contracts.manifest import Manifest, read_manifest
from dsl.data.dealing import batches_left
from dsl.data.pairs import batches_per_epoch, make_loader


def epoch_length(cfg: DataConfig, manifest: Manifest) -> int:
    """Samples in a training epoch: ``data.samples_per_epoch`` or the split's count."""
    return cfg.samples_per_epoch or batches_per_epoch(cfg.model_copy(update={"batch_size": 1}), 1, manifest)


def advance(position: dict, length: int, world_size: int, batch_size: int) -> None:
    """Count one global batch as consumed; roll over to the next epoch when no full one is left."""
    position["sample"] += world_size * batch_size
    if batches_left(length, position["sample"], world_size, batch_size) == 0:
        position.update(epoch=position["epoch"] + 1, sample=0)


def resume_stream(cfg: DataConfig, rank: int, world_size: int, position: dict,
                  manifest: Manifest | None = None, raw: bool = False) -> Iterator[dict]:
    """Batches for one rank from ``position`` on, epoch after epoch, without end.

    One DataLoader (and its workers) for the whole job: no idle accelerator between epochs.
    ``position`` is advanced in place as batches are handed out: when a batch is yielded it
    already counts as consumed, so a checkpoint written after the step that used it records a
    position that resumes at the next batch. Every rank ends each epoch on the same batch.

    Args:
        cfg: The training data settings.
        rank: This rank.
        world_size: Data-parallel ranks.
        position: ``{"epoch": int, "sample": int}``, updated in place.
        manifest: The dataset's manifest (read from ``cfg.shards`` when None).
        raw: Batches of raw values, to normalise on the device (see :func:`make_loader`).

    Raises:
        ValueError: Too few samples for one batch per rank.
    """
    manifest = manifest if manifest is not None else read_manifest(cfg.shards)
    length = epoch_length(cfg, manifest)
    if batches_left(length, 0, world_size, cfg.batch_size) < 1:
        raise ValueError(f"{cfg.shards}: too few samples for {world_size} ranks x batch {cfg.batch_size}")
    if batches_left(length, position["sample"], world_size, cfg.batch_size) == 0:  # resumed at an epoch's end
        position.update(epoch=position["epoch"] + 1, sample=0)
    loader = make_loader(cfg, rank, world_size, epoch=position["epoch"], start_sample=position["sample"],
                         manifest=manifest, raw=raw, epochs=None)
    for batch in loader:
        advance(position, length, world_size, cfg.batch_size)
        yield batch


def with_positions(batches: Iterable[dict], position: dict) -> Iterator[tuple[dict, dict]]:
    """Each batch of a :func:`resume_stream` with a copy of ``position`` as it stood after that batch.

    ``position`` runs ahead of training when batches are read ahead (a device prefetch holds
    the next batch while the step uses this one): a checkpoint must record the copy that came
    with the last batch a step used, or a resumed job would skip the batches read ahead.
    """
    for batch in batches:
        yield batch, dict(position)
