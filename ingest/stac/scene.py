"""The record that joins STAC search (listing) and patch reading (Ray tasks): one paired scene.

The driver searches, pairs and writes every :class:`Scene` to ``_parts/scenes.jsonl`` under the
ingest's output before any task runs; a task reads that table once and reads its patches from the
scenes' assets. Patch items (``PairItem``) carry only the scene id and the patch number, so a plan
of millions of patches stays small in the driver and in every task's arguments.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

SCENES = "scenes.jsonl"  # under <output>/_parts/


@dataclass(frozen=True)
class Scene:
    """One S2 L2A scene and the S1 scene paired with it, as the patch reader needs them.

    Attributes:
        s2_id: The S2 item id (sample keys start with it, cleaned to [A-Za-z0-9_-]).
        s2_datetime: The S2 acquisition, ISO 8601 UTC.
        s2_assets: S2 band (``B1`` .. ``B12``, ``B8A``) -> href, in the shard's band order.
        scl: Href of the scene classification layer (20 m), or None when the item has none.
        s2_offset: Digital numbers to add to every S2 band to remove the L2A offset (``-1000``
            from processing baseline 04.00 on, else 0), decided at listing from the metadata.
        crs: The S2 grid's CRS (``EPSG:326xx``).
        transform: The S2 10 m grid's affine a, b, c, d, e, f.
        shape: The S2 10 m grid's (height, width) in pixels.
        grid: The place's id independent of the date (the MGRS tile, e.g. ``32UPU``): patch
            locations are ``<grid>_r<row>_c<col>``, so revisits of one place share a location
            and a train/val split never separates them.
        s1_id: The paired S1 item id.
        s1_datetime: The S1 acquisition, ISO 8601 UTC.
        s1_assets: Polarisation (``VV``, ``VH``) -> href.
        s1_units: ``linear`` (converted to dB when read) or ``db``.
        gap_days: |S1 - S2| acquisition time in days.
        s1_collection: The S1 item's collection (for the record).
    """

    s2_id: str
    s2_datetime: str
    s2_assets: dict[str, str]
    scl: str | None
    s2_offset: float
    crs: str
    transform: tuple[float, float, float, float, float, float]
    shape: tuple[int, int]
    grid: str
    s1_id: str
    s1_datetime: str
    s1_assets: dict[str, str]
    s1_units: str
    gap_days: float
    s1_collection: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """One line of ``scenes.jsonl`` (keys in field order: the asset maps' order is the band order)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> Scene:
        """Parse one line of ``scenes.jsonl`` (written by :meth:`to_json`)."""
        d = json.loads(line)
        d["transform"], d["shape"] = tuple(d["transform"]), tuple(d["shape"])
        return cls(**d)

    def patches(self, tile: int) -> tuple[int, int]:
        """(rows, cols) of whole ``tile``-px patches on the scene's grid (edges dropped)."""
        return self.shape[0] // tile, self.shape[1] // tile
