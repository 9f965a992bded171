"""Object storage through fsspec: local folders, file://, s3:// (s3fs) or any fsspec URL.

S3 endpoint and credentials come the standard way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...),
so any S3-compatible store works without settings of our own.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URL."""
    fs, path = url_to_fs(url)
    return fs, path.rstrip("/") if path not in ("/", "") else path


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def storage_env() -> dict[str, str]:
    """Variables that select and authenticate object storage, to forward to Ray workers."""
    keep = ("AWS_", "FSSPEC_", "S3_", "GOOGLE_", "AZURE_")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def register_webdataset_handlers() -> None:
    """Teach webdataset's gopen to open any fsspec URL (it has no s3:// handler of its own)."""
    import importlib

    # the package re-exports a function named gopen, shadowing the module for `import ... as`
    gopen = importlib.import_module("webdataset.gopen")

    def _open_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
        return fsspec.open(url, mode).open()

    for scheme in ("s3", "gs", "gcs", "az", "abfs", "memory", "http", "https"):
        gopen.gopen_schemes[scheme] = _open_fsspec
