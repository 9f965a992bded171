"""A zarr group of co-registered arrays (local or any fsspec URL).

Expected layout::

    <group>/s1    float32 [N, 2, H, W]   VV, VH in dB
    <group>/s2    uint16  [N, C, H, W]   reflectance x 10000
    <group>/ids   str     [N]            optional; default zarr_<index>
    attrs: s2_bands (list of names, default L1C 13 / L2A 12 by C), crs, date (optional)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import zarr

from dsl.contracts.shard_format import S2_L1C_BANDS, S2_L2A_BANDS
from ingest.raster import BadInput, Raster
from ingest.sources.base import BadRecord, Pair, PairItem, Source, check_key, make_pair


def _open(url: str):
    try:
        return zarr.open_group(url, mode="r")
    except Exception as e:  # zarr raises several types for a missing/invalid store
        raise FileNotFoundError(f"{url}: not a readable zarr group ({e})") from None


def _bands(group, channels: int) -> tuple[str, ...]:
    names = group.attrs.get("s2_bands")
    if names:
        return tuple(names)
    return S2_L1C_BANDS if channels == 13 else S2_L2A_BANDS


class ZarrSource(Source):
    """Pairs stored as rows of the ``s1``/``s2`` arrays of one zarr group (layout above)."""

    name = "zarr"

    def list(self, input_url: str) -> tuple[list[PairItem], list[BadRecord]]:
        """List one item per row, keyed by ``ids`` (or ``zarr_<index>``); each key is its location.

        Raises:
            FileNotFoundError: ``input_url`` is not a readable zarr group.
            ValueError: The ``s1`` or ``s2`` array is missing, or their row counts differ.
        """
        group = _open(input_url)
        for name in ("s1", "s2"):
            if name not in group:
                raise ValueError(f"{input_url}: zarr group has no '{name}' array (see ingest/sources/zarr_source.py)")
        n1, n2 = group["s1"].shape[0], group["s2"].shape[0]
        if n1 != n2:
            raise ValueError(f"{input_url}: s1 has {n1} rows but s2 has {n2}")
        ids = [str(i) for i in group["ids"][:]] if "ids" in group else [f"zarr_{i:08d}" for i in range(n1)]
        items = [
            PairItem(key=check_key(k), location=k, files=(("group", input_url),), index=i)
            for i, k in enumerate(ids)
        ]
        return sorted(items, key=lambda it: it.key), []

    def estimate_bytes(self, item: PairItem) -> int:
        """Estimate from the array shapes: one float32 S1 row plus one uint16 S2 row."""
        g = _open(item.file("group"))
        return int(np.prod(g["s1"].shape[1:])) * 4 + int(np.prod(g["s2"].shape[1:])) * 2 + 1024

    def read(self, item: PairItem) -> Iterator[Pair]:
        """Read the item's row of both arrays, georeferenced by the group's attributes."""
        url = item.file("group")
        g = _open(url)
        i = item.index
        where = f"{url}[{i}]"
        try:
            s1, s2 = np.asarray(g["s1"][i]), np.asarray(g["s2"][i])
        except Exception as e:
            raise BadInput(where, f"unreadable row ({e})") from None
        crs = g.attrs.get("crs")
        transform = tuple(g.attrs.get("transform", (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)))
        meta = {"source": self.name, "row": i, "date": g.attrs.get("date")}
        yield make_pair(
            item.key,
            item.location,
            Raster(f"{url}/s1[{i}]", s1, crs, transform, None),
            Raster(f"{url}/s2[{i}]", s2, crs, transform, None),
            _bands(g, s2.shape[0]),
            meta,
        )
