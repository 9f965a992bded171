"""Object storage through fsspec: local folders, file://, s3:// (s3fs) or any fsspec URL.

Also the one pyarrow filesystem Ray Train's checkpoint storage needs (:func:`ray_storage`).

S3 endpoint and credentials come the standard way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...),
so any S3-compatible store works without settings of our own.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import fsspec
from fsspec.core import url_to_fs


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URL."""
    fs, path = url_to_fs(url)
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
    if not path.startswith("s3://"):
        return path, None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # no region of ours: the AWS SDK resolves it its standard way (AWS_DEFAULT_REGION, AWS_REGION,
    # the config file's profile), as botocore does for s3fs
    kwargs: dict[str, Any] = {}
    if endpoint:
        u = urlparse(endpoint)
        kwargs.update(endpoint_override=u.netloc, scheme=u.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    # with a custom filesystem Ray wants the path without its scheme
    return path.removeprefix("s3://"), pyarrow.fs.S3FileSystem(**kwargs)
