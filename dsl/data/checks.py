"""Checks of a job's settings against its dataset, run in the driver before any worker starts."""

from __future__ import annotations

from dsl.contracts.config import ConfigError, DataConfig
from dsl.contracts.manifest import Manifest


def stored_patch_edge(manifest: Manifest) -> tuple[int, str] | None:
    """(the largest edge every stored patch has, where that comes from), or None if unknown.

    ``patch_min`` ([H, W] of the smallest sample, when the ingest recorded it) is exact;
    else the ingest's ``tile_size`` bounds every tile from above (smaller samples are kept
    whole, so a crop within it can still fail on one of them, in the loader).
    """
    low = manifest.patch_min
    if isinstance(low, list) and len(low) == 2 and all(isinstance(v, int) and v > 0 for v in low):
        return min(low), f"the smallest stored patch is {low[0]}x{low[1]}"
    tile = (manifest.options or {}).get("tile_size")
    if isinstance(tile, int) and not isinstance(tile, bool) and tile > 0:
        return tile, f"the dataset was cut into tiles of {tile}x{tile} (ingest.tile_size)"
    return None


def check_crop(cfg: DataConfig, manifest: Manifest) -> None:
    """Refuse a crop larger than the stored patches before any worker starts.

    Raises:
        ConfigError: ``data.crop_size`` exceeds what the manifest says every patch has.
    """
    known = stored_patch_edge(manifest)
    if known and cfg.crop_size > known[0]:
        raise ConfigError(f"data.crop_size {cfg.crop_size} is larger than the patches of {cfg.shards}: "
                          f"{known[1]}; use data.crop_size <= {known[0]}")
