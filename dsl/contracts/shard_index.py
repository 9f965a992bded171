"""Where every sample sits in its shard: the dataset's byte-offset index.

A sample is a run of consecutive tar members (headers and data) sharing a key, so one byte range
``[start, end)`` of its shard holds all of it. The index lets a loader read any sample with one
ranged read, so a resumed epoch never downloads the samples it skips, and samples can be dealt
one by one instead of shard by shard.

Layout (``index.npy`` beside the manifest, a plain int64 .npy, never pickled): for each shard in
manifest order, the start offset of each of its samples followed by the end of its last sample,
so ``len = samples + shards`` and shard ``i`` occupies ``[first[i] + i, first[i + 1] + i + 1)``
where ``first`` is the running sample count. ``manifest.index`` records the file's name, size
and sha256; a reader checks all three before trusting a single offset.

Datasets written before the index (``format_version`` 1) get the same table by reading their
shards' tar headers once (:func:`scan_offsets`).

Sample digests (``digests.npy``, ``manifest.digests``): for each sample in the same order, the
first 8 bytes of the sha256 of its byte range (headers, data and padding), as little-endian
uint64. A loader reading a sample's range checks it against its digest: the shard's integrity
checked as it streams, sample by sample, with no second pass (a whole-shard hash cannot be
checked when samples are read as ranges). The digests file is itself checked against the
manifest's size and sha256, so the chain manifest -> digests -> sample holds end to end.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Sequence

import numpy as np

from dsl.contracts.shard_format import decode_npy
from dsl.contracts.storage import filesystem, join

INDEX = "index.npy"
DIGESTS = "digests.npy"
# A shard member or sample larger than this is not a satellite patch: refuse, never allocate it.
MAX_SAMPLE_BYTES = 256 << 20
# The index of 100 million samples is 0.8 GB: a bigger file is not an index of ours.
MAX_INDEX_BYTES = 8 * (100_000_000 + 10_000_000) + 1024


def encode_index(offsets: Sequence[Sequence[int]]) -> bytes:
    """The ``index.npy`` bytes for per-shard ``[start_0, ..., start_n-1, end]`` lists."""
    flat = np.concatenate([np.asarray(o, dtype=np.int64) for o in offsets]) if offsets else np.zeros(0, np.int64)
    buf = io.BytesIO()
    np.save(buf, flat, allow_pickle=False)
    return buf.getvalue()


def write_index(output_url: str, offsets: Sequence[Sequence[int]]) -> dict:
    """Write ``index.npy`` under ``output_url``; returns the manifest's ``index`` record.

    Args:
        output_url: The dataset folder or URL (the manifest's).
        offsets: Per shard, in manifest order, its samples' start offsets and its last sample's end.
    """
    data = encode_index(offsets)
    fs, path = filesystem(join(output_url, INDEX))
    fs.pipe_file(path, data)  # one PUT on object stores; written before the manifest commits it
    return {"name": INDEX, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def sample_digest(data) -> int:
    """A sample's digest: the first 8 bytes of the sha256 of its byte range, as an integer."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def write_digests(output_url: str, digests: Sequence[Sequence[int]]) -> dict:
    """Write ``digests.npy`` (uint64, per shard in manifest order its samples' digests).

    Returns:
        The manifest's ``digests`` record (name, bytes, sha256).
    """
    flat = np.concatenate([np.asarray(d, dtype=np.uint64) for d in digests]) if digests else np.zeros(0, np.uint64)
    buf = io.BytesIO()
    np.save(buf, flat, allow_pickle=False)
    data = buf.getvalue()
    fs, path = filesystem(join(output_url, DIGESTS))
    fs.pipe_file(path, data)  # written before the manifest commits it
    return {"name": DIGESTS, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_digests(url: str, size: int, sha256: str, samples: int) -> np.ndarray:
    """Read ``digests.npy`` at ``url``, checked against the manifest's size, sha256 and samples.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Size, digest or length differ from the manifest's, or not a uint64 table.
    """
    table = _parse_table(_read_checked(url, size, sha256, "digests"), url, "digests table")
    if table.dtype != np.uint64 or table.shape != (samples,):
        raise ValueError(f"{url}: digests are {table.dtype} {table.shape}, expected uint64 [{samples}]; "
                         "rerun the ingest")
    return table


def _read_checked(url: str, size: int, sha256: str, what: str) -> bytes:
    """A file the manifest records, read whole after checking its size, then its sha256."""
    if not 0 < size <= MAX_INDEX_BYTES:
        raise ValueError(f"{url}: manifest gives the {what} {size} bytes (limit {MAX_INDEX_BYTES})")
    fs, path = filesystem(url)
    try:
        actual = fs.size(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: the manifest's {what} file is missing; rerun the ingest") from None
    if actual != size:
        raise ValueError(f"{url}: {what} is {actual} bytes, the manifest says {size}; rerun the ingest")
    data = fs.cat_file(path)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{url}: {what} sha256 differs from the manifest's; rerun the ingest")
    return data


class ShardIndex:
    """Global sample ids -> (shard, byte range); ids number samples in manifest shard order.

    Args:
        counts: Samples per shard, in manifest order.
        offsets: The flat int64 table described in the module docstring.
        where: What to name in errors (the index's URL).
        shard_bytes: Each shard's size when known (None entries skip the check).

    Raises:
        ValueError: The table does not fit the counts, a range runs backwards, past its shard or
            beyond :data:`MAX_SAMPLE_BYTES`.
    """

    def __init__(self, counts: Sequence[int], offsets: np.ndarray, where: str,
                 shard_bytes: Sequence[int | None] | None = None):
        counts = np.asarray(counts, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.samples = int(self.first[-1])
        if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) != self.samples + len(counts):
            raise ValueError(
                f"{where}: index has {offsets.shape} {offsets.dtype} entries, expected int64 "
                f"[{self.samples + len(counts)}] for {self.samples} samples in {len(counts)} shards; rerun the ingest"
            )
        self.offsets = offsets
        self.digests: np.ndarray | None = None  # each sample's digest when the dataset has them
        self.base = self.first[:-1] + np.arange(len(counts))  # where shard i's run starts
        sizes = np.diff(offsets)
        # the differences that cross from one shard's end to the next shard's first start
        crossing = (self.first[1:] + np.arange(len(counts)))[:-1]
        ok = np.ones(len(sizes), dtype=bool)
        ok[crossing] = False
        bad = np.flatnonzero(ok & ((sizes <= 0) | (sizes > MAX_SAMPLE_BYTES)))
        if len(offsets) and offsets.min() < 0:
            raise ValueError(f"{where}: negative byte offset; rerun the ingest")
        if len(bad):
            shard = int(np.searchsorted(self.base, bad[0], side="right") - 1)
            raise ValueError(
                f"{where}: sample {int(bad[0] - self.base[shard])} of shard {shard} spans {int(sizes[bad[0]])} "
                f"bytes (must be 1..{MAX_SAMPLE_BYTES}); rerun the ingest"
            )
        if shard_bytes is not None:
            ends = offsets[self.first[1:] + np.arange(len(counts))] if len(counts) else offsets[:0]
            for i, (end, size) in enumerate(zip(ends, shard_bytes, strict=True)):
                if size is not None and end > size:
                    raise ValueError(f"{where}: shard {i}'s samples end at byte {int(end)}, past its {size} bytes")

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard index, start, end) arrays for global sample ids (vectorised)."""
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self.first, ids, side="right") - 1
        pos = self.base[shard] + (ids - self.first[shard])
        return shard, self.offsets[pos], self.offsets[pos + 1]


def _parse_table(data: bytes, where: str, what: str) -> np.ndarray:
    """A plain .npy table, read-only over ``data``, by the shard format's bounded decoder.

    np.load raises other errors for zip or empty input and allocates whatever shape is claimed.
    """
    try:
        return decode_npy(data, where)
    except ValueError as e:
        raise ValueError(f"{where}: not a plain .npy {what} ({e}); rerun the ingest") from None


def parse_index(data: bytes, where: str) -> np.ndarray:
    """The int64 table of ``index.npy`` bytes; anything else (object arrays, 2-D ...) refused."""
    table = _parse_table(data, where, "index")
    if table.dtype != np.int64 or table.ndim != 1:
        raise ValueError(f"{where}: index is {table.dtype} {table.shape}, expected 1-D int64; rerun the ingest")
    return table


def read_index(url: str, size: int, sha256: str) -> np.ndarray:
    """Read and verify ``index.npy`` at ``url`` against the manifest's size and digest.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Size or digest differ from the manifest's, or it is not an int64 table.
    """
    return parse_index(_read_checked(url, size, sha256, "index"), url)


def scan_shard(url: str) -> tuple[list[int], list[str]]:
    """One shard's ``[start_0, ..., end]`` and its samples' keys, from its tar headers.

    For datasets without an index, and to find selected keys. Reads headers only: every
    member's data is skipped by seeking. Samples are grouped as webdataset groups them (same
    folder and name up to the first dot, consecutive members).

    Raises:
        OSError: The shard cannot be opened or read as a tar; names the URL.
    """
    fs, path = filesystem(url)
    starts: list[int] = []
    keys: list[str] = []
    end, last = 0, None
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                folder, _, base = info.name.rpartition("/")
                key = (folder + "/" if folder else "") + base.split(".", 1)[0]
                if key != last:
                    starts.append(info.offset)
                    keys.append(key)
                    last = key
                end = info.offset_data + info.size
                end += -end % tarfile.BLOCKSIZE
                tar.members = []  # streaming: forget the headers already read
    except (OSError, tarfile.TarError) as e:
        raise OSError(f"{url}: cannot read shard headers: {e}") from e
    return ([*starts, end] if starts else [0]), keys


def scan_offsets(url: str) -> list[int]:
    """One shard's ``[start_0, ..., end]`` (see :func:`scan_shard`)."""
    return scan_shard(url)[0]
