"""Cutting a source's pairs into ``ingest.tile_size`` tiles, for every source alike.

A reader that trains on 128-px crops but must fetch a whole 256-px sample moves four times the
bytes it uses; stored as 128-px tiles, each crop reads one sample. The table source already
reads its rasters tile by tile (so its pairs arrive at the tile size and pass through here
unchanged); SEN12MS, DFC2020 and zarr pairs are cut here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsl.contracts.shard_format import dfc_targets
from ingest.raster import BadInput
from ingest.sources.base import Pair, check_key


def _check_tile(path: str, tile: np.ndarray) -> None:
    """A tile of nothing but zeros (the fill where rasters carry no nodata value) is unusable."""
    if tile.min() == 0 and tile.max() == 0:
        raise BadInput(path, "all-nodata tile (every pixel is 0)")


def tile_pair(pair: Pair, size: int) -> list[Pair]:
    """Cut a pair into non-overlapping ``size`` x ``size`` tiles, row by row.

    Tiles are keyed ``<key>_r<row>_c<col>`` (the table source's naming) and keep the pair's
    location, so a train/val split never separates the tiles of one patch. Each tile's metadata
    has its own geotransform, height, width, ``tile`` [row, col] and ``tile_size``; a labelled
    pair's tiles get their own DFC mask and single-/multi-label targets. Edges that do not fill a
    tile are dropped. A pair no larger than one tile (or smaller than one in either direction)
    is returned whole, as before tiling existed.

    Raises:
        BadInput: A tile is all zeros in S1 or S2: all tiles of the pair or none are written,
            as for the table source.
    """
    h, w = pair.s1.shape[1:]
    if h < size or w < size or (h, w) == (size, size):
        return [pair]
    a, b, c, d, e, f = pair.meta["transform"][:6]
    tiles = []
    for r in range(h // size):
        for col in range(w // size):
            y, x = r * size, col * size
            s1, s2 = pair.s1[:, y : y + size, x : x + size], pair.s2[:, y : y + size, x : x + size]
            _check_tile(pair.meta.get("s1_file", pair.key), s1)
            _check_tile(pair.meta.get("s2_file", pair.key), s2)
            key = check_key(f"{pair.key}_r{r}_c{col}")
            meta = {
                **pair.meta,
                "key": key,
                "height": size,
                "width": size,
                # the tile's upper-left pixel (x, y) maps to (a*x + b*y + c, d*x + e*y + f)
                "transform": [a, b, a * x + b * y + c, d, e, d * x + e * y + f],
                "tile": [r, col],
                "tile_size": size,
            }
            tile = dataclasses.replace(pair, key=key, s1=s1, s2=s2, meta=meta)
            if pair.dfc is not None:
                tile.dfc = pair.dfc[y : y + size, x : x + size]
                single, multi = dfc_targets(tile.dfc)
                tile.extra = {**pair.extra, "cls": single, "multi": multi}
                meta.update(label=single, multilabel=multi.tolist())
            tiles.append(tile)
    return tiles
