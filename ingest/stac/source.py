"""Source ``stac``: Sentinel-2 L2A and Sentinel-1 scenes from the archive, as patch pairs.

Listing (in the driver) searches the STAC API, item table or static catalogue named by
``ingest.input`` with ``ingest.stac``'s area, dates and cloud cover, pairs every S2 scene with its
S1 scene (:mod:`ingest.stac.pairing`) and writes the paired scenes to ``_parts/scenes.jsonl``
under the output. Each whole ``tile_size`` patch of an S2 scene's 10 m grid is one item: key
``<s2 id>_r<row>_c<col>``, location ``<grid>_r<row>_c<col>`` (the MGRS tile, so revisits of a place
share a location and a split never separates them), and only the scene id and patch number travel
with it. The planner's hash order then spreads each scene's patches over every shard.

Reading (in the Ray tasks) loads the scene table once per partition and reads each patch with
one :class:`ingest.stac.read.SceneReader`, which opens each scene's COGs once and fetches only the
patch's byte ranges. A patch the filters refuse (clouds, nodata) is skipped and counted by reason;
an unreadable input is quarantined for that patch only, never its whole scene.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from dsl.contracts.config import IngestConfig
from dsl.contracts.shard_format import S1_BANDS, S2_L2A_BANDS
from dsl.contracts.storage import filesystem, join
from ingest.records import BadRecord, Pair, PairItem, check_key
from ingest.stac.scene import SCENES, Scene

PARTS = "_parts"  # ingest.run.PARTS: the run's own folder under the output


class StacSource:
    """Patches of paired S2/S1 scenes (see the module docstring).

    Args:
        cfg: The ingest section: ``stac`` (search, pairing, filters), ``tile_size`` and
            ``output`` (where the scene table is written and read).
    """

    name = "stac"

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self._scenes: dict[str, Scene] | None = None
        self._reader = None
        self._table = ""
        self.counts: dict = {}

    # ---------------------------------------------------------------- listing (driver)

    def list(self, input_url: str) -> tuple[list[PairItem], list[BadRecord]]:
        """Search, pair, write the scene table; one item per whole patch of every paired scene."""
        from ingest.stac.search import search_scenes

        scenes, bad, self.counts = search_scenes(self.cfg.stac, input_url)
        scenes = sorted(scenes, key=lambda s: s.s2_id)
        seen: set[str] = set()
        unique = []
        for s in scenes:  # the same item listed twice (a catalogue with a copy) is one scene
            if s.s2_id not in seen:
                seen.add(s.s2_id)
                unique.append(s)
        self._table = "".join(s.to_json() + "\n" for s in unique)
        t = self.cfg.tile_size
        items = []
        for s in unique:
            rows, cols = s.patches(t)
            for r in range(rows):
                for c in range(cols):
                    items.append(PairItem(key=check_key(f"{s.s2_id}_r{r}_c{c}"), location=f"{s.grid}_r{r}_c{c}",
                                          files=(("scene", s.s2_id),), index=r * cols + c))
        self.counts["scenes"], self.counts["patches"] = len(unique), len(items)
        return items, bad

    def listing_digest(self) -> str:
        """sha256 of the scene table, hashed into the plan.

        A rerun whose search found other assets for the same scene ids is then refused like
        any changed input.
        """
        return hashlib.sha256(self._table.encode()).hexdigest()

    def write_listing(self, output: str) -> None:
        """Write the scene table the tasks read.

        Called after the plan is checked: a refused rerun must not overwrite the table of the
        ingest already in ``output``.
        """
        from ingest.writer import write_text_atomic

        write_text_atomic(join(output, PARTS, SCENES), self._table)

    def item_bytes(self, item: PairItem) -> int:
        """A patch's bytes in a shard, from the tile size alone (no file is opened)."""
        t = self.cfg.tile_size
        return t * t * (4 * len(S1_BANDS) + 2 * len(S2_L2A_BANDS)) + 2048

    def estimate_bytes(self, item: PairItem) -> int:
        """As :meth:`item_bytes`: every patch of this source has the same size."""
        return self.item_bytes(item)

    # ---------------------------------------------------------------- reading (tasks)

    def _scene(self, s2_id: str) -> Scene:
        if self._scenes is None:
            self._scenes = _read_scenes(self.cfg.output)
        return self._scenes[s2_id]

    def read(self, item: PairItem) -> Iterator[Pair]:
        """Read one patch; raises ``PatchSkipped`` (counted) or ``BadInput`` (quarantined)."""
        from ingest.stac.read import SceneReader

        scene = self._scene(item.file("scene"))
        if self._reader is None:
            self._reader = SceneReader(self.cfg.stac)
        _, cols = scene.patches(self.cfg.tile_size)
        row, col = divmod(item.index, cols)
        yield self._reader.read_patch(scene, row, col, self.cfg.tile_size)

    def close(self) -> None:
        """Close the datasets the reader holds open."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _read_scenes(output: str) -> dict[str, Scene]:
    fs, root = filesystem(output)
    with fs.open(join(root, PARTS, SCENES), "r") as f:
        return {s.s2_id: s for s in (Scene.from_json(line) for line in f if line.strip())}
