"""Streaming co-located S1/S2 pairs from WebDataset shards into equal, deterministic batches.

Training (:class:`SampleStream`) deals samples, not shards (:mod:`dsl.data.dealing`): the
epoch is one seeded order of every sample id, cut into global batches of ``world x batch``;
rank ``r`` takes the ``r``-th ``batch`` of each. Every sample is read once per epoch and never
twice in one global batch, whatever the shard sizes, ranks and loader workers, and every rank
yields the same number of batches (uneven ranks would hang the collectives). DataLoader worker
``w`` builds the rank's batches ``w, w + W, ...``, which the DataLoader hands out round-robin,
i.e. in order.

Each sample is read as one byte range of its shard, found in the dataset's index
(:mod:`dsl.contracts.shard_index`): a job resumed at sample ``P`` of an epoch reads nothing it
skips, on any number of ranks. Reads that fail are retried and a shard that keeps failing is
skipped for the rest of the job (:mod:`dsl.data.ranged`); its samples are replaced and counted
in the batch's ``skipped``, so the job goes on with equal batches everywhere.

Crops: a sample's window is a function of (seed, epoch, sample id), so a resumed job, or one on
another world size, crops it the same way.

Evaluation (:class:`EvalStream`) reads each sample of the split once, shard after shard,
centre-cropped; ranks and workers each own whole shards (or every k-th sample of one).

Subsets: ``keys`` (shard name -> keys to keep, e.g. a label fraction) restricts a stream to those
samples; the epoch length counts the selected samples only.

Memory: no shuffle buffer. A worker holds the batches it is building and the DataLoader's
``prefetch_factor`` (2) finished batches per worker, in shared memory: per rank about
``loader_workers x 3 x batch x (C1 + C2) x crop^2 x 4`` bytes (float32; half with
``data.normalise_on_device``), e.g. 12 workers x 3 x 256 x 15 x 128^2 x 2 B = 2.3 GB at
the shipped ResNet-50 settings. The epoch order costs O(shuffle_block) per worker.
"""

from __future__ import annotations

import heapq
import logging
import tarfile
from collections.abc import Collection, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys

from dsl.contracts.config import DataConfig
from dsl.contracts.manifest import Manifest, ShardEntry, read_manifest, select_shards
from dsl.contracts.shard_format import DFC_CLASSES, S1_MEMBERS, S2_MEMBERS, decode_array
from dsl.contracts.shard_index import ShardIndex, read_index, scan_shard
from dsl.contracts.storage import join, register_webdataset_handlers

from .dealing import EpochOrder, batches_left, crop_fractions, rank_slice
from .normalise import Normaliser
from .ranged import RangeReader, ShardUnavailable

log = logging.getLogger(__name__)

Slot = tuple[list[int], int, int]  # (shard indices, stride, offset): samples j % stride == offset
KeySelection = Mapping[str, Collection[str]]  # shard name (as in the manifest) -> keys to keep
LABEL_MEMBERS = ("cls", "multi.npy")


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
    url: str, wanted: tuple[str, ...] = (*S1_MEMBERS, *S2_MEMBERS), keys: Collection[str] | None = None
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


def _ustar_member(header: bytes, url: str, at: int) -> tuple[str, int]:
    """(name, size) of a plain-file ustar header; its checksum checked (tarfile's rule).

    Parsed by hand: tarfile's ``TarInfo.frombuf`` costs ~0.1 ms per header, a tenth of a
    128-px sample's whole decode.
    """
    try:
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise ValueError(f"{url}: byte {at}: not a tar header (bad number field); the index or shard is damaged") from None
    # the checksum is the byte sum with its own field as spaces (unsigned; some writers: signed)
    total = sum(header) - sum(header[148:156]) + 8 * 0x20
    if checksum != total:  # some writers sum signed bytes: each byte > 127 then counts 256 less
        high = sum(1 for b in header[:148] + header[156:] if b > 127)
        total -= 256 * high
    if checksum != total:
        raise ValueError(f"{url}: byte {at}: not a tar header (bad checksum); the index or shard is damaged")
    kind = header[156:157]
    if kind not in (b"0", b"\0"):
        raise ValueError(f"{url}: byte {at}: member type {kind!r} is not a plain file")
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345:346] != b"\0":
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size


