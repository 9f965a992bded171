"""Input sources: each lists pair items and reads them into validated pairs."""

from __future__ import annotations

from ingest.sources.base import BadRecord, Pair, PairItem, Source


def get_source(name: str, tile_size: int = 256) -> Source:
    from ingest.sources.bigearthnet import BigEarthNet
    from ingest.sources.manifest import ManifestSource
    from ingest.sources.sen12ms import DFC2020, SEN12MS
    from ingest.sources.zarr_source import ZarrSource

    sources = {"sen12ms": SEN12MS, "dfc2020": DFC2020, "bigearthnet": BigEarthNet, "zarr": ZarrSource}
    if name == "manifest":
        return ManifestSource(tile_size)
    if name not in sources:
        raise ValueError(f"unknown source '{name}'; choose one of {sorted([*sources, 'manifest'])}")
    return sources[name]()


__all__ = ["BadRecord", "Pair", "PairItem", "Source", "get_source"]
