"""Streaming co-located S1/S2 pairs from WebDataset shards into equal, deterministic batches.

Work is cut into *slots*, one per (rank, DataLoader worker). A slot owns a disjoint set of
shards, or, when there are fewer shards than slots, every k-th sample of a shared shard. In
training each slot cycles over its shards (reshuffled each pass, shuffle buffer within a pass)
until it has produced its fixed quota of batches, so every rank yields exactly
:func:`batches_per_epoch` batches whatever the shard layout: uneven ranks would hang the
collective ops of distributed training.

Determinism and resume: every random choice (shard order, shuffle buffer, crop window) comes
from RNGs seeded by (seed, epoch, rank, slot role), and each worker builds whole batches that
the DataLoader returns round-robin, so global batch ``b`` of a rank is batch ``b // W`` of role
``b % W``. A restart at ``start_batch=K`` gives DataLoader worker ``w`` the role ``(K + w) % W``
and lets it skip ``(K + w) // W`` batches as raw bytes (read but never decoded), so the resumed
stream continues exactly where the interrupted one stopped.

Subsets: ``keys`` (shard name -> keys to keep, e.g. a label fraction) restricts a stream to
those samples. Unselected members are skipped by seeking, never read or decoded; shards without a
selected key are never opened, and slots and epoch length count the selected samples only.

Memory: the shuffle buffer holds raw samples, about 2.2 MB each for a 256 px L1C pair, per
worker (``data.shuffle_buffer`` 1000 is ~2.2 GB per worker at that size).
"""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Collection, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys

from dsl.contracts.config import DataConfig
from dsl.contracts.manifest import Manifest, ShardEntry, read_manifest, select_shards
from dsl.contracts.shard_format import DFC_CLASSES, decode_npy
from dsl.contracts.storage import join, register_webdataset_handlers

from .normalise import Normaliser

Slot = tuple[list[int], int, int]  # (shard indices, stride, offset): samples j % stride == offset
KeySelection = Mapping[str, Collection[str]]  # shard name (as in the manifest) -> keys to keep


def _members(stream, url: str, wanted: tuple[str, ...], keys: Collection[str] | None = None) -> Iterator[dict]:
    """Wanted regular members of a tar stream, in order, as webdataset file samples.

    Seekable streams (local files, fsspec/s3fs files) are read with one exact-size read per
    member and unwanted members are skipped by seeking: webdataset's own tar iterator uses
    tarfile's stream mode, whose 10 KiB chunked reads cost more than decoding the arrays.
    ``keys`` (None: all) also skips the members of every other sample.
    """
    mode = "r:" if stream.seekable() else "r|"
    with tarfile.open(fileobj=stream, mode=mode) as tar:
        for info in tar:
            if info.isreg() and info.name.endswith(wanted) and (keys is None or base_plus_ext(info.name)[0] in keys):
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # streaming: forget the headers already read


def read_shard(
    url: str, wanted: tuple[str, ...] = ("s1.npy", "s2.npy"), keys: Collection[str] | None = None
) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", <ext>: bytes}`` of one shard, members undecoded.

    Args:
        url: The shard.
        wanted: Member suffixes to read; others are skipped.
        keys: Samples to read (None: all); the others are skipped unread.

    Raises:
        OSError: The shard cannot be opened or is not a readable tar; names the URL.
    """
    try:
        stream = gopen(url, "rb")  # local paths, file:// and (registered) fsspec URLs
    except Exception as e:
        raise OSError(f"{url}: cannot open shard: {e}") from e
    samples = group_by_keys(_members(stream, url, wanted, keys))
    try:
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return
            except Exception as e:
                raise OSError(f"{url}: cannot read shard: {e.args[0] if e.args else e!r}") from e
            yield sample
    finally:
        stream.close()


def _empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch tensor; in a DataLoader worker, born in shared memory.

    Tensors sent from a worker are moved to shared memory anyway: allocating them there saves
    that copy of every batch (what torch's default_collate does too).
    """
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # private, hence the fallback
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    if new_shared is None:
        return torch.empty(shape, dtype=dtype).share_memory_()
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return torch.empty(0, dtype=dtype).set_(new_shared(nbytes), 0, shape)


