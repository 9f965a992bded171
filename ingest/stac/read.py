"""Reading one patch of a paired S1/S2 scene from its COGs: windowed range reads, S1 warped onto S2.

A :class:`SceneReader` lives in one Ray task and reads any number of patches of any scenes. A
patch (row, col) of ``tile`` px lies on the S2 scene's 10 m grid:

- S2: the 10 m bands are read by their window; the 20 m and 60 m bands from the matching
  (fractional) window of their own grid, resampled to tile x tile bilinearly (reflectance varies
  smoothly; nearest would put 2 x 2 and 6 x 6 blocks into every patch). The L2A offset is
  removed as Planetary Computer's harmonisation does it: ``max(DN + s2_offset, 0)``.
- SCL (20 m): read nearest-neighbour (classes cannot be interpolated); a patch with more than
  ``max_scl_fraction`` of its pixels in ``scl_skip`` classes is skipped as ``"cloud"`` before any
  band is read.
- S1: VV and VH warped through a ``WarpedVRT`` onto exactly the patch's grid (CRS, transform,
  tile x tile), bilinearly, source nodata (or NaN) -> NaN; linear power is warped as power and
  converted to dB after (averaging power is the physical mean), dB assets are warped as they are.
  The values are checked against the declared units (see :func:`check_units`).

Skips raise :class:`PatchSkipped` with a stable reason (:data:`REASONS`); unreadable or
mis-declared inputs raise ``ingest.raster.BadInput`` naming the asset; the caller decides per
patch, so one bad patch never drops its scene. Transient errors are retried (see
``ingest.gdal_env``).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from dsl.contracts.config import StacConfig
from dsl.contracts.shard_format import S1_BANDS
from ingest.raster import BadInput, OpenRasters, RetryPolicy
from ingest.records import Pair, Skipped, check_key
from ingest.stac.scene import Scene

# PatchSkipped reasons, stable codes the manifest counts by
CLOUD, S1_NODATA, S2_NODATA = "cloud", "s1_nodata", "s2_nodata"
REASONS = (CLOUD, S1_NODATA, S2_NODATA)
# A dB asset's patch with every value >= 0 dB (and a median above 0) is linear power: real
# backscatter in dB is mostly -25..-5 and never all above 0 dB over a patch. Converted values
# with a median outside this range are not backscatter in dB at all (wrong scaling).
DB_RANGE = (-50.0, 30.0)


class PatchSkipped(Skipped):
    """A patch left out by a filter (not an error): ``reason`` is one of :data:`REASONS`."""


# datasets a reader keeps open: a block's 15 (12 S2 bands, SCL, VV, VH) and the next block's
OPEN_ASSETS = 32


def patch_transform(scene: Scene, row: int, col: int, tile: int) -> Affine:
    """The geotransform of patch (row, col) on the scene's 10 m grid."""
    return Affine(*scene.transform) @ Affine.translation(col * tile, row * tile)


def check_units(href: str, units: str, data: np.ndarray) -> None:
    """Refuse backscatter whose values contradict its declared units (linear read as dB ...).

    Args:
        href: The asset (named in the error).
        units: ``linear`` or ``db``, as declared for the collection.
        data: The patch's values before any conversion (NaN = nodata).

    Raises:
        BadInput: A ``linear`` asset with negative values, or a ``db`` asset whose values are all
            >= 0 with a median above 0 dB.
    """
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return
    lo = float(finite.min())
    if units == "linear" and lo < 0:
        raise BadInput(href, f"declared linear power but has negative values (min {lo:.3g}): looks like dB")
    if units == "db" and lo >= 0 and float(np.median(finite)) > 0:
        raise BadInput(href, f"declared dB but every value is >= 0 (median {float(np.median(finite)):.3g}): "
                       "looks like linear power")


