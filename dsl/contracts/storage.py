"""Object storage through fsspec: local folders, file://, s3:// (s3fs) or any fsspec URL.

Also the one pyarrow filesystem Ray Train's checkpoint storage needs (:func:`ray_storage`).

S3 endpoint and credentials come the standard way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...),
so any S3-compatible store works without settings of our own.

Every S3 request is bounded (:data:`S3_DEFAULTS`): connect and read timeouts, a few retries with
backoff, and no ``Expect: 100-continue`` (aiohttp waits for the interim answer with no timeout at
all, so a paused endpoint held every upload for ever). fsspec's own configuration still wins
key by key, e.g. ``FSSPEC_S3='{"config_kwargs": {"read_timeout": 60}}'``. An endpoint that
does not answer within them is reported as one line naming it (:func:`storage_error`).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlparse

import fsspec
from fsspec.core import url_to_fs

# Schemes whose URLs start with a bucket, container or host: without one, fsspec resolves
# "s3://" + "x" to the local path "s3:/x" (join strips the slashes), a folder named "s3:".
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "http", "https", "hf", "oci",
                  "oss", "hdfs", "webhdfs", "sftp", "ssh", "ftp")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")

# Bounds on one S3 request: botocore's connect/read timeouts and attempts (standard mode:
# exponential backoff with jitter), and s3fs's own retries around them (it retries timeouts).
# Worst case for one call against a silent endpoint: S3_RETRIES x attempts x read_timeout.
S3_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 20,
    "retries": {"total_max_attempts": 3, "mode": "standard"},
}
S3_RETRIES = 2


def check_url(url: str, key: str = "URL") -> str:
    """Return ``url`` if it is a local path or a URL that names its bucket or host.

    Args:
        url: A local path or fsspec URL.
        key: What it is, named in the error (a config key such as ``ingest.output``).

    Raises:
        ValueError: Empty, padded with spaces, or a remote URL without a bucket/host
            (``s3://``, ``s3:///x``, ``gs://``) or without its ``//`` (``s3:/x``).
    """
    if not url:
        raise ValueError(f"{key} is empty: give a local folder or a URL like s3://BUCKET/PATH")
    if url != url.strip():
        raise ValueError(f"{key} {url!r} starts or ends with spaces")
    for part in url.split("::"):  # fsspec chains (simplecache::s3://...): each target counts
        m = _SCHEME_RE.match(part)
        if not m or m[1].lower() not in REMOTE_SCHEMES:
            continue
        if not m[2]:
            raise ValueError(f"{key} {url!r} is not a URL: write {m[1]}://BUCKET/PATH ('//' after '{m[1]}:')")
        if not urlparse(part).netloc:
            what = "bucket" if m[1].lower().startswith(("s3", "gs", "gcs", "oss", "oci")) else "host"
            raise ValueError(f"{key} {url!r} names no {what}: write {m[1]}://{what.upper()}/PATH")
    return url


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URL.

    Raises:
        ValueError: A URL without its bucket or host (:func:`check_url`).
    """
    fs, path = url_to_fs(check_url(url))
    return fs, path.rstrip("/") if path not in ("/", "") else path


def join(url: str, *parts: str) -> str:
    """Join a path or URL and parts with single ``/`` separators (``os.path.join`` breaks URLs)."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(url: str) -> bool:
    """Tell whether ``url`` is a plain local path or a ``file://`` URL."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """Strip a ``file://`` scheme, leaving a local filesystem path."""
    return url[len("file://"):] if url.startswith("file://") else url


def storage_error(e: BaseException) -> ConnectionError | None:
    """One-line error for a storage endpoint that refused, timed out or dropped the connection.

    Returns None for any other error (a missing key, a permission error ... keep their own).
    """
    try:
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )
    except ImportError:  # no S3 support installed: nothing of it can have failed
        return None
    if not isinstance(e, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
        return None
    u = urlparse(getattr(e, "kwargs", {}).get("endpoint_url") or "")
    endpoint = f"{u.scheme}://{u.netloc}" if u.netloc else "(endpoint unknown)"
    return ConnectionError(f"storage endpoint {endpoint} unreachable after retries: {e}; check "
                           "AWS_ENDPOINT_URL and that the store is up")


def _s3_classes() -> dict[str, type]:
    """s3fs's filesystem with :data:`S3_DEFAULTS`, built on first use (s3fs imports in ~1 s)."""
    if not _LAZY:
        import s3fs
        from aiobotocore.httpsession import AIOHTTPSession

        class NoContinueSession(AIOHTTPSession):
            """Sends bodies at once: aiohttp waits for a ``100 Continue`` with no timeout."""

            async def send(self, request):
                request.headers.pop("Expect", None)
                return await super().send(request)

        class BoundedS3FileSystem(s3fs.S3FileSystem):
            """s3fs with every request bounded (module docstring)."""

            retries = S3_RETRIES

            def __init__(self, *args: Any, config_kwargs: dict | None = None, **kwargs: Any):
                merged = {**S3_DEFAULTS, "http_session_cls": NoContinueSession, **(config_kwargs or {})}
                super().__init__(*args, config_kwargs=merged, **kwargs)

        # one instance cache with s3fs's (fsspec gives each class its own): code that clears
        # s3fs.S3FileSystem's cache, e.g. after changing AWS_ENDPOINT_URL, clears ours too;
        # the cache keys include the class, so the two never share an instance
        BoundedS3FileSystem._cache = s3fs.S3FileSystem._cache
        for cls in (NoContinueSession, BoundedS3FileSystem):
            # pickled by reference (Ray ships filesystems): this module's attribute, via __getattr__
            cls.__module__, cls.__qualname__ = __name__, cls.__name__
            _LAZY[cls.__name__] = cls
    return _LAZY


_LAZY: dict[str, type] = {}


def __getattr__(name: str):
    # fsspec imports the registered "module.attribute" on the first s3:// URL
    if name in ("BoundedS3FileSystem", "NoContinueSession"):
        return _s3_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


for _scheme in ("s3", "s3a"):
    fsspec.register_implementation(_scheme, f"{__name__}.BoundedS3FileSystem", clobber=True)


def register_webdataset_handlers() -> None:
    """Teach webdataset's gopen to open any fsspec URL (it has no s3:// handler of its own)."""
    import importlib

    # the package re-exports a function named gopen, shadowing the module for `import ... as`
    gopen = importlib.import_module("webdataset.gopen")

    def _open_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
        return fsspec.open(url, mode).open()

    for scheme in ("s3", "gs", "gcs", "az", "abfs", "memory", "http", "https"):
        gopen.gopen_schemes[scheme] = _open_fsspec


def ray_storage(path: str):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig; S3 honours AWS_ENDPOINT_URL.

    Ray Train writes checkpoints through pyarrow, not fsspec: this is the only place DSL builds
    a pyarrow filesystem.
    """
    if not check_url(path, "scale.storage_path").startswith("s3://"):
        return path, None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # no region of ours: the AWS SDK resolves it its standard way (AWS_DEFAULT_REGION, AWS_REGION,
    # the config file's profile), as botocore does for s3fs
    retry = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=S3_DEFAULTS["retries"]["total_max_attempts"])
    kwargs: dict[str, Any] = {"connect_timeout": S3_DEFAULTS["connect_timeout"],
                              "request_timeout": S3_DEFAULTS["read_timeout"], "retry_strategy": retry}
    if endpoint:
        u = urlparse(endpoint)
        kwargs.update(endpoint_override=u.netloc, scheme=u.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    # with a custom filesystem Ray wants the path without its scheme
    return path.removeprefix("s3://"), pyarrow.fs.S3FileSystem(**kwargs)