# Raw batches (``data.normalise_on_device``): S2 as the shard format stores it, S1 (dB) in
# float16, which rounds it by at most 2^-11 of its value (0.012 dB at -25 dB): far below the
# sensor's radiometric accuracy, and half float32's bytes on the way to the GPU.
RAW_DTYPES = (torch.float16, torch.uint16)


def assign_slots(counts: list[int], n_slots: int) -> list[Slot]:
    """Which shards (and which of their samples) each slot reads; slots never overlap.

    Args:
        counts: Samples per shard, in the order to deal them (ties keep this order).
        n_slots: Ranks x workers.

    With at least as many shards as slots, shards go largest first to the slot with the fewest
    samples so far (balanced passes). With fewer, the slots sharing a shard each take every
    k-th sample of it (k = slots on that shard).
    """
    n = len(counts)
    if n >= n_slots:
        shards: list[list[int]] = [[] for _ in range(n_slots)]
        load = [0] * n_slots
        for i in sorted(range(n), key=lambda i: -counts[i]):
            s = load.index(min(load))
            shards[s].append(i)
            load[s] += counts[i]
        return [(idx, 1, 0) for idx in shards]
    return [([s % n], len(range(s % n, n_slots, n)), s // n) for s in range(n_slots)]


def _shuffle(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Buffered shuffle of a finite stream (a pass), flushed at its end."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = s
    for j in rng.permutation(len(buf)):
        yield buf[j]


class PairStream(IterableDataset):
    """Batches of normalised pairs for one rank; each DataLoader worker yields whole batches.

    Use :func:`make_loader`, which wraps this in a DataLoader with ``batch_size=None``.
    With ``raw`` the batches hold the selected bands' raw values (:data:`RAW_DTYPES`), cropped
    but not normalised: the training loop normalises them on its device.
    """

    def __init__(
        self,
        cfg: DataConfig,
        manifest: Manifest,
        rank: int,
        world_size: int,
        epoch: int = 0,
        start_batch: int = 0,
        labels: bool = False,
        train: bool = True,
        keys: KeySelection | None = None,
        raw: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        shards, self.keep = _selected(select_shards(manifest, cfg.split), keys, cfg.split)
        self.urls = [join(cfg.shards, s.name) for s in shards]
        self.counts = [s.samples if keys is None else len(k) for s, k in zip(shards, self.keep, strict=True)]
        self.rank, self.world_size, self.epoch, self.seed = rank, world_size, epoch, cfg.seed % 2**63
        self.workers = max(1, cfg.loader_workers)  # 0 workers: the main process is the one slot
        self.batch_size, self.crop, self.shuffle_buffer = cfg.batch_size, cfg.crop_size, cfg.shuffle_buffer
        self.labels, self.train, self.start_batch, self.raw = labels, train, start_batch, raw
        self.norm = Normaliser.from_manifest(manifest, cfg.normalisation, cfg.s1_bands, cfg.s2_bands)
        self.in_bands = (len(manifest.bands.s1), len(manifest.bands.s2 or []))

        n_slots = world_size * self.workers
        order = list(range(len(shards)))
        if train:  # a new shard-to-slot deal each epoch; the same on every rank
            order = [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(shards))]
        dealt = assign_slots([self.counts[i] for i in order], n_slots)
        self.slots = [([order[i] for i in idx], k, o) for idx, k, o in dealt]
        for s, slot in enumerate(self.slots):
            if train and self._pass_samples(slot) == 0:  # it could never fill its quota
                raise ValueError(
                    f"{cfg.shards}: slot {s} (rank {s // self.workers}, worker {s % self.workers}) gets no "
                    f"samples: {sum(self.counts)} samples in {len(shards)} shards for {n_slots} rank x worker "
                    "slots; use fewer data.loader_workers"
                )
        if train:
            total = cfg.samples_per_epoch or sum(self.counts)
            self.n_batches = total // (world_size * cfg.batch_size)
            if self.n_batches == 0:
                raise ValueError(
                    f"data.batch_size {cfg.batch_size} x {world_size} ranks exceeds the {total} samples "
                    "per epoch: not one full batch"
                )
            if not 0 <= start_batch <= self.n_batches:
                raise ValueError(f"start_batch {start_batch} outside the epoch's {self.n_batches} batches")
        elif start_batch:
            raise ValueError("start_batch is for training streams; evaluation reads the split whole")

    def _pass_samples(self, slot: Slot) -> int:
        idx, stride, offset = slot
        return sum(len(range(offset, self.counts[i], stride)) for i in idx)

    def __len__(self) -> int:
        """Batches this rank yields (from ``start_batch`` on)."""
        if self.train:
            return self.n_batches - self.start_batch
        slots = self.slots[self.rank * self.workers : (self.rank + 1) * self.workers]
        return sum(-(-self._pass_samples(s) // self.batch_size) for s in slots)

    def __iter__(self) -> Iterator[dict]:
        register_webdataset_handlers()  # workers started by spawn/forkserver lack the parent's
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        if n != self.workers:
            raise RuntimeError(f"stream built for {self.workers} workers runs in {n}; use make_loader")
        yield from self._train(w) if self.train else self._eval(w)

    def _train(self, w: int) -> Iterator[dict]:
        W, K, B = self.workers, self.start_batch, self.batch_size
        role = (K + w) % W  # the worker whose batches this one continues after a restart
        done = (K + w) // W  # that worker's batches consumed before the restart
        quota = len(range(role, self.n_batches, W))
        slot = self.slots[self.rank * W + role]
        order_rng, shuffle_rng, crop_rng = (
            np.random.default_rng([self.seed, self.epoch, self.rank, role, i]) for i in range(3)
        )
        samples = self._cycle(slot, order_rng, shuffle_rng)
        for b in range(quota):
            raw = list(itertools.islice(samples, B))  # raw bytes: skipping never decodes
            windows = crop_rng.random((B, 2))  # drawn for skipped batches too: same RNG state
            if b >= done:
                yield self._batch(raw, windows)

    def _eval(self, w: int) -> Iterator[dict]:
        idx, stride, offset = self.slots[self.rank * self.workers + w]
        raw: list[dict] = []
        for sample in self._pass(idx, stride, offset):
            raw.append(sample)
            if len(raw) == self.batch_size:
                yield self._batch(raw, None)
                raw = []
        if raw:
            yield self._batch(raw, None)

    def _cycle(self, slot: Slot, order_rng: np.random.Generator, shuffle_rng: np.random.Generator):
        """Endless passes over a slot's samples; each pass is a permutation of them."""
        idx, stride, offset = slot
        while True:
            order = [idx[i] for i in order_rng.permutation(len(idx))]
            n = 0
            for sample in _shuffle(self._pass(order, stride, offset), self.shuffle_buffer, shuffle_rng):
                n += 1
                yield sample
            if n == 0:
                raise ValueError(f"shards {[self.urls[i] for i in idx]} yielded no samples (manifest says otherwise)")

    def _pass(self, idx: list[int], stride: int, offset: int) -> Iterator[dict]:
        for i in idx:
            for j, sample in enumerate(self._read(i)):
                if j % stride == offset:
                    yield sample

    def _read(self, i: int) -> Iterator[dict]:
        wanted = ("s1.npy", "s2.npy", "cls", "multi.npy") if self.labels else ("s1.npy", "s2.npy")
        return read_shard(self.urls[i], wanted, self.keep[i])

    def _member(self, sample: dict, name: str) -> bytes:
        if name not in sample:
            raise ValueError(f"{sample['__url__']}: sample {sample['__key__']!r} has no member {name}")
        return sample[name]

    def _decode(self, sample: dict, name: str) -> np.ndarray:
        where = f"{sample['__url__']}: sample {sample['__key__']!r}: {name}"
        try:
            return decode_npy(self._member(sample, name), where)
        except ValueError:
            raise
        except Exception as e:  # truncated or garbled bytes surface as EOFError, OSError ...
            raise ValueError(f"{where}: corrupt .npy ({e})") from e

    def _batch(self, raw: list[dict], windows: np.ndarray | None) -> dict:
        n, c = len(raw), self.crop
        (c1, c2), (n1, n2) = self.norm.channels, self.in_bands
        dtypes = RAW_DTYPES if self.raw else (torch.float32, torch.float32)
        t1, t2 = _empty((n, c1, c, c), dtypes[0]), _empty((n, c2, c, c), dtypes[1])
        s1, s2 = t1.numpy(), t2.numpy()
        cls = np.empty(n, dtype=np.int64)
        multi = np.empty((n, len(DFC_CLASSES)), dtype=np.float32)
        for i, sample in enumerate(raw):
            a1, a2 = self._decode(sample, "s1.npy"), self._decode(sample, "s2.npy")
            if a1.ndim != 3 or a2.ndim != 3 or a1.shape[1:] != a2.shape[1:] or (a1.shape[0], a2.shape[0]) != (n1, n2):
                raise ValueError(
                    f"{sample['__url__']}: sample {sample['__key__']!r}: s1 {a1.shape} / s2 {a2.shape} do not "
                    f"match the manifest's [{n1}, H, W] / [{n2}, H, W] on one grid"
                )
            h, w = a1.shape[1:]
            if h < c or w < c:
                raise ValueError(
                    f"{sample['__url__']}: sample {sample['__key__']!r} is {h}x{w}, smaller than data.crop_size {c}"
                )
            if windows is None:  # evaluation: centre crop
                y, x = (h - c) // 2, (w - c) // 2
            else:
                y, x = int(windows[i, 0] * (h - c + 1)), int(windows[i, 1] * (w - c + 1))
            # Crop the raw arrays (views, no copy) first: conversion then touches only the window.
            # One window for both sensors: the pair is co-located on one grid.
            if self.raw:
                self._copy_raw(sample, a1[:, y : y + c, x : x + c], a2[:, y : y + c, x : x + c], s1[i], s2[i])
            else:
                self.norm.s1(a1[:, y : y + c, x : x + c], out=s1[i])
                self.norm.s2(a2[:, y : y + c, x : x + c], out=s2[i])
            if self.labels:
                cls[i], multi[i] = self._labels(sample)
        batch = {"s1": t1, "s2": t2, "key": [s["__key__"] for s in raw]}
        if self.labels:
            batch["cls"], batch["multi"] = torch.from_numpy(cls), torch.from_numpy(multi)
        return batch

    def _copy_raw(self, sample: dict, a1: np.ndarray, a2: np.ndarray, out1: np.ndarray, out2: np.ndarray) -> None:
        """Write a crop's selected bands, not normalised, into the raw batch rows."""
        if not np.can_cast(a2.dtype, out2.dtype, "safe") or a1.dtype.kind != "f":
            raise ValueError(
                f"{sample['__url__']}: sample {sample['__key__']!r}: s1 {a1.dtype} / s2 {a2.dtype}, but "
                "data.normalise_on_device ships the shard format's float S1 and uint16 S2; set it to false"
            )
        np.copyto(out1, self.norm.s1.select(a1), casting="same_kind")  # float32 -> float16: rounds
        np.copyto(out2, self.norm.s2.select(a2), casting="safe")

    def _labels(self, sample: dict) -> tuple[int, np.ndarray]:
        where = f"{sample['__url__']}: sample {sample['__key__']!r}"
        text = self._member(sample, "cls")
        try:
            cls = int(text.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{where}: cls is not a decimal integer: {text[:20]!r}") from None
        multi = self._decode(sample, "multi.npy")
        if multi.shape != (len(DFC_CLASSES),):
            raise ValueError(f"{where}: multi.npy has shape {multi.shape}, expected ({len(DFC_CLASSES)},)")
        return cls, multi


def _selected(shards: list[ShardEntry], keys: KeySelection | None, split: str | None):
    """The shards holding selected keys and each one's key set (all None without a selection)."""
    if keys is None:
        return shards, [None] * len(shards)
    names = {s.name for s in shards}
    unknown = sorted(set(keys) - names)
    if unknown:
        raise ValueError(f"key selection names shards {unknown[:3]} that are not in split {split!r}")
    kept = [s for s in shards if keys.get(s.name)]
    if not kept:
        raise ValueError(f"the key selection keeps no sample of split {split!r}")
    return kept, [frozenset(keys[s.name]) for s in kept]


def batches_per_epoch(
    cfg: DataConfig, world_size: int, manifest: Manifest | None = None, keys: KeySelection | None = None
) -> int:
    """Training batches every rank yields per epoch.

    ``(cfg.samples_per_epoch or the split's sample count) // (world_size * cfg.batch_size)``;
    pass ``manifest`` to avoid reading it again. With ``keys`` the count is the selected samples'.
    """
    if cfg.samples_per_epoch:
        total = cfg.samples_per_epoch
    elif keys is not None:
        total = sum(len(set(k)) for k in keys.values())
    else:
        manifest = manifest if manifest is not None else read_manifest(cfg.shards)
        total = sum(s.samples for s in select_shards(manifest, cfg.split))
    return total // (world_size * cfg.batch_size)


def make_loader(
    cfg: DataConfig,
    rank: int,
    world_size: int,
    epoch: int = 0,
    start_batch: int = 0,
    labels: bool = False,
    train: bool = True,
    keys: KeySelection | None = None,
    manifest: Manifest | None = None,
    raw: bool = False,
) -> DataLoader:
    """A DataLoader of batches ``{"s1", "s2", "key"[, "cls", "multi"]}`` for one rank.

    Args:
        cfg: Shards URL, split, batch and crop size, workers, normalisation, seed ...
        rank: This rank's index among the data-parallel ranks.
        world_size: Number of data-parallel ranks.
        epoch: Reseeds shard deal, shuffle and crops.
        start_batch: Batches of this epoch already consumed (resume): they are skipped undecoded.
        labels: Also return ``cls`` (int64 [B]) and ``multi`` (float32 [B, 8]).
        train: Random crops, shuffling and exactly :func:`batches_per_epoch` full batches;
            False reads each sample of the split once, centre-cropped, in order, last batch partial.
        keys: Only these samples (shard name -> keys), e.g. a label fraction; None: all.
        manifest: The dataset's manifest, read from ``cfg.shards`` when None. Passing one
            saves the read, or normalises with other statistics (a pretrained backbone's).
        raw: ``s1``/``s2`` hold raw values of the selected bands (float16 dB / uint16), for
            normalising on the device (:meth:`~dsl.data.normalise.Normaliser.normalise_batch`).

    Raises:
        FileNotFoundError: No manifest (unfinished ingest).
        ValueError: Bad split, band selection, too few samples for the ranks and workers.
    """
    register_webdataset_handlers()
    manifest = manifest if manifest is not None else read_manifest(cfg.shards)
    stream = PairStream(cfg, manifest, rank, world_size, epoch, start_batch, labels, train, keys, raw)
    # batch_size=None: workers yield whole batches, which the DataLoader returns round-robin
    # (in order), the property resume relies on.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.loader_workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=2 if cfg.loader_workers else None,
    )
