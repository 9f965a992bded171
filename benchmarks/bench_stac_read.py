"""STAC patch reading: patches/s of one SceneReader against a plain rasterio loop over the same windows.

    python benchmarks/bench_stac_read.py [--repeat 8] [--block 256] [--tile 120] [--rounds 3]

Prints one JSON object. The scene is tests/fixtures/stac_scenes.py's: the real BigEarthNet-MM
pair mirrored ``repeat`` x ``repeat`` times (960 x 960 px at 10 m by default), 12 S2 band COGs
at 10/20/60 m, SCL, S1 VV/VH in EPSG:4326 at ~20 m, DEFLATE, ``block`` px tiles. LOCAL FILES
(page cache warm): this measures decoding, resampling, warping and the checks, not the network;
remote reads are bounded by latency and bandwidth instead (see bytes_per_patch in the S3 tests).

Two limits, timed in the same run (rounds interleaved, best of each kept); every patch is kept
(filters off) so all read the same:

- ``plain``: the simplest loop that reads the same windows: every asset opened once, each 10 m
  band's window read as it is, each 20/60 m band's and the SCL's matching window read at its
  native resolution (no resampling), the S1 window covering the patch read in its own CRS (no
  warp). ratio = reader / plain: the cost of resampling, warping and the checks together.
- ``same_ops``: the same rasterio calls the reader makes (20/60 m bilinear and SCL nearest to
  tile x tile, S1 through a WarpedVRT onto the patch grid), nothing else. ratio_same_ops =
  reader / same_ops: the reader's own overhead (offset, masks, units checks, dB, fills).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

# This folder holds a file named like the `ingest` package; keep it off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import rasterio  # noqa: E402
from rasterio.warp import transform_bounds  # noqa: E402
from rasterio.windows import from_bounds  # noqa: E402


def plain(scene, patches, tile) -> float:
    """Patches/s of the plain loop (see the module docstring)."""
    from ingest.stac.read import patch_transform

    hrefs = [*scene.s2_assets.values(), scene.scl, *scene.s1_assets.values()]
    t0 = time.perf_counter()
    datasets = {h: rasterio.open(h) for h in hrefs}
    try:
        for row, col in patches:
            t = patch_transform(scene, row, col, tile)
            bounds = (t.c, t.f + tile * t.e, t.c + tile * t.a, t.f)
            for h in hrefs:
                ds = datasets[h]
                b = bounds if ds.crs.to_string() == scene.crs else transform_bounds(scene.crs, ds.crs, *bounds)
                ds.read(1, window=from_bounds(*b, ds.transform).round_offsets().round_lengths())
    finally:
        for ds in datasets.values():
            ds.close()
    return len(patches) / (time.perf_counter() - t0)


def same_ops(scene, patches, tile) -> float:
    """Patches/s of the reader's rasterio calls alone (see the module docstring)."""
    import numpy as np
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    from ingest.stac.read import patch_transform

    s2 = [*scene.s2_assets.values(), scene.scl]
    t0 = time.perf_counter()
    datasets = {h: rasterio.open(h) for h in [*s2, *scene.s1_assets.values()]}
    try:
        for row, col in patches:
            t = patch_transform(scene, row, col, tile)
            bounds = (t.c, t.f + tile * t.e, t.c + tile * t.a, t.f)
            for h in s2:
                ds = datasets[h]
                w = from_bounds(*bounds, ds.transform)
                if ds.res[0] == t.a:
                    ds.read(1, window=w.round_offsets().round_lengths())
                else:
                    ds.read(1, window=w, out_shape=(tile, tile),
                            resampling=Resampling.nearest if h == scene.scl else Resampling.bilinear)
            for h in scene.s1_assets.values():
                with WarpedVRT(datasets[h], crs=scene.crs, transform=t, width=tile, height=tile,
                               resampling=Resampling.bilinear, nodata=np.nan, dtype="float32") as vrt:
                    vrt.read(1)
    finally:
        for ds in datasets.values():
            ds.close()
    return len(patches) / (time.perf_counter() - t0)


def reader(scene, patches, tile) -> float:
    """Patches/s of one SceneReader (opened inside the timing, as a Ray task would)."""
    from dsl.contracts.config import StacConfig
    from ingest.stac.read import SceneReader

    t0 = time.perf_counter()
    with SceneReader(StacConfig(max_scl_fraction=1.0, max_nodata_fraction=1.0)) as r:
        for row, col in patches:
            r.read_patch(scene, row, col, tile)
    return len(patches) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=8)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--tile", type=int, default=120)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from fixtures.stac_scenes import build_scene

    tmp = Path(tempfile.mkdtemp(prefix="dsl-bench-stac-"))
    try:
        files = build_scene(tmp / "scene", repeat=args.repeat, block=args.block)
        scene = files.scene
        rows, cols = scene.patches(args.tile)
        # the fully-outside-the-footprint corner has no S1 to read: left out of both loops
        patches = [(r, c) for r in range(rows) for c in range(cols)
                   if files.s1_nodata_fraction(args.tile, r, c) < 1.0]
        plain(scene, patches, args.tile)  # warm the page cache
        # timings on a shared machine swing run to run: interleave the variants, keep each best
        best_plain = best_same = best_reader = 0.0
        for _ in range(args.rounds):
            best_plain = max(best_plain, plain(scene, patches, args.tile))
            best_same = max(best_same, same_ops(scene, patches, args.tile))
            best_reader = max(best_reader, reader(scene, patches, args.tile))
        print(json.dumps({
            "what": "patches/s per worker (one process, one thread), local COG files, page cache warm",
            "scene_px": list(scene.shape), "tile": args.tile, "block": args.block, "patches": len(patches),
            "bands": len(scene.s2_assets), "scene_bytes": files.nbytes,
            "reader_patches_per_s": round(best_reader, 1), "plain_patches_per_s": round(best_plain, 1),
            "same_ops_patches_per_s": round(best_same, 1),
            "ratio": round(best_reader / best_plain, 3), "ratio_same_ops": round(best_reader / best_same, 3),
        }))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