def split_sample(data: bytes, url: str, start: int) -> dict:
    """One sample's members from its byte range ``data`` (read at ``start`` of shard ``url``).

    Plain ustar members only (what the writer writes): pax and GNU long-name records are
    refused, which also keeps tarfile's quadratic pax parsing (CVE-2024-6232) off this path.

    Returns:
        ``{"__key__", "__url__", <ext>: memoryview}``: member data without copies.

    Raises:
        ValueError: Bad header checksum, a member that runs past the range, members of more than
            one key, or no member; names the shard and the byte offset.
    """
    view, pos, sample = memoryview(data), 0, {"__url__": url}
    block = tarfile.BLOCKSIZE
    while pos + block <= len(view):
        header = bytes(view[pos : pos + block])
        if header.count(0) == block:
            break
        name, size = _ustar_member(header, url, start + pos)
        data_at = pos + block
        if data_at + size > len(view):
            raise ValueError(f"{url}: byte {start + pos}: member {name} runs past its sample's index range")
        key, ext = base_plus_ext(name)
        if sample.setdefault("__key__", key) != key:
            raise ValueError(f"{url}: byte {start}: index range holds samples {sample['__key__']!r} and {key!r}")
        sample[ext] = view[data_at : data_at + size]
        pos = data_at + size + (-size % block)
    if "__key__" not in sample:
        raise ValueError(f"{url}: byte {start}: no member in the sample's index range")
    return sample


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


