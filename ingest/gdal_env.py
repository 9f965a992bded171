"""GDAL settings for windowed range reads of COGs over HTTP(S) and S3, and error triage.

Shared by the STAC reader (``ingest.stac.read``) and the raster reader of the other sources
(``ingest.raster``): a leaf module, so neither imports the other.

Only the byte ranges of the blocks a patch needs are fetched: GDAL reads a COG's header (the
first ``GDAL_INGESTED_BYTES_AT_OPEN`` bytes, 16 KiB by default) when the file is opened, then
one range request per run of blocks (``GDAL_HTTP_MERGE_CONSECUTIVE_RANGES`` joins adjacent ones).

Retries (two layers; the STAC reader takes both from ``ingest.stac.retries`` /
``retry_backoff_s``, ``ingest.raster`` from its fixed policy ``ingest.raster.RETRY``):

- GDAL's own, per HTTP request: ``GDAL_HTTP_MAX_RETRY`` = retries, ``GDAL_HTTP_RETRY_DELAY`` =
  backoff; GDAL retries 429, 500, 502, 503 and 504 answers (and, since 3.7, curl's timeouts and
  connection resets), doubling the delay (with jitter) each time.
- The reader's, per read (:func:`is_transient` decides): what still fails after GDAL's
  retries, or fails where GDAL does not retry, is retried after closing and reopening the
  dataset, with the same exponential backoff. GDAL often reports a failed remote block read only
  as libtiff's "Read error ... got 0 bytes" (measured against moto behind a 503-injecting
  proxy), so that counts as transient for s3/http hrefs (and as truncation for local files).

A persistently failing request is thus tried at most (GDAL's retries + 1) x (the reader's
retries + 1) times, with waits bounded by about ``2 x backoff x 2^retries`` per layer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

# Messages of errors worth retrying: throttling and server errors, timeouts, dropped connections.
TRANSIENT = re.compile(
    r"HTTP (?:response )?(?:code|error|status)[ :=]*(?:429|5\d\d)\b|\b(?:429|50[0-4]) (?:Too Many|Internal|"
    r"Bad Gateway|Service Unavailable|Slow Down|Gateway)|SlowDown|RequestTimeout|timed? ?out|Timeout|"
    r"Connection (?:was )?reset|reset by peer|Empty reply from server|Recv failure|Send failure|"
    r"transfer closed with|Connection died|connection abort|partial file|Operation too slow|"
    # S3's own messages for 503 SlowDown / 500 InternalError, which GDAL reports without the code
    r"reduce your request rate|encountered an internal error|Please try again|Service Unavailable",
    re.IGNORECASE)
# A remote block read that came back short: GDAL reports the transport's failure (after its own
# retries) only as libtiff's read error. Retried for remote files only: locally it is truncation.
SHORT_READ = re.compile(r"Read error at .*got \d+ bytes, expected \d+|IReadBlock failed", re.IGNORECASE)


def vsi_path(href: str) -> str:
    """The GDAL path of an asset href.

    ``s3://b/k`` -> ``/vsis3/b/k``, ``http(s)://..`` -> ``/vsicurl/http(s)://..``, ``file://``
    and plain paths -> local paths.
    """
    scheme = urlsplit(href).scheme.lower()
    if scheme == "s3":
        return "/vsis3/" + href[len("s3://"):]
    if scheme in ("http", "https"):
        return "/vsicurl/" + href
    if scheme == "file":
        return urlsplit(href).path
    return href


def _has_aws_credentials() -> bool:
    keys = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_ROLE_ARN")
    return any(os.environ.get(k) for k in keys) or (Path.home() / ".aws" / "credentials").exists()


def gdal_options(retries: int, retry_backoff_s: float) -> dict[str, str]:
    """GDAL configuration for the reader's ``rasterio.Env``.

    S3: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (the standard variables s3fs and boto
    honour) becomes GDAL's ``AWS_S3_ENDPOINT`` (host[:port]) with ``AWS_HTTPS`` from its scheme
    and path-style addressing (``AWS_VIRTUAL_HOSTING=FALSE``), as custom endpoints (MinIO, Ceph,
    moto) need; credentials come from the usual AWS variables, which GDAL reads itself. Without
    any credentials, requests are unsigned (public buckets such as Earth Search's).
    """
    options = {
        # open only the file named: no directory listing of the bucket prefix per open
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.jp2,.JP2",
        "VSI_CACHE": "TRUE",  # blocks fetched once per open dataset are kept (header, shared blocks)
        "VSI_CACHE_SIZE": str(16 << 20),
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MULTIPLEX": "YES",
        "GDAL_HTTP_MAX_RETRY": str(retries),
        "GDAL_HTTP_RETRY_DELAY": str(retry_backoff_s),
        "GDAL_HTTP_CONNECTTIMEOUT": "20",
        "GDAL_HTTP_TIMEOUT": "120",
        "CPL_VSIL_CURL_USE_HEAD": "NO",  # S3/HTTP size from the first GET: one request less per file
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        u = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["AWS_S3_ENDPOINT"] = u.netloc + u.path.rstrip("/")
        options["AWS_HTTPS"] = "NO" if u.scheme == "http" else "YES"
        options["AWS_VIRTUAL_HOSTING"] = "FALSE"
    if not _has_aws_credentials():
        options["AWS_NO_SIGN_REQUEST"] = "YES"
    return options


def messages(e: BaseException) -> str:
    """Every message in an exception's chain (rasterio puts GDAL's HTTP error in the cause)."""
    seen, out = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(str(e))
        e = e.__cause__ or e.__context__
    return " | ".join(out)


def is_remote(href: str) -> bool:
    """True for hrefs read over the network (S3, HTTP(S))."""
    return urlsplit(href).scheme.lower() in ("s3", "http", "https")


def is_transient(e: BaseException, href: str) -> bool:
    """True for a read error of ``href`` that another try may not see.

    Throttling, 5xx, timeouts, resets; and for remote hrefs a block read cut short.
    """
    text = messages(e)
    return bool(TRANSIENT.search(text) or (is_remote(href) and SHORT_READ.search(text)))
