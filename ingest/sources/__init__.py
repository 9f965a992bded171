"""Input sources: each lists pair items and reads them into validated pairs."""

from __future__ import annotations

from dsl.contracts.config import IngestConfig
from ingest.sources.base import BadRecord, Pair, PairItem, Source


def get_source(name: str, tile_size: int = 256, cfg: IngestConfig | None = None) -> Source:
    """Return the source named by ``ingest.source``.

    Args:
        name: ``sen12ms``, ``dfc2020``, ``bigearthnet``, ``zarr``, ``table`` (also accepted
            under its former name ``manifest``) or ``stac``.
        tile_size: Tile edge in pixels; the table source, which tiles rasters, uses it.
        cfg: The ingest section; the stac source needs it (search, filters, output).

    Raises:
        ValueError: Unknown source name.
    """
    from ingest.sources.bigearthnet import BigEarthNet
    from ingest.sources.sen12ms import DFC2020, SEN12MS
    from ingest.sources.table import PairTableSource
    from ingest.sources.zarr_source import ZarrSource

    sources = {"sen12ms": SEN12MS, "dfc2020": DFC2020, "bigearthnet": BigEarthNet, "zarr": ZarrSource}
    if name == "stac":
        from ingest.stac.source import StacSource

        if cfg is None:
            raise ValueError("the stac source needs the ingest config (get_source(..., cfg=...))")
        return StacSource(cfg)
    if name in ("table", "manifest"):  # "manifest": the pair table's former name
        return PairTableSource(tile_size)
    if name not in sources:
        raise ValueError(f"unknown source '{name}'; choose one of {sorted([*sources, 'table', 'stac'])}")
    return sources[name]()


__all__ = ["BadRecord", "Pair", "PairItem", "Source", "get_source"]
