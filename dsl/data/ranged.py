"""Byte-range reads of shards that survive a flaky object store.

The loader reads each sample as one byte range ``[start, end)`` of its shard (located through
the dataset's offset index). :class:`RangeReader` does those reads: one open file per shard
(a small LRU of handles), and on a transient storage error (a reset connection, a 503
``SlowDown``, a truncated body, a timeout) it reopens the object and reads the bytes still
missing, with capped, jittered exponential backoff. A shard that keeps failing, or that is
missing or forbidden, raises :class:`ShardUnavailable`, an ``OSError`` the loader can catch to
skip that shard instead of losing the training job, and is remembered so that later reads of it
fail at once without touching the network.

Only the requested bytes are transferred: files are opened without a read-ahead cache, so
samples skipped on resume are never downloaded (s3fs's default cache would fetch 50 MB blocks).
"""

from __future__ import annotations

import http.client
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import fsspec

from dsl.contracts.storage import filesystem as default_filesystem

# Errors that retrying cannot cure: the object is missing, forbidden or not a file.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# Libraries whose exceptions are network failures (s3fs lets some of them through untranslated,
# e.g. botocore's ResponseStreamingError for a truncated body). Matched by module name: this
# pure layer must not import them, and other fsspec backends need not have them installed.
NETWORK_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests")
# Most bytes one read may ask for: the offsets come from an index file, which is untrusted.
MAX_READ_BYTES = 1 << 30


class ShardUnavailable(OSError):
    """A shard (or byte range of it) that could not be read: missing, forbidden or kept failing.

    Attributes:
        url: The shard.
        start: First byte of the range that failed.
        end: End (exclusive) of that range.
    """

    def __init__(self, message: str, url: str | None = None, start: int | None = None,
                 end: int | None = None):
        # keyword arguments optional: torch's DataLoader re-raises a worker's error as type(msg)
        super().__init__(message)
        self.url, self.start, self.end = url, start, end

    def __reduce__(self):  # keep the attributes across processes (DataLoader workers)
        return type(self), (str(self), self.url, self.start, self.end)


