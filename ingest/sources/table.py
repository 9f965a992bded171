"""Source ``table``: a CSV or Parquet pair table of raster URLs.

The columns are s1, s2 and optionally id, location, label. ``manifest`` is the source's former
name, still accepted; DSL's ``manifest.json`` is something else (the shard index a dataset's
readers start from).

Rasters larger than the tile size are cut into non-overlapping tiles (512 -> four 256; edges
that do not fill a tile are dropped). Each pair must share CRS and grid.

A source reads one partition (``ingest.run.write_partition``, which calls :meth:`close` at its
end): each raster is opened once for all its tiles, and a remote one (``s3://``, ``http(s)://``)
is read by the byte ranges of each tile's blocks (:mod:`ingest.raster`), so the bytes fetched
for all tiles are about the file's size, not the file once per tile.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pandas as pd
from rasterio.windows import Window

from dsl.contracts.shard_format import S2_L1C_BANDS, S2_L2A_BANDS
from ingest.raster import BadInput, OpenRasters, RetryPolicy, raster_shape
from ingest.sources.base import BadRecord, Pair, PairItem, Source, check_key, make_pair

COLUMNS = ("s1", "s2", "id", "location", "label")


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


class PairTableSource(Source):
    """Pairs listed row by row in a table of raster URLs, cut into ``tile_size`` tiles.

    Args:
        tile_size: Edge of the square tiles, in pixels.
        retry: Retries of transient errors of remote reads (default ``ingest.raster.RETRY``).
        sleep: Waits between retries (tests pass a recorder).
    """

    name = "table"

    def __init__(self, tile_size: int = 256, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], Any] = time.sleep):
        self.tile_size = tile_size
        self.retry = retry
        self.sleep = sleep
        self._rasters: OpenRasters | None = None  # built on first read: the driver's listing opens nothing

    @property
    def rasters(self) -> OpenRasters:
        """The rasters this source holds open (``opens`` counts each URL's opens)."""
        if self._rasters is None:
            self._rasters = OpenRasters(self.retry, self.sleep)
        return self._rasters

    def close(self) -> None:
        """Close the rasters held open (the end of a partition)."""
        if self._rasters is not None:
            self._rasters.close()

    def list(self, input_url: str) -> tuple[list[PairItem], list[BadRecord]]:
        """Read the table: one item per row, keyed by ``id`` or the S1 file's stem.

        Rows with an empty s1 or s2 cell, or a repeated key, are returned as bad records.

        Raises:
            ValueError: The table has no ``s1`` or no ``s2`` column.
        """
        parquet = input_url.endswith((".parquet", ".pq"))
        try:
            with fsspec.open(input_url, "rb") as f:
                # only the columns used: a wide table costs no more memory than a narrow one
                table = pd.read_parquet(f) if parquet else pd.read_csv(f, dtype=str, usecols=lambda c: c in COLUMNS)
        except (ValueError, pd.errors.ParserError) as e:  # UnicodeDecodeError, ArrowInvalid are ValueErrors
            kind = "Parquet" if parquet else "CSV"
            raise ValueError(f"{input_url}: not a readable {kind} pair table ({str(e).splitlines()[0][:200]})") from None
        for col in ("s1", "s2"):
            if col not in table.columns:
                raise ValueError(f"{input_url}: pair table has no '{col}' column (it needs s1 and s2; "
                                 "id, location, label are optional)")
        table = table[[c for c in COLUMNS if c in table.columns]]
        items, bad, seen = [], [], set()
        # column-wise, not to_dict("records"): a million-row table lists in seconds, not a minute
        columns = {c: table[c].tolist() for c in table.columns}
        for row in range(len(table)):
            rec = {c: v[row] for c, v in columns.items()}
            s1, s2 = rec.get("s1"), rec.get("s2")
            key = _clean(str(rec.get("id") or str(s1).rsplit("/", 1)[-1].rsplit(".", 1)[0]))
            if not isinstance(s1, str) or not isinstance(s2, str) or not s1 or not s2:
                bad.append(BadRecord(key, f"{input_url}:row {row + 2}", "missing partner: empty s1 or s2 column"))
                continue
            if key in seen:
                bad.append(BadRecord(key, f"{input_url}:row {row + 2}", "duplicate id"))
                continue
            seen.add(key)
            files = [("s1", s1), ("s2", s2)]
            if rec.get("label") is not None and str(rec.get("label")) != "nan":
                files.append(("label", str(rec["label"])))
            items.append(PairItem(key=check_key(key), location=_clean(str(rec.get("location") or key)), files=tuple(files)))
        return sorted(items, key=lambda it: it.key), bad

    def estimate_bytes(self, item: PairItem) -> int:
        """Estimate from the headers: whole tiles of float32 S1 plus uint16 S2 bands."""
        b1, h, w, _ = raster_shape(item.file("s1"))
        b2, _, _, _ = raster_shape(item.file("s2"))
        tiles = max(1, (h // self.tile_size) * (w // self.tile_size))
        return tiles * (self.tile_size**2 * (4 * b1 + 2 * b2) + 2048)

    def read(self, item: PairItem) -> Iterator[Pair]:
        """Yield one pair per whole tile, keyed ``<key>_r<row>_c<col>`` (plain ``<key>`` if one).

        Raises:
            BadInput: The rasters differ in size or are smaller than one tile.
        """
        s1_url, s2_url = item.file("s1"), item.file("s2")
        rasters = self.rasters  # each raster opened once for all its tiles, until close()
        b1, h, w, _ = rasters.shape(s1_url)
        b2, h2, w2, _ = rasters.shape(s2_url)
        if (h, w) != (h2, w2):
            raise BadInput(s2_url, f"grid mismatch with partner {s1_url}: size {(h2, w2)} vs {(h, w)}")
        t = self.tile_size
        bands = S2_L1C_BANDS if b2 == 13 else S2_L2A_BANDS
        if h < t or w < t:
            raise BadInput(s1_url, f"raster {h}x{w} is smaller than the tile size {t}")
        for r in range(h // t):
            for c in range(w // t):
                win = Window(c * t, r * t, t, t)
                key = item.key if (h, w) == (t, t) else f"{item.key}_r{r}_c{c}"
                meta = {"source": self.name, "tile": [r, c], "tile_size": t, "label": item.file("label")}
                yield make_pair(key, item.location, rasters.read(s1_url, window=win), rasters.read(s2_url, window=win),
                                bands, meta)
