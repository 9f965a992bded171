"""Reading GeoTIFFs (local or any fsspec URL) into arrays, with errors that name the file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.io import MemoryFile

from dsl.contracts.storage import is_local, local_path


class BadInput(Exception):
    """One input is unusable; it is quarantined with its file and reason, the run goes on."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@dataclass
class Raster:
    """One raster read into memory, with the georeferencing needed to check pairs align.

    Attributes:
        path: The URL or path it was read from (named in errors).
        data: Pixels [bands, H, W] in the file's dtype.
        crs: The CRS as a string (e.g. ``EPSG:32632``), or None when the file has none.
        transform: The affine geotransform's six coefficients (a, b, c, d, e, f).
        nodata: The file's nodata value, or None.
    """

    path: str
    data: np.ndarray  # [bands, H, W]
    crs: str | None
    transform: tuple[float, ...]  # affine a, b, c, d, e, f
    nodata: float | None

    @property
    def grid(self) -> tuple:
        """(CRS, transform rounded to 1e-9, (H, W)): equal for rasters on the same pixel grid."""
        return (self.crs, tuple(round(v, 9) for v in self.transform), self.data.shape[1:])


def _read(ds, out_shape, resampling, window) -> np.ndarray:
    if out_shape is None:
        return ds.read(window=window)
    return ds.read(out_shape=(ds.count, *out_shape), resampling=resampling, window=window)


def read_raster(
    url: str,
    out_shape: tuple[int, int] | None = None,
    resampling: Resampling = Resampling.bilinear,
    window=None,
) -> Raster:
    """Read all bands of a raster.

    Args:
        url: Local path or fsspec URL.
        out_shape: Resample to this (H, W) (e.g. BigEarthNet 20/60 m bands to the 10 m grid).
        resampling: GDAL resampling used with ``out_shape``.
        window: Optional rasterio window (tiling large rasters).

    Raises:
        BadInput: Missing, unreadable or truncated file.
    """
    try:
        if is_local(url):
            with rasterio.open(local_path(url)) as ds:
                return _raster(url, ds, _read(ds, out_shape, resampling, window), window)
        import fsspec

        with fsspec.open(url, "rb") as f, MemoryFile(f.read()) as mem, mem.open() as ds:
            return _raster(url, ds, _read(ds, out_shape, resampling, window), window)
    except FileNotFoundError:
        raise BadInput(url, "file not found") from None
    except (rasterio.errors.RasterioError, OSError, ValueError) as e:
        raise BadInput(url, f"unreadable or truncated raster ({str(e).splitlines()[0][:200]})") from None


def _raster(url: str, ds, data: np.ndarray, window) -> Raster:
    transform = ds.window_transform(window) if window is not None else ds.transform
    if data.shape[1:] != (ds.height, ds.width) and window is None:
        # resampled: the grid is the output grid
        transform = ds.transform @ ds.transform.scale(ds.width / data.shape[-1], ds.height / data.shape[-2])
    return Raster(
        path=url,
        data=data,
        crs=ds.crs.to_string() if ds.crs else None,
        transform=tuple(transform)[:6],
        nodata=ds.nodata,
    )


def raster_header(url: str) -> Raster:
    """Georeferencing and shape without reading pixels (``data`` is a zero-memory view)."""
    try:
        if is_local(url):
            with rasterio.open(local_path(url)) as ds:
                return _header(url, ds)
        import fsspec

        with fsspec.open(url, "rb") as f, rasterio.open(f) as ds:
            return _header(url, ds)
    except (rasterio.errors.RasterioError, OSError, ValueError) as e:
        raise BadInput(url, f"unreadable raster header ({str(e).splitlines()[0][:200]})") from None


def _header(url: str, ds) -> Raster:
    data = np.broadcast_to(np.zeros((), dtype=ds.dtypes[0]), (ds.count, ds.height, ds.width))
    return _raster(url, ds, data, None)


def raster_shape(url: str) -> tuple[int, int, int, str]:
    """(bands, height, width, dtype) from the header only."""
    r = raster_header(url)
    return (*r.data.shape, str(r.data.dtype))
