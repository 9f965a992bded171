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

import hashlib
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
from dsl.contracts.shard_index import (
    MAX_SAMPLE_BYTES,
    ShardIndex,
    read_digests,
    read_index,
    sample_digest,
    scan_shard,
)
from dsl.contracts.storage import join, register_webdataset_handlers

from .dealing import EpochOrder, batches_left, crop_fractions, rank_slice
from .normalise import Normaliser
from .ranged import RangeReader, ShardUnavailable

log = logging.getLogger(__name__)

Slot = tuple[list[int], int, int]  # (shard indices, stride, offset): samples j % stride == offset
KeySelection = Mapping[str, Collection[str]]  # shard name (as in the manifest) -> keys to keep
LABEL_MEMBERS = ("cls", "multi.npy")


def _read_exact(stream, n: int, digest) -> bytes:
    """``n`` bytes (fewer only at the end of the stream), fed to ``digest`` when there is one."""
    parts, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if digest is not None:
        digest.update(data)
    return data


def _members(stream, url: str, wanted: tuple[str, ...], keys: Collection[str] | None = None,
             expect: tuple[int, str] | None = None) -> Iterator[dict]:
    """Wanted plain-file members of a shard stream, in order, as webdataset file samples.

    Headers are parsed by :func:`_ustar_member` (never tarfile: its pax parsing is quadratic,
    CVE-2024-6232), so pax/GNU records, links and devices are refused, as are absolute or
    ``..`` names and members over :data:`MAX_SAMPLE_BYTES`. Unwanted members, and all of the
    samples outside ``keys`` (None: all), are skipped by seeking where the stream can.

    ``expect`` = the manifest's (bytes, sha256) of the shard: then every byte is read (no
    seeking) and hashed as it streams, and a shard of another size or digest raises at its end
    (the members already yielded came from a shard that then failed: the caller stops).

    Raises:
        ValueError: A damaged or foreign header, a member past the end, or a size or digest
            that differs from ``expect``; names the shard and the byte offset.
    """
    block = tarfile.BLOCKSIZE
    digest = hashlib.sha256() if expect is not None else None
    seek = digest is None and stream.seekable()
    pos = 0
    while True:
        header = _read_exact(stream, block, digest)
        if len(header) < block:
            raise ValueError(f"{url}: byte {pos}: the shard ends inside a header (truncated)")
        pos += block
        if header.count(0) == block:  # end-of-archive: the rest is zeros up to the record's end
            while rest := _read_exact(stream, 1 << 20, digest):
                pos += len(rest)
            break
        name, size = _ustar_member(header, url, pos - block)
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"{url}: byte {pos - block}: member name {name!r} is absolute or leaves the shard")
        if size > MAX_SAMPLE_BYTES:
            raise ValueError(f"{url}: byte {pos - block}: member {name} claims {size} bytes "
                             f"(at most {MAX_SAMPLE_BYTES})")
        padded = size + (-size % block)
        if name.endswith(wanted) and (keys is None or base_plus_ext(name)[0] in keys):
            data = _read_exact(stream, padded, digest)
            if len(data) < padded:
                raise ValueError(f"{url}: byte {pos}: member {name} runs past the end of the shard (truncated)")
            yield {"fname": name, "data": data[:size], "__url__": url}
        elif seek:
            stream.seek(padded, 1)
        elif len(_read_exact(stream, padded, digest)) < padded:
            raise ValueError(f"{url}: byte {pos}: member {name} runs past the end of the shard (truncated)")
        pos += padded
    if expect is not None and (pos, digest.hexdigest()) != tuple(expect):
        raise ValueError(f"{url}: the shard is {pos} bytes with sha256 {digest.hexdigest()[:12]}..., the manifest "
                         f"says {expect[0]} bytes, {expect[1][:12]}... (corrupt, truncated or replaced)")


