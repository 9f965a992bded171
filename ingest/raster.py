"""Reading rasters (local, S3, HTTP(S) or any fsspec URL) into arrays, with errors that name the file.

How a URL is opened:

- a local path or ``file://`` URL: by rasterio, directly;
- ``s3://`` and ``http(s)://``: through GDAL's ``/vsis3/`` and ``/vsicurl/``
  (:mod:`ingest.gdal_env`), so a window fetches the file's header and the byte ranges of its
  own blocks only: a 256 px tile of a tiled 10,980 px scene costs a few blocks, not the scene;
- any other fsspec URL (``memory://``, ``gs://`` ...), which GDAL cannot read: downloaded
  whole into memory, once per open.

:class:`OpenRasters` keeps datasets open by URL, so a source reading many windows of a raster
opens (and for fsspec URLs downloads) it once; :func:`read_raster`, :func:`raster_header` and
:func:`raster_shape` open, read and close. Transient errors of non-local reads (throttling, 5xx,
timeouts, resets: :func:`ingest.gdal_env.is_transient`) are retried after reopening, with
exponential backoff (:data:`RETRY`); one that persists is a :class:`BadInput`. Local files are
never retried: their errors do not go away.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.io import MemoryFile

from dsl.contracts.storage import is_local, local_path
from ingest.gdal_env import gdal_options, is_remote, is_transient, messages, vsi_path


class BadInput(Exception):
    """One input is unusable; it is quarantined with its file and reason, the run goes on."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@dataclass(frozen=True)
class RetryPolicy:
    """How transient errors of non-local reads are retried.

    Attributes:
        retries: Reads retried (the raster reopened) after a transient error: ``retries + 1``
            tries in all.
        backoff_s: The wait before the first retry; doubled before each next one.
        gdal_retries: GDAL's own retries of one HTTP request (429 and 5xx answers), from the
            same first delay: cheaper than a reopen, so a short burst costs no reopen at all.
    """

    retries: int = 4
    backoff_s: float = 0.5
    gdal_retries: int = 2


# 5 tries, waits 0.5, 1, 2, 4 s between them: a store outage of ~8 s is bridged per read
RETRY = RetryPolicy()
# Datasets an OpenRasters keeps open (least recently used closed first): a pair needs two, and
# each remote one holds up to VSI_CACHE_SIZE (16 MiB) of cached bytes
MAX_OPEN = 8
# What a broken or missing file raises (as before remote reads went through GDAL)
READ_ERRORS = (rasterio.errors.RasterioError, OSError, ValueError)
# GDAL's network layer may also fail as a RuntimeError
REMOTE_ERRORS = (*READ_ERRORS, RuntimeError)
# A remote file that is not there: GDAL names no exception class, only the message
NOT_FOUND = re.compile(r"HTTP response code: 404|NoSuchKey|specified key does not exist|does not exist in the file system",
                       re.IGNORECASE)


@dataclass
class Raster:
    """One raster read into memory, with the georeferencing needed to check pairs align.

    Attributes:
        path: The URL or path it was read from (named in errors).
        data: Pixels [bands, H, W] in the file's dtype.
        crs: The CRS as a string (e.g. ``EPSG:32632``), or None when the file has none.
        transform: The affine geotransform's six coefficients (a, b, c, d, e, f).
        nodata: The file's nodata value, or None.
    """

    path: str
    data: np.ndarray  # [bands, H, W]
    crs: str | None
    transform: tuple[float, ...]  # affine a, b, c, d, e, f
    nodata: float | None

    @property
    def grid(self) -> tuple:
        """(CRS, transform rounded to 1e-9, (H, W)): equal for rasters on the same pixel grid."""
        return (self.crs, tuple(round(v, 9) for v in self.transform), self.data.shape[1:])


def _read(ds, out_shape, resampling, window) -> np.ndarray:
    if out_shape is None:
        return ds.read(window=window)
    return ds.read(out_shape=(ds.count, *out_shape), resampling=resampling, window=window)