class Batcher:
    """Decode, check, crop and normalise (or copy raw) a list of raw samples into one batch."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, labels: bool, raw: bool):
        self.norm = Normaliser.from_manifest(manifest, cfg.normalisation, cfg.s1_bands, cfg.s2_bands)
        self.in_bands = (len(manifest.bands.s1), len(manifest.bands.s2 or []))
        self.crop, self.labels, self.raw = cfg.crop_size, labels, raw

    def _member(self, sample: dict, name: str):
        if name not in sample:
            raise ValueError(f"{sample['__url__']}: sample {sample['__key__']!r} has no member {name}")
        return sample[name]

    def _decode(self, sample: dict, name: str) -> np.ndarray:
        where = f"{sample['__url__']}: sample {sample['__key__']!r}: {name}"
        try:
            return decode_array(name, self._member(sample, name), where)
        except ValueError:
            raise
        except Exception as e:  # truncated or garbled bytes surface as EOFError, OSError ...
            raise ValueError(f"{where}: corrupt member ({e})") from e

    def _array(self, sample: dict, names: tuple[str, ...]) -> np.ndarray:
        """A sensor's array, from whichever of its member kinds the sample has (any format)."""
        name = next((n for n in names if n in sample), names[-1])  # missing: name the plain one
        return self._decode(sample, name)

    def __call__(self, raw: list[dict], windows: np.ndarray | None) -> dict:
        """The batch ``{"s1", "s2", "key"[, "cls", "multi"]}``; ``windows`` None: centre crops."""
        n, c = len(raw), self.crop
        (c1, c2), (n1, n2) = self.norm.channels, self.in_bands
        dtypes = RAW_DTYPES if self.raw else (torch.float32, torch.float32)
        t1, t2 = _empty((n, c1, c, c), dtypes[0]), _empty((n, c2, c, c), dtypes[1])
        s1, s2 = t1.numpy(), t2.numpy()
        cls = np.empty(n, dtype=np.int64)
        multi = np.empty((n, len(DFC_CLASSES)), dtype=np.float32)
        for i, sample in enumerate(raw):
            a1, a2 = self._array(sample, S1_MEMBERS), self._array(sample, S2_MEMBERS)
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
        text = bytes(self._member(sample, "cls"))
        try:
            cls = int(text.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{where}: cls is not a decimal integer: {text[:20]!r}") from None
        multi = self._decode(sample, "multi.npy")
        if multi.shape != (len(DFC_CLASSES),):
            raise ValueError(f"{where}: multi.npy has shape {multi.shape}, expected ({len(DFC_CLASSES)},)")
        return cls, multi


def load_index(manifest: Manifest, shards_url: str, shards: list[ShardEntry]) -> ShardIndex:
    """The byte-offset index of ``shards`` (a subset of the manifest's, in its order).

    From ``index.npy`` when the manifest has one (checked against its size and sha256), else
    (datasets of format 1) from the shards' tar headers.
    """
    if manifest.index is None:
        table = np.asarray([o for s in shards for o in scan_shard(join(shards_url, s.name))[0]], dtype=np.int64)
        return ShardIndex([s.samples for s in shards], table, f"{shards_url} (tar headers)", [s.bytes for s in shards])
    url = join(shards_url, manifest.index.name)
    full = ShardIndex([s.samples for s in manifest.shards], read_index(url, manifest.index.bytes,
                                                                         manifest.index.sha256), url,
                      [s.bytes for s in manifest.shards])
    where = {s.name: i for i, s in enumerate(manifest.shards)}
    runs = [full.offsets[full.base[where[s.name]] : full.base[where[s.name]] + s.samples + 1] for s in shards]
    return ShardIndex([s.samples for s in shards], np.concatenate(runs), url, [s.bytes for s in shards])


class SampleStream(IterableDataset):
    """Training batches of one rank, from a global sample position on (see the module doc).

    Args:
        cfg: The data settings.
        manifest: The dataset's manifest.
        rank: This rank.
        world_size: Data-parallel ranks.
        epoch: The epoch to start in.
        start_sample: Samples of that epoch all ranks together consumed before (resume).
        epochs: Epochs to yield (None: endless, one persistent stream for the whole job).
        labels: Also ``cls`` and ``multi``.
        keys: Only these samples (shard name -> keys).
        raw: Raw values of the selected bands (normalised on the device).

    Raises:
        ValueError: Bad split or selection, ``start_sample`` outside the epoch, not one full
            global batch.
    """

    def __init__(self, cfg: DataConfig, manifest: Manifest, rank: int, world_size: int, epoch: int = 0,
                 start_sample: int = 0, epochs: int | None = 1, labels: bool = False,
                 keys: KeySelection | None = None, raw: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        shards, keep = _selected(select_shards(manifest, cfg.split), keys, cfg.split)
        self.urls = [join(cfg.shards, s.name) for s in shards]
        self.index = load_index(manifest, cfg.shards, shards)
        self.members = None if keys is None else _member_ids(self.index, self.urls, keep)
        self.total = self.index.samples if self.members is None else len(self.members)
        self.counts = np.diff(self.index.first) if self.members is None else np.bincount(
            np.searchsorted(self.index.first, self.members, side="right") - 1, minlength=len(shards))
        self.length = cfg.samples_per_epoch or self.total
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, cfg.batch_size, cfg.seed % 2**63
        self.block, self.workers, self.epoch, self.start, self.epochs = cfg.shuffle_block, max(1, cfg.loader_workers), \
            epoch, start_sample, epochs
        self.retry = (cfg.read_retries, cfg.read_backoff_s, cfg.read_max_backoff_s)
        self.batcher = Batcher(cfg, manifest, labels, raw)
        if batches_left(self.length, 0, world_size, cfg.batch_size) == 0:
            raise ValueError(
                f"data.batch_size {cfg.batch_size} x {world_size} ranks exceeds the {self.length} samples "
                "per epoch: not one full batch"
            )
        if not 0 <= start_sample <= self.length:
            raise ValueError(f"start_sample {start_sample} outside the epoch's {self.length} samples")

    def __len__(self) -> int:
        """Batches this rank yields (one epoch from the start position; endless: that epoch's)."""
        return batches_left(self.length, self.start, self.world_size, self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        register_webdataset_handlers()  # workers started by spawn/forkserver lack the parent's
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        if n != self.workers:
            raise RuntimeError(f"stream built for {self.workers} workers runs in {n}; use make_loader")
        reader = RangeReader(*self.retry)
        try:
            for epoch, order, ids in self.batch_ids(w, n):
                yield self._batch(reader, order, ids, epoch)
        finally:
            reader.close()

    def batch_ids(self, worker: int = 0, workers: int = 1) -> Iterator[tuple[int, EpochOrder, np.ndarray]]:
        """(epoch, its order, sample ids) of each batch DataLoader worker ``worker`` builds.

        The rank's ``k``-th batch since the start is built by worker ``k % workers``. Reads
        nothing: dealing alone, e.g. to simulate many ranks.
        """
        k, epoch, start = 0, self.epoch, self.start
        while self.epochs is None or epoch < self.epoch + self.epochs:
            order = EpochOrder(self.counts, self.seed, epoch, self.block, self.length, self.members)
            for g in range(batches_left(self.length, start, self.world_size, self.batch_size)):
                if k % workers == worker:
                    yield epoch, order, order.ids(*rank_slice(start, g, self.world_size, self.batch_size, self.rank))
                k += 1
            epoch, start = epoch + 1, 0

    def _batch(self, reader: RangeReader, order: EpochOrder, ids: np.ndarray, epoch: int) -> dict:
        samples: list[dict | None] = [None] * len(ids)
        shard, begin, end = self.index.locate(ids)
        for i in np.lexsort((begin, shard)):  # shard by shard, ascending offsets: sequential reads
            try:
                data = reader.read(self.urls[shard[i]], int(begin[i]), int(end[i]))
            except ShardUnavailable as e:
                log.warning("skipping a sample of an unavailable shard: %s", e)
                continue
            samples[i] = split_sample(data, self.urls[shard[i]], int(begin[i]))
        skipped = sum(s is None for s in samples)
        if skipped:
            ids, samples = self._replace(reader, order, ids, samples)
        batch = self.batcher(samples, crop_fractions(ids, self.seed, epoch))
        batch["skipped"], batch["epoch"] = skipped, epoch
        return batch

    def _replace(self, reader: RangeReader, order: EpochOrder, ids: np.ndarray, samples: list):
        """Fill the holes of unreadable samples with other readable samples of the epoch.

        Counted in ``skipped``: the batch keeps its size, so every rank still steps together.
        The stand-ins are drawn by a seeded generator (the same on a rerun), never from a shard
        that failed, never twice in the batch.

        Raises:
            ShardUnavailable: No stand-in found in many tries (most of the dataset is gone).
        """
        ids = ids.copy()
        rng = np.random.default_rng([self.seed, order.epoch, 2, int(ids[0])])
        taken = set(ids.tolist())
        holes = [i for i, s in enumerate(samples) if s is None]
        for _ in range(64 * len(ids)):
            if not holes:
                return ids, samples
            u = int(rng.integers(self.total))
            cand = u if self.members is None else int(self.members[u])
            if cand in taken:
                continue
            taken.add(cand)
            shard, begin, end = (int(a[0]) for a in self.index.locate(np.array([cand])))
            try:
                data = reader.read(self.urls[shard], begin, end)
            except ShardUnavailable:
                continue
            samples[holes[0]], ids[holes[0]] = split_sample(data, self.urls[shard], begin), cand
            holes.pop(0)
        if holes:
            raise ShardUnavailable(f"{len(holes)} samples of a batch have no readable stand-in: "
                                   f"unreadable shards {sorted(reader.bad_urls)[:3]}")
        return ids, samples


def _member_ids(index: ShardIndex, urls: list[str], keep: list) -> np.ndarray:
    """Global ids (sorted) of the selected keys: the shards' keys come from their tar headers."""
    ids = []
    for i, (url, wanted) in enumerate(zip(urls, keep, strict=True)):
        keys = scan_shard(url)[1]
        if len(keys) != int(index.first[i + 1] - index.first[i]):
            raise ValueError(f"{url}: holds {len(keys)} samples, the manifest says {int(index.first[i + 1] - index.first[i])}")
        pos = {k: j for j, k in enumerate(keys)}
        missing = sorted(set(wanted) - set(pos))
        if missing:
            raise ValueError(f"{url}: selected keys {missing[:3]} are not in the shard")
        ids += sorted(int(index.first[i]) + pos[k] for k in wanted)
    return np.asarray(ids, dtype=np.int64)


def assign_slots(counts: list[int], n_slots: int) -> list[Slot]:
    """Which shards (and which of their samples) each evaluation slot reads; slots never overlap.

    Args:
        counts: Samples per shard, in the order to deal them (ties keep this order).
        n_slots: Ranks x workers.

    With at least as many shards as slots, shards go largest first to the slot with the fewest
    samples so far (a heap: O(shards log slots)). With fewer, the slots sharing a shard each
    take every k-th sample of it (k = slots on that shard).
    """
    n = len(counts)
    if n >= n_slots:
        shards: list[list[int]] = [[] for _ in range(n_slots)]
        heap = [(0, s) for s in range(n_slots)]  # (samples so far, slot): ties to the lowest slot
        for i in sorted(range(n), key=lambda i: -counts[i]):
            load, s = heapq.heappop(heap)
            shards[s].append(i)
            heapq.heappush(heap, (load + counts[i], s))
        return [(idx, 1, 0) for idx in shards]
    return [([s % n], len(range(s % n, n_slots, n)), s // n) for s in range(n_slots)]


class EvalStream(IterableDataset):
    """Each sample of the split once, centre-cropped, in shard order; last batch partial.

    Ranks and DataLoader workers each own whole shards (:func:`assign_slots`), so the ranks'
    batch counts may differ: evaluation runs no collective per batch.
    """

    def __init__(self, cfg: DataConfig, manifest: Manifest, rank: int, world_size: int, labels: bool = False,
                 keys: KeySelection | None = None, raw: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        shards, self.keep = _selected(select_shards(manifest, cfg.split), keys, cfg.split)
        self.urls = [join(cfg.shards, s.name) for s in shards]
        self.counts = [s.samples if keys is None else len(k) for s, k in zip(shards, self.keep, strict=True)]
        self.rank, self.workers, self.batch_size = rank, max(1, cfg.loader_workers), cfg.batch_size
        self.batcher = Batcher(cfg, manifest, labels, raw)
        self.wanted = (*S1_MEMBERS, *S2_MEMBERS, *(LABEL_MEMBERS if labels else ()))
        for url, k in zip(self.urls, self.keep, strict=True):  # else len() would count them
            if k is not None and (missing := sorted(set(k) - set(scan_shard(url)[1]))):
                raise ValueError(f"{url}: selected keys {missing[:3]} are not in the shard")
        self.slots = assign_slots(self.counts, world_size * self.workers)

    def _pass_samples(self, slot: Slot) -> int:
        idx, stride, offset = slot
        return sum(len(range(offset, self.counts[i], stride)) for i in idx)

    def __len__(self) -> int:
        """Batches this rank yields."""
        slots = self.slots[self.rank * self.workers : (self.rank + 1) * self.workers]
        return sum(-(-self._pass_samples(s) // self.batch_size) for s in slots)

    def __iter__(self) -> Iterator[dict]:
        register_webdataset_handlers()
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        if n != self.workers:
            raise RuntimeError(f"stream built for {self.workers} workers runs in {n}; use make_loader")
        idx, stride, offset = self.slots[self.rank * self.workers + w]
        raw: list[dict] = []
        for i in idx:
            for j, sample in enumerate(read_shard(self.urls[i], self.wanted, self.keep[i])):
                if j % stride != offset:
                    continue
                raw.append(sample)
                if len(raw) == self.batch_size:
                    yield self.batcher(raw, None)
                    raw = []
        if raw:
            yield self.batcher(raw, None)


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
    """Training batches every rank yields per epoch (from its start).

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
    start_sample: int = 0,
    labels: bool = False,
    train: bool = True,
    keys: KeySelection | None = None,
    manifest: Manifest | None = None,
    raw: bool = False,
    epochs: int | None = 1,
) -> DataLoader:
    """A DataLoader of batches ``{"s1", "s2", "key"[, "cls", "multi"]}`` for one rank.

    Args:
        cfg: Shards URL, split, batch and crop size, workers, normalisation, seed ...
        rank: This rank's index among the data-parallel ranks.
        world_size: Number of data-parallel ranks.
        epoch: The (first) epoch: reseeds the order and the crops.
        start_sample: Samples of that epoch consumed by all ranks together (resume): never read.
        labels: Also return ``cls`` (int64 [B]) and ``multi`` (float32 [B, 8]).
        train: Sample-level dealing, random crops and exactly :func:`batches_per_epoch` full
            batches per epoch (training batches also carry ``skipped`` and their ``epoch``); False reads each
            sample of the split once, centre-cropped, in order, last batch partial.
        keys: Only these samples (shard name -> keys), e.g. a label fraction; None: all.
        manifest: The dataset's manifest, read from ``cfg.shards`` when None. Passing one
            saves the read, or normalises with other statistics (a pretrained backbone's).
        raw: ``s1``/``s2`` hold raw values of the selected bands (float16 dB / uint16), for
            normalising on the device (:meth:`~dsl.data.normalise.Normaliser.normalise_batch`).
        epochs: Training: epochs to run through (None: endless, one stream for the whole job).

    Raises:
        FileNotFoundError: No manifest (unfinished ingest).
        ValueError: Bad split, band selection, too few samples for the ranks.
    """
    register_webdataset_handlers()
    manifest = manifest if manifest is not None else read_manifest(cfg.shards)
    if train:
        stream: IterableDataset = SampleStream(cfg, manifest, rank, world_size, epoch, start_sample, epochs,
                                               labels, keys, raw)
    elif epoch or start_sample:
        raise ValueError("epoch and start_sample are for training streams; evaluation reads the split whole")
    else:
        stream = EvalStream(cfg, manifest, rank, world_size, labels, keys, raw)
    # batch_size=None: workers yield whole batches, which the DataLoader returns round-robin
    # (in order), the property resume relies on.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.loader_workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=2 if cfg.loader_workers else None,
    )
