"""What every source provides: a listing of pair items and a reader turning one into pairs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dsl.contracts.shard_format import S1_BANDS
from ingest.raster import BadInput, Raster
from ingest.records import BadRecord, Pair, PairItem, check_key

__all__ = ["BadRecord", "Pair", "PairItem", "Source", "check_key", "check_values", "make_pair"]


class Source:
    """Base class: ``list`` enumerates the input, ``read`` yields the pairs of one item."""

    name = "base"

    def list(self, input_url: str) -> tuple[list[PairItem], list[BadRecord]]:
        """List the pair items under ``input_url``, and the inputs already refused by listing."""
        raise NotImplementedError

    def read(self, item: PairItem) -> Iterator[Pair]:
        """Read and validate one item, yielding its pairs (several when tiled).

        Raises:
            BadInput: The item's files are missing, unreadable or invalid.
        """
        raise NotImplementedError

    def estimate_bytes(self, item: PairItem) -> int:
        """Bytes one item adds to a shard, for sizing partitions (headers only)."""
        raise NotImplementedError

    def item_bytes(self, item: PairItem) -> int | None:
        """Bytes one item adds to a shard, if known without reading anything (its listing's metadata).

        When a source sizes every item this way, partitions are cut by each item's own bytes
        (scene-sized and patch-sized items then make shards of the same size); the default, None,
        sizes all partitions alike from :meth:`estimate_bytes` of the first readable item. It
        must be cheap (the planner calls it for every item, in the driver) and a pure function
        of the item (a resumed run must plan the same partitions).
        """
        return None


def s1_array(r: Raster) -> np.ndarray:
    """Return a raster's pixels as float32 S1 (VV, VH in dB).

    Raises:
        BadInput: Not two bands, or not floating point.
    """
    if r.data.shape[0] != len(S1_BANDS):
        raise BadInput(r.path, f"wrong band count: expected 2 (VV, VH), found {r.data.shape[0]}")
    if not np.issubdtype(r.data.dtype, np.floating):
        raise BadInput(r.path, f"S1 must be float backscatter in dB, found dtype {r.data.dtype}")
    return r.data.astype(np.float32, copy=False)


def s2_array(r: Raster, bands: tuple[str, ...]) -> np.ndarray:
    """Return a raster's pixels as uint16 S2 reflectance x 10000.

    Integer data of another dtype is converted when every value fits in uint16.

    Raises:
        BadInput: The band count differs from ``bands``, or the values are not uint16-able.
    """
    if r.data.shape[0] != len(bands):
        raise BadInput(r.path, f"wrong band count: expected {len(bands)} ({bands[0]}..{bands[-1]}), found {r.data.shape[0]}")
    if r.data.dtype != np.uint16:
        if not np.issubdtype(r.data.dtype, np.integer) or r.data.min() < 0 or r.data.max() > 65535:
            raise BadInput(r.path, f"S2 must be reflectance x 10000 as uint16, found dtype {r.data.dtype}")
        return r.data.astype(np.uint16)
    return r.data


def check_values(path: str, data: np.ndarray, nodata: float | None) -> None:
    """NaN/inf anywhere or nothing but nodata makes a patch unusable."""
    # one reduction first (no temporaries): the exact count only for the rare bad patch
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data.sum(dtype=np.float64)):
        raise BadInput(path, f"{int(np.count_nonzero(~np.isfinite(data)))} NaN/inf values")
    fill = 0 if nodata is None or not np.isfinite(nodata) else nodata
    if data.min() == fill and data.max() == fill:
        raise BadInput(path, f"all-nodata patch (every pixel is {fill:g})")


def check_grids(a: Raster, b: Raster, shape_b: tuple[int, ...] | None = None) -> None:
    """Co-located means same CRS, geotransform and size."""
    if a.grid != b.grid:
        raise BadInput(
            b.path,
            f"grid mismatch with partner {a.path}: CRS {b.crs} vs {a.crs}, "
            f"transform {b.transform} vs {a.transform}, size {b.data.shape[1:]} vs {a.data.shape[1:]}",
        )


def raster_meta(r: Raster) -> dict:
    """Return a raster's georeferencing (CRS, transform, height, width) as JSON-ready metadata."""
    return {"crs": r.crs, "transform": list(r.transform), "height": int(r.data.shape[1]), "width": int(r.data.shape[2])}


def make_pair(key: str, location: str, s1: Raster, s2: Raster, s2_bands: tuple[str, ...], meta: dict) -> Pair:
    """Validate a co-located raster pair and turn it into a Pair (raises BadInput)."""
    s1_data = s1_array(s1)
    s2_data = s2_array(s2, s2_bands)
    check_grids(s1, s2)
    check_values(s1.path, s1_data, s1.nodata)
    check_values(s2.path, s2_data, s2.nodata)
    meta = {
        **meta,
        "key": key,
        "location": location,
        **raster_meta(s1),
        "s1_bands": list(S1_BANDS),
        "s2_bands": list(s2_bands),
        "s1_file": s1.path,
        "s2_file": s2.path,
    }
    return Pair(key=key, location=location, s1=s1_data, s2=s2_data, meta=meta)