def _first_line(e: BaseException, chain: bool) -> str:
    # GDAL's HTTP error is in the cause (named when remote), often repeated down the chain
    text = " | ".join(dict.fromkeys(messages(e).split(" | "))) if chain else str(e)
    return text.splitlines()[0][:200] if text.strip() else type(e).__name__


class OpenRasters:
    """Rasters held open by URL for many reads; a context manager (or call :meth:`close`).

    Args:
        retry: The retry policy of non-local reads (default :data:`RETRY`, read when created).
        sleep: Waits between retries (tests pass a recorder).
        max_open: Datasets kept open; the least recently used is closed first.

    Attributes:
        opens: URL -> times opened (1 unless evicted, or reopened after a transient error).
        retried: URL -> transient errors retried.
    """

    def __init__(self, retry: RetryPolicy | None = None, sleep: Callable[[float], Any] = time.sleep,
                 max_open: int = MAX_OPEN):
        self.retry = retry or RETRY
        self._sleep = sleep
        self._max_open = max(1, max_open)
        self._open: OrderedDict[str, tuple[Any, MemoryFile | None]] = OrderedDict()  # url -> (dataset, its memory)
        self._env: rasterio.Env | None = None
        self.opens: Counter[str] = Counter()
        self.retried: Counter[str] = Counter()

    def __enter__(self) -> OpenRasters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open dataset."""
        with self._env or contextlib.nullcontext():
            while self._open:
                self._drop(next(iter(self._open)))

    def read(self, url: str, out_shape: tuple[int, int] | None = None, resampling: Resampling = Resampling.bilinear,
             window=None) -> Raster:
        """Read all bands of a raster, or of a window of it (see :func:`read_raster`).

        Raises:
            BadInput: Missing, unreadable or truncated file, or a transient error that persisted.
        """
        return self._call(url, "unreadable or truncated raster", True,
                          lambda ds: _raster(url, ds, _read(ds, out_shape, resampling, window), window))

    def call(self, url: str, what: Callable[[Any], Any], unreadable: str = "unreadable") -> Any:
        """``what(dataset)`` on the open raster, under the same retries and errors as :meth:`read`.

        For readers that do more than a window read (the STAC reader's warped reads). An error
        ``what`` raises itself that is not a read error (a ``BadInput`` of its own, a skip)
        passes through unchanged.

        Raises:
            BadInput: Missing, unreadable, or a transient error that persisted.
        """
        return self._call(url, unreadable, True, what)

    def header(self, url: str) -> Raster:
        """Georeferencing and shape without reading pixels (``data`` is a zero-memory view).

        Raises:
            BadInput: The header is unreadable (as :meth:`read`).
        """
        return self._call(url, "unreadable raster header", False, lambda ds: _header(url, ds))

    def shape(self, url: str) -> tuple[int, int, int, str]:
        """(bands, height, width, dtype) from the header only (raises BadInput)."""
        r = self.header(url)
        return (*r.data.shape, str(r.data.dtype))

    # -- opening and retrying -------------------------------------------------------------------
    def _env_for(self, url: str):
        if not is_remote(url):
            return contextlib.nullcontext()
        if self._env is None:  # built once: rasterio looks up the AWS credentials here
            options = gdal_options(self.retry.gdal_retries, self.retry.backoff_s)
            # a pair table may list any format GDAL reads, not only the STAC assets' .tif/.jp2;
            # GDAL_DISABLE_READDIR_ON_OPEN still keeps it from probing sidecar files
            options.pop("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", None)
            self._env = rasterio.Env(**options)
        return self._env

    def _dataset(self, url: str):
        entry = self._open.get(url)
        if entry is not None:
            self._open.move_to_end(url)
            return entry[0]
        self.opens[url] += 1
        mem = None
        if is_local(url):
            ds = rasterio.open(local_path(url))
        elif is_remote(url):
            ds = rasterio.open(vsi_path(url))  # range reads: only the blocks a window needs
        else:
            import fsspec  # a scheme GDAL cannot read: the whole file, once per open

            with fsspec.open(url, "rb") as f:
                mem = MemoryFile(f.read())
            try:
                ds = mem.open()
            except BaseException:
                mem.close()
                raise
        self._open[url] = (ds, mem)
        while len(self._open) > self._max_open:
            self._drop(next(iter(self._open)))
        return ds

    def _drop(self, url: str) -> None:
        ds, mem = self._open.pop(url, (None, None))
        for thing in (ds, mem):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001, S110 - a broken dataset may fail to close; it is gone anyway
                    pass

    def _call(self, url: str, unreadable: str, not_found: bool, what: Callable[[Any], Any]) -> Any:
        """``what(dataset)`` with the raster opened once, transient errors retried, others BadInput.

        Args:
            url: The raster.
            unreadable: The reason's start for a broken file.
            not_found: Report a missing file as ``file not found`` (reads; headers say unreadable).
            what: The read.
        """
        local = is_local(url)
        errors = READ_ERRORS if local else REMOTE_ERRORS
        for attempt in range(self.retry.retries + 1):
            try:
                with self._env_for(url):
                    return what(self._dataset(url))
            except errors as e:
                with self._env_for(url):
                    self._drop(url)  # a dataset that failed mid-read is reopened, not trusted
                if local:  # a local file's error does not go away: no retry
                    # GDAL says a file is missing in its message (a RasterioIOError), not its type
                    if not_found and (isinstance(e, FileNotFoundError) or "No such file or directory" in str(e)):
                        raise BadInput(url, "file not found") from None
                    raise BadInput(url, f"{unreadable} ({_first_line(e, chain=False)})") from None
                first = _first_line(e, chain=True)
                if not is_transient(e, url):
                    if isinstance(e, FileNotFoundError) or NOT_FOUND.search(messages(e)):
                        raise BadInput(url, "file not found") from None
                    raise BadInput(url, f"{unreadable} ({first})") from None
                if attempt == self.retry.retries:
                    raise BadInput(url, f"transient error persisted after {self.retry.retries} retries ({first})") from None
                self.retried[url] += 1
                self._sleep(self.retry.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def read_raster(
    url: str,
    out_shape: tuple[int, int] | None = None,
    resampling: Resampling = Resampling.bilinear,
    window=None,
) -> Raster:
    """Read all bands of a raster (opened and closed; use :class:`OpenRasters` for many windows).

    Args:
        url: Local path or URL (``s3://`` and ``http(s)://`` read by byte ranges, see the module).
        out_shape: Resample to this (H, W) (e.g. BigEarthNet 20/60 m bands to the 10 m grid).
        resampling: GDAL resampling used with ``out_shape``.
        window: Optional rasterio window (tiling large rasters).

    Raises:
        BadInput: Missing, unreadable or truncated file, or a transient error that persisted.
    """
    with OpenRasters() as rasters:
        return rasters.read(url, out_shape, resampling, window)


def _raster(url: str, ds, data: np.ndarray, window) -> Raster:
    transform = ds.window_transform(window) if window is not None else ds.transform
    if data.shape[1:] != (ds.height, ds.width) and window is None:
        # resampled: the grid is the output grid
        transform = ds.transform @ ds.transform.scale(ds.width / data.shape[-1], ds.height / data.shape[-2])
    return Raster(
        path=url,
        data=data,
        crs=ds.crs.to_string() if ds.crs else None,
        transform=tuple(transform)[:6],
        nodata=ds.nodata,
    )


def raster_header(url: str) -> Raster:
    """Georeferencing and shape without reading pixels (``data`` is a zero-memory view)."""
    with OpenRasters() as rasters:
        return rasters.header(url)


def _header(url: str, ds) -> Raster:
    data = np.broadcast_to(np.zeros((), dtype=ds.dtypes[0]), (ds.count, ds.height, ds.width))
    return _raster(url, ds, data, None)


def raster_shape(url: str) -> tuple[int, int, int, str]:
    """(bands, height, width, dtype) from the header only."""
    with OpenRasters() as rasters:
        return rasters.shape(url)
