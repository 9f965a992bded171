"""Source ``stac``: Sentinel-2 L2A and Sentinel-1 scenes from the archive, as patch pairs.

Listing (in the driver) searches the STAC API, item table or static catalogue named by
``ingest.input`` with ``ingest.stac``'s area, dates and cloud cover, pairs every S2 scene with its
S1 scene (:mod:`ingest.stac.pairing`) and writes the paired scenes to ``_parts/scenes.jsonl``
under the output. Each whole ``tile_size`` patch of an S2 scene's 10 m grid is a sample: key
``<s2 id>_r<row>_c<col>``, location ``<grid>_b<block row>_<block col>`` (the MGRS tile, so
revisits of a place share a location and a split never separates them). Patches are listed in
blocks of ``ingest.stac.block_patches`` x ``block_patches`` of one scene, one item each (only the
scene id and the block number travel with it): a task then opens a scene's COGs, whose headers
cost about as much as a hundred patches' pixels, once per block instead of once per patch, and
the planner's hash order still spreads each scene's blocks over all shards. Items are sized by
their own patch count, so partitions are cut by bytes.

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
from ingest.records import BadRecord, Pair, PairItem, Skipped, check_key
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
        self._listed: dict[str, Scene] = {}  # in the driver, after list()
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
        self._listed = {s.s2_id: s for s in unique}
        k = self.cfg.stac.block_patches
        items, patches = [], 0
        for s in unique:
            rows, cols = s.patches(self.cfg.tile_size)
            patches += rows * cols
            brows, bcols = -(-rows // k), -(-cols // k)
            for br in range(brows):
                for bc in range(bcols):
                    items.append(PairItem(key=check_key(f"{s.s2_id}_b{br}_{bc}"), location=f"{s.grid}_b{br}_{bc}",
                                          files=(("scene", s.s2_id),), index=br * bcols + bc))
        self.counts["scenes"], self.counts["patches"], self.counts["blocks"] = len(unique), patches, len(items)
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

    def patch_bytes(self) -> int:
        """A patch's bytes in a shard (uncompressed), from the tile size alone."""
        t = self.cfg.tile_size
        return t * t * (4 * len(S1_BANDS) + 2 * len(S2_L2A_BANDS)) + 2048

    def item_bytes(self, item: PairItem) -> int:
        """A block's bytes in a shard: its own patch count (edge blocks hold fewer) x a patch's."""
        return len(self._block(item)) * self.patch_bytes()

    def estimate_bytes(self, item: PairItem) -> int:
        """As :meth:`item_bytes` (no file is opened)."""
        return self.item_bytes(item)

    def _block(self, item: PairItem) -> list[tuple[int, int]]:
        """(row, col) of the patches of the item's block, row by row."""
        scene = self._listed[item.file("scene")] if self._listed else self._scene(item.file("scene"))
        rows, cols = scene.patches(self.cfg.tile_size)
        k = self.cfg.stac.block_patches
        br, bc = divmod(item.index, -(-cols // k))
        return [(r, c) for r in range(br * k, min(rows, br * k + k)) for c in range(bc * k, min(cols, bc * k + k))]

    # ---------------------------------------------------------------- reading (tasks)

    def _scene(self, s2_id: str) -> Scene:
        if self._scenes is None:
            self._scenes = _read_scenes(self.cfg.output)
        return self._scenes[s2_id]

    def read(self, item: PairItem) -> Iterator[Pair | Skipped | BadRecord]:
        """Read the block's patches, one outcome each: the pair, or why it is not one.

        A patch the filters refuse comes back as its :class:`Skipped` (counted by reason), an
        unreadable one as a :class:`BadRecord` (quarantined): one bad patch never costs the
        others of its block or scene.
        """
        from ingest.raster import BadInput
        from ingest.stac.read import SceneReader

        scene = self._scene(item.file("scene"))
        if self._reader is None:
            self._reader = SceneReader(self.cfg.stac)
        for row, col in self._block(item):
            try:
                yield self._reader.read_patch(scene, row, col, self.cfg.tile_size)
            except Skipped as e:
                yield e
            except BadInput as e:
                yield BadRecord(f"{scene.s2_id}_r{row}_c{col}", e.file, e.reason)

    def close(self) -> None:
        """Close the datasets the reader holds open."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _read_scenes(output: str) -> dict[str, Scene]:
    fs, root = filesystem(output)
    with fs.open(join(root, PARTS, SCENES), "r") as f:
        return {s.s2_id: s for s in (Scene.from_json(line) for line in f if line.strip())}