class SceneReader:
    """Reads patches of scenes, one reader per Ray task; a context manager (or call :meth:`close`).

    Every asset is opened once per reader and kept open (the ingest's
    :class:`ingest.raster.OpenRasters`, GDAL settings of :func:`ingest.gdal_env.gdal_options`),
    so a COG's header is fetched once however many patches of its block are read from it.

    Args:
        cfg: ``ingest.stac`` settings (filters, retries).
        sleep: Waits between retries (tests may pass a recorder).

    Attributes:
        rasters: The open datasets (:class:`ingest.raster.OpenRasters`).
    """

    def __init__(self, cfg: StacConfig | None = None, sleep: Callable[[float], Any] = time.sleep):
        self.cfg = cfg or StacConfig()
        # the datasets, their GDAL settings and the retries are the ingest's shared ones
        # (ingest.raster.OpenRasters); a block reads 15 files at once, so more stay open
        self.rasters = OpenRasters(RetryPolicy(retries=self.cfg.retries, backoff_s=self.cfg.retry_backoff_s,
                                               gdal_retries=self.cfg.retries), sleep=sleep, max_open=OPEN_ASSETS)
        self._grids: dict[str, tuple[Affine, int, int]] = {}  # href -> (inverse transform, width, height)

    @property
    def opens(self) -> Counter[str]:
        """Href -> times opened (1 unless a transient error forced a reopen)."""
        return self.rasters.opens

    @property
    def retried(self) -> Counter[str]:
        """Href -> transient errors retried."""
        return self.rasters.retried

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open dataset."""
        self.rasters.close()

    def _read(self, href: str, what: Callable[[Any], Any]) -> Any:
        """``what(dataset)`` with the asset opened once, transient errors retried, others BadInput."""
        return self.rasters.call(href, what)

    # -- the patch --------------------------------------------------------------------------
    def read_patch(self, scene: Scene, row: int, col: int, tile: int) -> Pair:
        """Read patch (row, col) of ``tile`` px of a scene's S2 10 m grid, with S1 warped onto it.

        Returns:
            The pair: S1 float32 [2, tile, tile] dB (finite), S2 uint16 [bands, tile, tile]
            offset removed, in ``scene.s2_assets`` order.

        Raises:
            PatchSkipped: A filter left the patch out (reason in :data:`REASONS`).
            BadInput: An asset is unreadable (after retries of transient errors), off the
                scene's grid, or contradicts its declared units.
            ValueError: (row, col) is not a whole patch of the scene.
        """
        rows, cols = scene.patches(tile)
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(f"patch ({row}, {col}) of {tile} px is outside scene {scene.s2_id} ({rows} x {cols} patches)")
        key = check_key(f"{scene.s2_id}_r{row}_c{col}")
        transform = patch_transform(scene, row, col, tile)
        scl_fraction = self._scl(scene, transform, tile)
        s1 = self._s1(scene, transform, tile)
        s2 = self._s2(scene, transform, tile)
        location = f"{scene.grid}_r{row}_c{col}"
        meta = {
            "source": "stac", "key": key, "location": location,
            "s2_id": scene.s2_id, "s1_id": scene.s1_id, "s1_collection": scene.s1_collection, "s2_datetime": scene.s2_datetime,
            "s1_datetime": scene.s1_datetime, "gap_days": scene.gap_days, "crs": scene.crs,
            "transform": list(transform)[:6], "height": tile, "width": tile, "s1_bands": list(S1_BANDS),
            "s2_bands": list(scene.s2_assets), "s2_offset": scene.s2_offset, "s1_units": scene.s1_units,
            "scl_fraction": scl_fraction, "tile": [row, col], "tile_size": tile,
            # space-separated hrefs, as the BigEarthNet source names its per-band files
            "s1_file": " ".join(scene.s1_assets[p] for p in S1_BANDS), "s2_file": " ".join(scene.s2_assets.values()),
        }
        return Pair(key=key, location=location, s1=s1, s2=s2, meta=meta)

    def _window(self, href: str, ds, scene: Scene, transform: Affine, tile: int) -> Window:
        """The patch's (possibly fractional) window on an asset's own grid."""
        grid = self._grids.get(href)
        if grid is None:  # checked once per asset: CRS strings and inverse transforms are not free
            if ds.crs is None or ds.crs.to_string() != scene.crs:
                raise BadInput(href, f"CRS {ds.crs} differs from the scene's grid {scene.crs}")
            if ds.transform.b or ds.transform.d:
                raise BadInput(href, f"rotated geotransform {tuple(ds.transform)[:6]}: expected north-up")
            grid = self._grids[href] = (~ds.transform, ds.width, ds.height)
        inverse, width, height = grid
        col0, row0 = inverse @ (transform.c, transform.f)
        col1, row1 = inverse @ (transform.c + tile * transform.a, transform.f + tile * transform.e)
        eps = 1e-6
        if col0 < -eps or row0 < -eps or col1 > width + eps or row1 > height + eps:
            raise BadInput(href, f"patch {tile} px at {transform.c, transform.f} lies outside the raster "
                           f"({width} x {height} px)")
        return Window(col0, row0, col1 - col0, row1 - row0)

    def _band(self, href: str, scene: Scene, transform: Affine, tile: int, resampling: Resampling) -> tuple[np.ndarray, float]:
        """One band's patch on the 10 m grid (a plain window read when the grids coincide)."""

        def read(ds) -> tuple[np.ndarray, float]:
            w = self._window(href, ds, scene, transform, tile)
            snapped = w.round_offsets().round_lengths()
            on_grid = (abs(w.width - tile) < 1e-6 and abs(w.height - tile) < 1e-6
                       and abs(w.col_off - snapped.col_off) < 1e-6 and abs(w.row_off - snapped.row_off) < 1e-6)
            if on_grid:
                data = ds.read(1, window=snapped)
            else:
                data = ds.read(1, window=w, out_shape=(tile, tile), resampling=resampling)
            return data, ds.nodata

        return self._read(href, read)

    def _scl(self, scene: Scene, transform: Affine, tile: int) -> float | None:
        if scene.scl is None:
            return None
        scl, _ = self._band(scene.scl, scene, transform, tile, Resampling.nearest)
        fraction = float(np.isin(scl, self.cfg.scl_skip).mean())
        if fraction > self.cfg.max_scl_fraction:
            raise PatchSkipped(CLOUD, f"{fraction:.1%} of the pixels in SCL classes {self.cfg.scl_skip}")
        return fraction

    def _s2(self, scene: Scene, transform: Affine, tile: int) -> np.ndarray:
        out = np.empty((len(scene.s2_assets), tile, tile), dtype=np.uint16)
        nodata = np.zeros((tile, tile), dtype=bool)
        for i, (band, href) in enumerate(scene.s2_assets.items()):
            data, fill = self._band(href, scene, transform, tile, Resampling.bilinear)
            if not np.issubdtype(data.dtype, np.integer):
                raise BadInput(href, f"S2 band {band} must be integer digital numbers, found {data.dtype}")
            nodata |= data == (0 if fill is None or not math.isfinite(fill) else fill)
            # the offset in int32: DN + (-1000) may be negative, clipped at 0 as harmonisation does
            out[i] = np.clip(data.astype(np.int32) + int(round(scene.s2_offset)), 0, 65535)
        fraction = float(nodata.mean())
        if fraction > self.cfg.max_nodata_fraction or fraction == 1.0:
            raise PatchSkipped(S2_NODATA, f"{fraction:.1%} of the pixels are nodata")
        out[:, nodata] = 0
        return out

    def _s1(self, scene: Scene, transform: Affine, tile: int) -> np.ndarray:
        if scene.s1_units not in ("linear", "db"):
            raise BadInput(scene.s1_id, f"s1_units {scene.s1_units!r}: expected 'linear' or 'db'")
        out = np.empty((len(S1_BANDS), tile, tile), dtype=np.float32)
        for i, pol in enumerate(S1_BANDS):
            href = scene.s1_assets.get(pol)
            if href is None:
                raise BadInput(scene.s1_id, f"no {pol} asset")

            def warp(ds, href: str = href) -> np.ndarray:
                if ds.crs is None:
                    raise BadInput(href, "no CRS: cannot warp onto the S2 grid")
                src_nodata = ds.nodata if ds.nodata is not None else (np.nan if ds.dtypes[0].startswith("float") else None)
                with WarpedVRT(ds, crs=scene.crs, transform=transform, width=tile, height=tile,
                               resampling=Resampling.bilinear, src_nodata=src_nodata, nodata=np.nan,
                               dtype="float32", init_dest_nodata=True) as vrt:
                    return vrt.read(1)

            data = self._read(href, warp)
            check_units(href, scene.s1_units, data)
            if scene.s1_units == "linear":
                with np.errstate(divide="ignore", invalid="ignore"):
                    # power 0 has no dB value: nodata, as outside the footprint
                    data = np.where(data > 0, 10 * np.log10(data), np.nan).astype(np.float32)
            finite = data[np.isfinite(data)]
            if finite.size:
                median = float(np.median(finite))
                if not DB_RANGE[0] < median < DB_RANGE[1]:
                    raise BadInput(href, f"median {median:.1f} dB outside {DB_RANGE[0]:g}..{DB_RANGE[1]:g} dB: "
                                   f"not {scene.s1_units} backscatter (wrong units or scaling)")
            out[i] = data
        nodata = ~np.isfinite(out).all(axis=0)
        fraction = float(nodata.mean())
        if fraction > self.cfg.max_nodata_fraction or fraction == 1.0:
            raise PatchSkipped(S1_NODATA, f"{fraction:.1%} of the pixels outside the S1 footprint or nodata")
        if fraction:
            for i in range(len(S1_BANDS)):
                band = out[i]
                band[nodata] = np.median(band[~nodata])
        return out
