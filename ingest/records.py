"""The records every part of ingest passes around: items to read, pairs read, inputs refused.

A leaf module (no other ingest import): the sources, the writer and the STAC reader all use
these without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dsl.contracts.shard_format import KEY_RE


@dataclass(frozen=True)
class PairItem:
    """A pair to read: cheap to list, ship to a Ray task and sort. ``files`` maps role -> URL."""

    key: str
    location: str  # the place: train/val split never separates one location
    files: tuple[tuple[str, str], ...]
    split: str | None = None  # a split the source itself defines (DFC2020 validation/test)
    index: int | None = None  # row in array sources (zarr)

    def file(self, role: str) -> str | None:
        """Return the URL of the file with this role (e.g. ``s1``, ``s2``), or None."""
        return dict(self.files).get(role)


@dataclass
class Pair:
    """One validated, co-located S1/S2 sample, ready to be written to a shard.

    Attributes:
        key: The sample key (letters, digits, ``_`` and ``-``).
        location: The place it shows; a train/val split never separates one location.
        s1: float32 [2, H, W], VV and VH backscatter in dB.
        s2: uint16 [C, H, W], reflectance x 10000.
        meta: The sample's metadata (ids, CRS, geotransform, band names, files ...).
        dfc: uint8 [H, W] remapped DFC land-cover mask, for labelled sources.
        extra: Further shard members of a source, by extension.
    """

    key: str
    location: str
    s1: np.ndarray  # float32 [2, H, W] dB
    s2: np.ndarray  # uint16 [C, H, W]
    meta: dict
    dfc: np.ndarray | None = None  # uint8 [H, W] remapped DFC mask
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BadRecord:
    """An input left out of the dataset and written to ``quarantine.jsonl``.

    Attributes:
        key: The item or sample key.
        file: The file at fault.
        reason: Why it was refused.
    """

    key: str
    file: str
    reason: str

    def as_dict(self) -> dict:
        """Return the record as a plain dict (a quarantine line, a sidecar entry)."""
        return {"key": self.key, "file": self.file, "reason": self.reason}


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (no dots: webdataset splits at the first).

    Raises:
        ValueError: The key has characters other than letters, digits, ``_`` and ``-``.
    """
    if not KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} has characters other than letters, digits, _ and -")
    return key


class Skipped(Exception):
    """A patch a source's filters leave out (clouds, nodata): counted by reason, not an error.

    Unlike :class:`ingest.raster.BadInput` (an unusable input, quarantined and counted against
    ``ingest.max_bad_fraction``), a skipped patch is valid input the dataset does not want; the
    manifest counts them per reason (``skipped``).
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
