"""Reading a dataset's ``manifest.json``: the list of committed shards and the band statistics.

The manifest is written last by ``dsl ingest``, so its absence means the ingest did not finish
and the shards beside it must not be trained on.
"""

from __future__ import annotations

import json

from dsl.format import MANIFEST
from dsl.storage import filesystem, join


def read_manifest(shards_url: str) -> dict:
    """Load ``<shards_url>/manifest.json``.

    Args:
        shards_url: Folder or URL (local, file://, s3://, ...) the ingest wrote to.

    Raises:
        FileNotFoundError: No manifest there (the ingest did not finish, or a wrong URL).
        ValueError: The manifest is not valid JSON or lacks the keys readers need.
    """
    url = join(shards_url, MANIFEST)
    fs, path = filesystem(url)
    try:
        with fs.open(path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} at {url}: the ingest did not finish") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: not valid JSON ({e}); rerun the ingest to rewrite it") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{url}: top level must be an object, got {type(manifest).__name__}")
    for key in ("shards", "bands", "stats"):
        if key not in manifest:
            raise ValueError(f"{url}: missing key '{key}'")
    for i, shard in enumerate(manifest["shards"]):
        missing = {"name", "split", "samples"} - set(shard)
        if missing:
            raise ValueError(f"{url}: shards[{i}] lacks {sorted(missing)}")
    return manifest


def _split_name(split: str | None) -> str:
    return "<none>" if split is None else repr(split)


def select_shards(manifest: dict, split: str | None = None) -> list[dict]:
    """The manifest's shard entries of ``split`` (None: every shard), in manifest order.

    Raises:
        ValueError: No shard has that split; the message lists the splits there are.
    """
    shards = [s for s in manifest["shards"] if split is None or s["split"] == split]
    if not shards:
        available = sorted({_split_name(s["split"]) for s in manifest["shards"]})
        what = f"split {split!r}" if split is not None else "any split"
        raise ValueError(
            f"no shards of {what} in the manifest; available splits: {', '.join(available) or 'none (no shards)'}"
            + (" (<none>: ingested without --val-fraction)" if "<none>" in available else "")
        )
    return shards


def shard_urls(manifest: dict, shards_url: str, split: str | None = None) -> list[str]:
    """Full URLs of the shards of ``split`` (None: all), in manifest order.

    Raises:
        ValueError: No shard has that split; the message lists the splits there are.
    """
    return [join(shards_url, s["name"]) for s in select_shards(manifest, split)]


def split_samples(manifest: dict, split: str | None = None) -> int:
    """Number of samples in ``split`` (None: all), from the manifest's per-shard counts."""
    return sum(int(s["samples"]) for s in select_shards(manifest, split))