def read_shard(
    url: str, wanted: tuple[str, ...] = (*S1_MEMBERS, *S2_MEMBERS), keys: Collection[str] | None = None,
    expect: tuple[int, str] | None = None,
) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", <ext>: bytes}`` of one shard, members undecoded.

    Args:
        url: The shard.
        wanted: Member suffixes to read; others are skipped.
        keys: Samples to read (None: all); the others are skipped unread.
        expect: The manifest's (bytes, sha256) of the shard, checked as it streams.

    Raises:
        OSError: The shard cannot be opened; names the URL.
        ValueError: It is not a shard of ours or not the manifest's (:func:`_members`).
    """
    try:
        stream = gopen(url, "rb")  # local paths, file:// and (registered) fsspec URLs
    except Exception as e:
        raise OSError(f"{url}: cannot open shard: {e}") from e
    samples = group_by_keys(_members(stream, url, wanted, keys, expect))
    try:
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return
            except ValueError:
                raise
            except Exception as e:
                raise OSError(f"{url}: cannot read shard: {e.args[0] if e.args else repr(e)}") from e
            yield sample
    finally:
        stream.close()


def _ustar_member(header: bytes, url: str, at: int) -> tuple[str, int]:
    """(name, size) of a plain-file ustar header; its checksum checked (tarfile's rule).

    Parsed by hand: tarfile's ``TarInfo.frombuf`` costs ~0.1 ms per header, a tenth of a
    128-px sample's whole decode.
    """
    checksum_field = header[148:156].split(b"\0", 1)[0].strip()
    size_field = header[124:136].split(b"\0", 1)[0].strip() or b"0"
    try:  # digits only: int() also takes a sign (a negative size loops forever), '_' and '0o'
        if not (checksum_field or b"0").isdigit() or not size_field.isdigit():
            raise ValueError
        checksum, size = int(checksum_field or b"-1", 8), int(size_field, 8)
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
        if key is None or ext.startswith("__"):  # "__key__", "__url__": the sample's own entries
            raise ValueError(f"{url}: byte {start + pos}: member name {name!r} is not <key>.<ext>")
        if sample.setdefault("__key__", key) != key:
            raise ValueError(f"{url}: byte {start}: index range holds samples {sample['__key__']!r} and {key!r}")
        if ext in sample:
            raise ValueError(f"{url}: byte {start + pos}: member {name!r} comes twice")
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
        self.s1_range, self.s2_range = cfg.s1_range, cfg.s2_range

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

    def prepare(self, sample: dict) -> dict:
        """Decode and check a raw sample in place; the batch is built from what this leaves.

        Checks: both sensors decode, fit the manifest's bands on one grid at least the crop
        size, and hold only finite values within ``data.s1_range`` / ``s2_range`` (the whole
        patch: a NaN outside this epoch's window is there in the next); labels parse.

        Raises:
            ValueError: The first check that fails, naming the shard, the sample and why.
        """
        if "__s1__" in sample:
            return sample
        a1, a2 = self._array(sample, S1_MEMBERS), self._array(sample, S2_MEMBERS)
        (n1, n2), c = self.in_bands, self.crop
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
        for name, a, (low, high) in (("s1", a1, self.s1_range), ("s2", a2, self.s2_range)):
            if a.dtype.kind not in "fiu":
                raise ValueError(f"{sample['__url__']}: sample {sample['__key__']!r}: {name} is {a.dtype}, not numbers")
            # min/max: one pass each, and a NaN anywhere makes them NaN, which fails both tests
            lo, hi = a.min(), a.max()
            if not (low <= lo and hi <= high):
                why = "non-finite values" if a.dtype.kind == "f" and not np.isfinite(a).all() else \
                    f"values {lo:g}..{hi:g} outside data.{name}_range [{low:g}, {high:g}]"
                raise ValueError(f"{sample['__url__']}: sample {sample['__key__']!r}: {name} has {why}")
        sample["__s1__"], sample["__s2__"] = a1, a2
        if self.labels:
            sample["__labels__"] = self._labels(sample)
        return sample

    def __call__(self, raw: list[dict], windows: np.ndarray | None) -> dict:
        """The batch ``{"s1", "s2", "key"[, "cls", "multi"]}``; ``windows`` None: centre crops.

        Raises:
            ValueError: A sample fails :meth:`prepare`'s checks.
        """
        n, c = len(raw), self.crop
        c1, c2 = self.norm.channels
        dtypes = RAW_DTYPES if self.raw else (torch.float32, torch.float32)
        t1, t2 = _empty((n, c1, c, c), dtypes[0]), _empty((n, c2, c, c), dtypes[1])
        s1, s2 = t1.numpy(), t2.numpy()
        cls = np.empty(n, dtype=np.int64)
        multi = np.empty((n, len(DFC_CLASSES)), dtype=np.float32)
        for i, sample in enumerate(raw):
            self.prepare(sample)
            a1, a2 = sample["__s1__"], sample["__s2__"]
            h, w = a1.shape[1:]
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
                cls[i], multi[i] = sample["__labels__"]
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
    index = ShardIndex([s.samples for s in shards], np.concatenate(runs), url, [s.bytes for s in shards])
    if manifest.digests is not None:
        ref = manifest.digests
        table = read_digests(join(shards_url, ref.name), ref.bytes, ref.sha256, full.samples)
        index.digests = np.concatenate([table[full.first[where[s.name]] : full.first[where[s.name]] + s.samples]
                                        for s in shards])
    return index


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
        self.sizes = {url: s.bytes for url, s in zip(self.urls, shards, strict=True)}
        self.batcher = Batcher(cfg, manifest, labels, raw)
        self._bad_ids: set[int] = set()  # samples found bad (per worker): never stand-ins
        self._warned: dict[str, int] = {}  # warnings per shard URL
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
        reader = RangeReader(*self.retry, sizes=self.sizes)
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

    def _load(self, reader: RangeReader, sample_id: int, shard: int, begin: int, end: int) -> dict | str:
        """One sample read, checked and decoded; or why not: ``"unavailable"`` or ``"bad"``.

        Unavailable: its shard cannot be read (missing, truncated, failing after retries). Bad:
        its bytes differ from their digest, or it does not decode or pass the checks of
        :meth:`Batcher.prepare`. Either is logged naming the shard (the first few per shard).
        """
        url = self.urls[shard]
        try:
            data = reader.read(url, begin, end)
        except ShardUnavailable as e:
            self._warn(url, "skipping samples of an unavailable shard: %s", e)
            return "unavailable"
        try:
            if self.index.digests is not None and sample_digest(data) != int(self.index.digests[sample_id]):
                raise ValueError(f"{url}: bytes [{begin}, {end}) differ from the sample's digest in the manifest's "
                                 "digests (corrupt or replaced shard)")
            return self.batcher.prepare(split_sample(data, url, begin))
        except ValueError as e:  # every check and decoder raises ValueError, naming what failed
            self._warn(url, "dropping a bad sample: %s", e)
            return "bad"

    def _warn(self, url: str, message: str, error: Exception) -> None:
        n = self._warned[url] = self._warned.get(url, 0) + 1
        if n <= 3 or n & (n - 1) == 0:  # the first three of a shard, then the 4th, 8th, 16th ...
            log.warning(message + (f" ({n} so far in this shard)" if n > 3 else ""), error)

    def _batch(self, reader: RangeReader, order: EpochOrder, ids: np.ndarray, epoch: int) -> dict:
        samples: list[dict | None] = [None] * len(ids)
        shard, begin, end = self.index.locate(ids)
        skipped = bad = 0
        for i in np.lexsort((begin, shard)):  # shard by shard, ascending offsets: sequential reads
            got = self._load(reader, int(ids[i]), int(shard[i]), int(begin[i]), int(end[i]))
            if got == "unavailable":
                skipped += 1
            elif got == "bad":
                bad += 1
                self._bad_ids.add(int(ids[i]))
            else:
                samples[i] = got
        if skipped or bad:
            ids, samples = self._replace(reader, order, ids, samples)
        batch = self.batcher(samples, crop_fractions(ids, self.seed, epoch))
        batch["skipped"], batch["bad"], batch["epoch"] = skipped, bad, epoch
        return batch

    def _replace(self, reader: RangeReader, order: EpochOrder, ids: np.ndarray, samples: list):
        """Fill the holes of unreadable or bad samples with other good samples of the epoch.

        Counted in ``skipped`` / ``bad``: the batch keeps its size, so every rank still steps
        together. The stand-ins are drawn by a seeded generator (the same on a rerun), never
        from a shard that failed, never a sample found bad, never twice in the batch.

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
            if cand in taken or cand in self._bad_ids:
                continue
            taken.add(cand)
            shard, begin, end = (int(a[0]) for a in self.index.locate(np.array([cand])))
            got = self._load(reader, cand, shard, begin, end)
            if isinstance(got, str):
                if got == "bad":
                    self._bad_ids.add(cand)  # counted when its own turn in the epoch comes
                continue
            samples[holes[0]], ids[holes[0]] = got, cand
            holes.pop(0)
        if holes:
            raise ShardUnavailable(f"{len(holes)} samples of a batch have no good stand-in in {64 * len(ids)} "
                                   f"draws: {len(self._bad_ids)} samples found bad so far, unreadable shards "
                                   f"{sorted(reader.bad_urls)[:3]} (see the warnings above)")
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
        # each shard's size and sha256 from the manifest, checked as it streams (when known)
        self.expect = [(s.bytes, s.sha256) if s.bytes is not None and s.sha256 else None for s in shards]
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
            for j, sample in enumerate(read_shard(self.urls[i], self.wanted, self.keep[i], self.expect[i])):
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