def _http_status(error: BaseException) -> int | None:
    """HTTP status of a botocore ClientError-like error (its ``response`` dict), else None."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    return None


def is_transient(error: BaseException) -> bool:
    """Tell whether retrying (after reopening the object) may cure ``error``.

    Transient: ``OSError`` (connection reset, timeout, s3fs's EBUSY for a 503 ``SlowDown``, an
    object changed while open) other than the permanent kinds, ``http.client.IncompleteRead``,
    and errors of the HTTP client libraries except 4xx answers other than 408/429.
    Permanent: missing, forbidden, a directory. Anything else is a bug, not a storage fault.
    """
    if isinstance(error, PERMANENT_ERRORS):
        return False
    status = _http_status(error)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return False
    if isinstance(error, (OSError, http.client.HTTPException)):  # TimeoutError, ConnectionError too
        return True
    return any(c.__module__.split(".")[0] in NETWORK_MODULES for c in type(error).__mro__)


class _ShortRead(OSError):
    """A read that returned fewer bytes than asked (a truncated body): retried like a reset."""


class RangeReader:
    """Reads byte ranges of objects (local, ``file://``, ``s3://``, any fsspec URL), retrying faults.

    Not thread-safe: use one reader per thread or DataLoader worker. A reader pickles without
    its open files (they reopen on first use), so one built in the main process can be sent to
    the workers.

    Attributes:
        retried: Retries made so far (every failed attempt that was followed by another).
        failed_reads: ``read`` calls that raised :class:`ShardUnavailable` (fail-fast ones too).
        bad_urls: URL -> why it failed, for every URL that raised :class:`ShardUnavailable`;
            reads of these fail at once, without network traffic.
    """

    def __init__(self, retries: int, backoff_s: float, max_backoff_s: float,
                 sleep: Callable[[float], None] = time.sleep, *, max_open: int = 8,
                 seed: int | None = None,
                 filesystem: Callable[[str], tuple[fsspec.AbstractFileSystem, str]] = default_filesystem,
                 sizes: Mapping[str, int | None] | None = None):
        """Set up a reader; nothing is opened until the first read.

        Args:
            retries: Retries of one read after its first attempt fails (so at most
                ``retries + 1`` attempts); 0 gives up at the first transient error.
            backoff_s: Wait before the first retry; doubles each retry.
            max_backoff_s: Cap of the wait before jitter.
            sleep: Waits that many seconds (tests pass a recorder).
            max_open: Open files kept (least recently used closed first).
            seed: Seed of the jitter (None: unpredictable); each wait is drawn uniformly from
                [cap / 2, cap] of its capped exponential value, so that many workers hitting one
                throttled store do not retry in lockstep.
            filesystem: ``url -> (fsspec filesystem, path)``; tests point it at a proxy.
            sizes: The size each URL must have (the manifest's shard sizes): an object of
                another size (truncated, replaced) is unavailable for the job, not read.

        Raises:
            ValueError: A negative count or wait, or ``max_open`` < 1.
        """
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0 or max_open < 1:
            raise ValueError(f"RangeReader: retries ({retries}), backoff_s ({backoff_s}) and max_backoff_s "
                             f"({max_backoff_s}) must be >= 0 and max_open ({max_open}) >= 1")
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.sleep, self.max_open, self.seed, self.filesystem = sleep, max_open, seed, filesystem
        self.sizes = dict(sizes or {})
        self.rng = random.Random(seed)
        self.retried = 0
        self.failed_reads = 0
        self.bad_urls: dict[str, str] = {}
        self._open: OrderedDict[str, tuple[BinaryIO, int | None]] = OrderedDict()  # url -> (file, size)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # open files do not travel between processes
        return state

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0 for the first): capped, jittered."""
        cap = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
        return cap * (0.5 + 0.5 * self.rng.random())

    def read(self, url: str, start: int, end: int) -> bytes:
        """Exactly the bytes ``[start, end)`` of the object at ``url``.

        Args:
            url: Local path or fsspec URL.
            start: First byte.
            end: End of the range (exclusive).

        Returns:
            ``end - start`` bytes.

        Raises:
            ValueError: A negative or reversed range, or one over ``MAX_READ_BYTES``.
            ShardUnavailable: The object is missing or forbidden (not retried), the range lies
                beyond its end, the read still failed after ``retries`` retries, or ``url``
                failed before; names the URL, the range and the last error.
        """
        if start < 0 or end < start or end - start > MAX_READ_BYTES:
            raise ValueError(f"{url}: bad byte range [{start}, {end}) (at most {MAX_READ_BYTES} bytes)")
        where = f"{url} bytes [{start}, {end})"
        if url in self.bad_urls:
            self.failed_reads += 1
            raise ShardUnavailable(f"{where}: shard failed before, not retried: {self.bad_urls[url]}",
                                   url, start, end)
        got = bytearray()
        attempt = 0
        while True:
            try:
                f, size = self._handle(url)
                pos = start + len(got)  # a retry continues after the bytes already received
                expected = self.sizes.get(url)
                if expected is not None and size is not None and size != expected:
                    raise ShardUnavailable(f"{where}: the shard is {size} bytes, the manifest says {expected} "
                                           "(truncated or replaced)", url, start, end)
                if size is not None and end > size:
                    raise ShardUnavailable(f"{where}: range ends beyond the object's {size} bytes",
                                           url, start, end)
                if pos < end:
                    f.seek(pos)
                    chunk = f.read(end - pos)
                    if not got and len(chunk) == end - pos:
                        return chunk  # the usual case: one whole read, returned without a copy
                    got += chunk
                    if len(chunk) < end - pos:
                        raise _ShortRead(f"short read: {len(chunk)} of {end - pos} bytes at offset {pos}")
                return bytes(got)
            except ShardUnavailable as e:
                self._fail(url, str(e))
                raise
            except Exception as e:
                self._discard(url)  # the connection or file may be broken: reopen on the next attempt
                if not is_transient(e):
                    if isinstance(e, PERMANENT_ERRORS):
                        reason = f"{type(e).__name__}, not retried: {e}"
                        self._fail(url, reason)
                        raise ShardUnavailable(f"{where}: {reason}", url, start, end) from e
                    raise  # not a storage fault: a bug must not pass for a bad shard
                if attempt >= self.retries:
                    reason = f"failed {attempt + 1} times, last error: {type(e).__name__}: {e}"
                    self._fail(url, reason)
                    raise ShardUnavailable(f"{where}: {reason}", url, start, end) from e
                self.sleep(self.backoff(attempt))
                attempt += 1
                self.retried += 1

    def _fail(self, url: str, reason: str) -> None:
        self.failed_reads += 1
        self.bad_urls[url] = reason

    def _handle(self, url: str) -> tuple[BinaryIO, int | None]:
        """The open file of ``url`` and its size (None: unknown), opened when not open yet."""
        if url in self._open:
            self._open.move_to_end(url)
            return self._open[url]
        fs, path = self.filesystem(url)
        # no read-ahead cache: a read transfers just its range (s3fs would fetch 50 MB blocks)
        f = fs.open(path, "rb", cache_type="none")
        size = getattr(f, "size", None)
        if not isinstance(size, int) and self.sizes.get(url) is not None:
            size = fs.size(path)  # local files: one stat, so a truncated shard is caught before a read
        self._open[url] = (f, size if isinstance(size, int) else None)
        while len(self._open) > self.max_open:
            self._close_one(self._open.popitem(last=False)[1][0])
        return self._open[url]

    def _discard(self, url: str) -> None:
        entry = self._open.pop(url, None)
        if entry is not None:
            self._close_one(entry[0])

    @staticmethod
    def _close_one(f: BinaryIO) -> None:
        try:
            f.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail too; it is dropped
            pass

    def close(self) -> None:
        """Close every open file (the reader stays usable; files reopen on demand)."""
        while self._open:
            self._close_one(self._open.popitem()[1][0])
