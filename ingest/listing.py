"""Listing every file under a large prefix, with concurrent listings on object stores.

``fs.find(root)`` on S3 is one paginated ListObjectsV2 walk: 1000 keys per request, one request
after another (SEN12MS's ~540k files: ~540 round trips in a row). :func:`find_files` returns the
same paths, sorted, but splits the walk:

1. one delimiter listing of ``root`` gives its files and its "folders" (common prefixes);
2. too few folders to keep the pool busy (SEN12MS has 4 season folders): their delimiter
   listings, concurrently, give the level below instead (~3000 scene folders);
3. each folder is walked by its own ``fs.find``, up to ``workers`` at a time.

A level with more than ``max_units`` folders (BigEarthNet's ~590k patch folders) would cost at
least one request per folder; where the filesystem's ``find`` takes a ``prefix`` (s3fs, gcsfs),
its folders are walked by shared name prefixes instead (at most ``max_units`` walks per level),
else each parent is walked whole. Local paths keep ``fs.find``: there is no round trip to save.

A failed listing raises one line naming the prefix (see :func:`_named`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dsl.contracts.storage import filesystem, storage_error

WORKERS = 16  # concurrent listings: enough to hide S3's ~20-50 ms per page, few enough not to be throttled
MAX_UNITS = 4096  # per-folder walks beyond this cost more requests than the walk they replace


def is_local(fs: Any) -> bool:
    """True for a filesystem on this machine's disk (nothing to gain from concurrent listings)."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"file", "local"} & set(protocol))


def find_files(url_or_root: str, fs: Any = None, *, workers: int = WORKERS, max_units: int = MAX_UNITS) -> list[str]:
    """Every file below ``url_or_root``, sorted: the paths ``fs.find`` returns, listed concurrently.

    Args:
        url_or_root: A local path or fsspec URL; with ``fs``, a path inside ``fs``.
        fs: The filesystem (None: from the URL).
        workers: Listings in flight at once.
        max_units: At most this many walks per folder level (see the module docstring).

    Returns:
        Paths without the protocol, as ``fs.find`` gives them.

    Raises:
        OSError: A listing failed (``FileNotFoundError``, ``PermissionError``,
            ``ConnectionError`` kept): one line naming the prefix and the store's answer.
    """
    if fs is None:
        fs, root = filesystem(url_or_root)
    else:
        root = fs._strip_protocol(url_or_root) if hasattr(fs, "_strip_protocol") else url_or_root
    if is_local(fs):
        return sorted(_named(fs, root, fs.find, root))
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="find-files")
    try:
        files, folders = _ls(fs, root)
        children = {root: folders}  # parent -> its folders (full paths)
        if 0 < len(folders) < workers:  # too few walks to fill the pool: one level deeper
            children = {}
            for parent, (sub_files, sub_folders) in zip(folders, pool.map(lambda f: _ls(fs, f), folders), strict=True):
                files += sub_files
                children[parent] = sub_folders
        found = pool.map(lambda unit: _walk(fs, *unit), _units(fs, children, max_units))
        return sorted(set(files).union(*found))
    finally:  # on an error, the listings not yet started are dropped: the first error is the answer
        pool.shutdown(wait=True, cancel_futures=True)


def _ls(fs: Any, path: str) -> tuple[list[str], list[str]]:
    """(files, folders) directly under ``path``: one delimiter listing (paginated)."""
    fs.invalidate_cache(path)  # s3fs keeps listings per instance: list what is there now, as find does
    entries = _named(fs, path, fs.ls, path, detail=True)
    files = [e["name"] for e in entries if e.get("type") != "directory"]
    folders = [e["name"].rstrip("/") for e in entries if e.get("type") == "directory"]
    return files, [f for f in folders if f != path.rstrip("/")]


def _takes_prefix(fs: Any) -> bool:
    try:
        return "prefix" in inspect.signature(fs.find).parameters
    except (TypeError, ValueError):
        return False


def _units(fs: Any, children: dict[str, list[str]], max_units: int) -> list[tuple[str, str]]:
    """The walks, as (folder, name prefix within it; '' = all of it), covering every folder."""
    total = sum(len(v) for v in children.values())
    if total <= max_units:
        return [(folder, "") for folders in children.values() for folder in folders]
    if not _takes_prefix(fs):
        return [(parent, "") for parent, folders in children.items() if folders]
    budget = max(1, max_units // max(1, len(children)))
    units = []
    for parent, folders in children.items():
        names = [f.rsplit("/", 1)[-1] for f in folders]
        units += [(parent, p) for p in _prefixes(names, budget)] if names else []
    return units


def _prefixes(names: Iterable[str], budget: int) -> list[str]:
    """The longest name prefixes, at most ``budget`` distinct, that every name starts with one of.

    Every name starts with one returned prefix, so walking each prefix covers every name; none
    starts with another (a name may still start with a longer one's folder name, as ``S1B_1``
    and ``S1B_10``: the caller drops the duplicate paths).
    """
    names = list(names)
    best = [""]
    for length in range(1, max(map(len, names), default=0) + 1):
        cut: list[str] = []
        for p in sorted({n[:length] for n in names}):  # a name's extensions sort right after it
            if not cut or not p.startswith(cut[-1]):  # "S1" already walks "S1A...": not twice
                cut.append(p)
        if len(cut) > budget:
            break
        best = cut
    return best


def _walk(fs: Any, folder: str, prefix: str) -> list[str]:
    if prefix:
        return _named(fs, f"{folder}/{prefix}*", fs.find, folder, prefix=prefix)
    return _named(fs, folder, fs.find, folder)


def _named(fs: Any, path: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``; an error becomes one line naming the prefix listed.

    ``FileNotFoundError``, ``PermissionError`` and an unreachable endpoint (``ConnectionError``,
    :func:`dsl.contracts.storage.storage_error`) keep their type; other errors become ``OSError``.
    """
    try:
        return call(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any store's error is reported with the prefix it hit
        url = fs.unstrip_protocol(path) if hasattr(fs, "unstrip_protocol") else path
        cause = storage_error(e) or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        kind = next((k for k in (FileNotFoundError, PermissionError, ConnectionError) if isinstance(cause, k)), OSError)
        raise kind(f"listing {url} failed: {type(cause).__name__}: {first}") from e
