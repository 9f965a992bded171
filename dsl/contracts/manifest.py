"""A dataset's ``manifest.json``, typed: the committed shards, the bands and their statistics.

``dsl ingest`` writes the manifest last, so its absence means the ingest did not finish and the
shards beside it must not be trained on. Every reader goes through :func:`read_manifest`, which
validates the whole file once; code above reads attributes, never keys.

Versioning: ``format_version`` is the shard format the manifest describes
(:data:`~dsl.contracts.shard_format.FORMAT_VERSION`). A manifest of a newer or unknown version is
refused with a message that says so, instead of being half-understood.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsl.contracts.documents import parse_document
from dsl.contracts.shard_format import FORMAT_VERSION, MANIFEST
from dsl.contracts.storage import filesystem, join


class _Record(BaseModel):
    # extra="allow": fields a later minor change adds survive a read-modify-write.
    model_config = ConfigDict(extra="allow", validate_assignment=True)


class ShardEntry(_Record):
    """One committed shard: its path relative to the manifest, split and sample count.

    On object stores the path has a hashed folder, ``<4 hex>/<shard>``.
    """

    name: str = Field(min_length=1)
    split: str | None
    samples: int = Field(ge=0)
    bytes: int | None = Field(None, ge=0)
    sha256: str | None = None

    @field_validator("name")
    @classmethod
    def _inside_the_dataset(cls, v: str) -> str:
        # joined to the dataset's URL: an absolute path or a .. part would read outside it
        if v.startswith("/") or "\\" in v or any(p in ("", ".", "..") for p in v.split("/")):
            raise ValueError(f"shard name {v!r} is not a relative path inside the dataset")
        return v


class Bands(_Record):
    """Band names per sensor, in the order of the arrays' first axis."""

    s1: list[str]
    s2: list[str] | None = None


class BandSummary(_Record):
    """Statistics of one band (sampled pixels of the statistics split)."""

    mean: float
    std: float
    count: int | None = None
    min: float | None = None
    max: float | None = None
    p1: float | None = None
    p99: float | None = None


class Stats(_Record):
    """Per sensor, band name -> :class:`BandSummary`."""

    s1: dict[str, BandSummary] = {}
    s2: dict[str, BandSummary] = {}


class IndexRef(_Record):
    """A table beside the manifest: the byte-offset index or the sample digests (shard_index)."""

    name: str = Field(min_length=1)
    bytes: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Record):
    """The typed content of ``manifest.json`` (see the README's shard format section)."""

    format_version: int
    shards: list[ShardEntry]
    bands: Bands
    stats: Stats
    source: str | None = None
    input: str | None = None
    options: dict | None = None
    code_version: str | None = None
    created: str | None = None
    plan_id: str | None = None
    samples: int | None = None
    samples_by_split: dict[str, int] | None = None
    bad: int | None = None
    skipped: dict[str, int] | None = None  # patches a source's filters left out, by reason (stac)
    listing: dict | None = None  # what the source's listing found (stac: scenes searched, paired ...)
    quarantine: str | None = None
    stats_split: str | None = None
    seconds: float | None = None
    task_seconds: float | None = None
    index: IndexRef | None = None  # format_version >= 2; older datasets are indexed by reading headers
    digests: IndexRef | None = None  # each sample's sha256 prefix; datasets written before: unchecked
    patch_min: list[int] | None = None  # [H, W] of the smallest sample (a crop must fit); older: unknown

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > FORMAT_VERSION:
            raise ValueError(f"format_version {v} is newer than this DSL reads ({FORMAT_VERSION}): upgrade DSL")
        if v < 1:
            raise ValueError(f"format_version {v} is not a DSL shard format")
        return v

    def to_json(self) -> str:
        """The file's text (indented, None fields kept so readers see every key)."""
        return json.dumps(self.model_dump(mode="json"), indent=1)


def parse_manifest(text: str, url: str) -> Manifest:
    """Validate a manifest's text; errors name ``url`` and the key.

    Raises:
        ValueError: Not JSON, not an object, a missing or ill-typed key, an unknown version.
    """
    return parse_document(text, url, Manifest, "; rerun the ingest to rewrite it")


def read_manifest(shards_url: str) -> Manifest:
    """Load and validate ``<shards_url>/manifest.json``.

    Args:
        shards_url: Folder or URL (local, file://, s3://, ...) the ingest wrote to.

    Raises:
        FileNotFoundError: No manifest there (the ingest did not finish, or a wrong URL).
        ValueError: The manifest is not valid JSON or does not fit :class:`Manifest`.
    """
    url = join(shards_url, MANIFEST)
    fs, path = filesystem(url)
    try:
        with fs.open(path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} at {url}: the ingest did not finish") from None
    return parse_manifest(text, url)


def manifest_sha256(shards_url: str) -> str:
    """sha256 of the manifest file's bytes: the dataset's identity in lineage tags.

    Raises:
        FileNotFoundError: No manifest there.
    """
    fs, path = filesystem(join(shards_url, MANIFEST))
    if not fs.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} at {shards_url}: the ingest did not finish")
    return hashlib.sha256(fs.cat_file(path)).hexdigest()


def _split_name(split: str | None) -> str:
    return "<none>" if split is None else repr(split)


def select_shards(manifest: Manifest, split: str | None = None) -> list[ShardEntry]:
    """The manifest's shard entries of ``split`` (None: every shard), in manifest order.

    Raises:
        ValueError: No shard has that split; the message lists the splits there are.
    """
    shards = [s for s in manifest.shards if split is None or s.split == split]
    if not shards:
        available = sorted({_split_name(s.split) for s in manifest.shards})
        what = f"split {split!r}" if split is not None else "any split"
        raise ValueError(
            f"no shards of {what} in the manifest; available splits: {', '.join(available) or 'none (no shards)'}"
            + (" (<none>: ingested without --val-fraction)" if "<none>" in available else "")
        )
    return shards


def shard_urls(manifest: Manifest, shards_url: str, split: str | None = None) -> list[str]:
    """Full URLs of the shards of ``split`` (None: all), in manifest order.

    Raises:
        ValueError: No shard has that split; the message lists the splits there are.
    """
    return [join(shards_url, s.name) for s in select_shards(manifest, split)]


def split_samples(manifest: Manifest, split: str | None = None) -> int:
    """Number of samples in ``split`` (None: all), from the manifest's per-shard counts."""
    return sum(s.samples for s in select_shards(manifest, split))
