"""STAC patch reading: patches/s of one SceneReader against a plain rasterio loop over the same windows.

    python benchmarks/bench_stac_read.py [--repeat 8] [--block 256] [--tile 120] [--rounds 3]

Prints one JSON object. The scene is tests/fixtures/stac_scenes.py's: the real BigEarthNet-MM
pair mirrored ``repeat`` x ``repeat`` times (960 x 960 px at 10 m by default), 12 S2 band COGs
at 10/20/60 m, SCL, S1 VV/VH in EPSG:4326 at ~20 m, DEFLATE, ``block`` px tiles. LOCAL FILES
(page cache warm): this measures decoding, resampling, warping and the checks, not the network;
remote reads are bounded by latency and bandwidth instead.

What a remote read costs in bytes is measured separately, untimed: the scene's folder is served
by a range-capable HTTP server on 127.0.0.1 (:class:`RangeServer`), the hrefs point at it (the
reader reads ``http://`` hrefs through ``/vsicurl/``), and one SceneReader reads every patch
once, in row-major order. The server counts requests and body bytes: ``first_patch_bytes``
(the COG headers of every asset plus the first patch's blocks), ``bytes_per_patch`` (mean over
all patches), ``fetched_fraction`` (all patches' bytes / ``scene_bytes``: blocks are shared by
neighbouring patches and fetched once per reader, so near 1 means nothing was fetched twice),
``requests_per_patch``. Bytes are the 206 bodies, which GDAL reads whole. GDAL first learns a
file's size by a GET without Range that it drops once it has the headers (the reader's
``CPL_VSIL_CURL_USE_HEAD=NO``): those are counted as requests, and apart as ``size_probes`` with
``size_probe_bytes_at_most`` (what the server's socket took before the client hung up).

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
import dataclasses
import json
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# This folder holds a file named like the `ingest` package; keep it off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import rasterio  # noqa: E402
from rasterio.warp import transform_bounds  # noqa: E402
from rasterio.windows import from_bounds  # noqa: E402

RANGE = re.compile(r"bytes=(\d*)-(\d*)")
PROBE_CHUNK = 16 << 10


class _RangeHandler(BaseHTTPRequestHandler):
    """GET/HEAD of the server's folder's files; ``Range: bytes=a-b`` (or ``a-``, ``-n``) -> 206."""

    protocol_version = "HTTP/1.1"  # keep-alive: GDAL reuses its connections, as against a real store
    server: RangeServer

    def setup(self) -> None:
        super().setup()
        # a small send buffer: a body the client stops reading stops being counted soon after
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PROBE_CHUNK * 4)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._serve(body=False)

    def _empty(self, status: int, **headers: str) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool) -> None:
        self.server.count(requests=1)
        folder = self.server.folder
        path = (folder / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
        if folder not in path.parents or not path.is_file():
            return self._empty(404)
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        m = RANGE.fullmatch(self.headers.get("Range", "").strip())
        if m and (m[1] or m[2]):  # a multi-range or malformed header gets the whole file (200), as HTTP allows
            if m[1]:
                start, end = int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1
            else:  # suffix: the last n bytes
                start = max(0, size - int(m[2]))
            if start >= size or start > end:
                return self._empty(416, Content_Range=f"bytes */{size}")
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        if status == 206:
            # counted before sending: once the client has the bytes, the count has them too
            self.server.count(range_bytes=len(data))
            self.wfile.write(data)
            return
        # A GET without Range: GDAL's size probe (CPL_VSIL_CURL_USE_HEAD=NO), which it drops
        # once it has the headers. Sent in chunks, counting what the socket took before the
        # client hung up (an upper bound of what it read: the buffers in between hold some).
        sent = 0
        try:
            for off in range(0, len(data), PROBE_CHUNK):
                self.wfile.write(data[off:off + PROBE_CHUNK])
                sent += len(data[off:off + PROBE_CHUNK])
        except OSError:  # reset or broken pipe: the client has what it wanted
            self.close_connection = True
        finally:
            self.server.count(probes=1, probe_bytes=sent)


class RangeServer(ThreadingHTTPServer):
    """A folder served on 127.0.0.1 (a free port) with range requests, counting what it serves.

    A context manager: serves from a thread until left. Counters: ``requests`` (all),
    ``range_bytes`` (206 bodies, sent whole), ``probes`` and ``probe_bytes`` (GETs without
    Range and what of their bodies the socket took before the client closed it).
    """

    daemon_threads = True

    def __init__(self, folder: Path):
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.folder = Path(folder).resolve()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.lock = threading.Lock()
        self.counters = dict.fromkeys(("requests", "range_bytes", "probes", "probe_bytes"), 0)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def count(self, **add: int) -> None:
        with self.lock:
            for k, v in add.items():
                self.counters[k] += v

    def counts(self) -> dict[str, int]:
        """The counters so far (a copy)."""
        with self.lock:
            return dict(self.counters)

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # GDAL drops connections it is done with
            super().handle_error(request, client_address)

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()


def http_bytes(files, patches, tile) -> dict:
    """Bytes and requests per patch of one SceneReader reading every patch over HTTP range reads."""
    from dsl.contracts.config import StacConfig
    from ingest.stac.read import SceneReader

    with RangeServer(files.root) as server:
        s = files.scene
        url = {h: f"{server.url}/{Path(h).name}" for h in [*s.s2_assets.values(), s.scl, *s.s1_assets.values()]}
        scene = dataclasses.replace(s, s2_assets={b: url[h] for b, h in s.s2_assets.items()}, scl=url[s.scl],
                                    s1_assets={p: url[h] for p, h in s.s1_assets.items()})
        per: list[tuple[int, int]] = []  # (requests, range bytes) of each patch
        with SceneReader(StacConfig(max_scl_fraction=1.0, max_nodata_fraction=1.0)) as r:
            for row, col in patches:
                before = server.counts()
                r.read_patch(scene, row, col, tile)
                after = server.counts()
                per.append((after["requests"] - before["requests"], after["range_bytes"] - before["range_bytes"]))
            assert set(r.opens) == set(url.values()), "every asset read over HTTP"
        # the probes' handlers may still be sending when the reader closes: counted in total only
        total = server.counts()
    fetched = total["range_bytes"]
    return {
        "bytes_per_patch": round(fetched / len(per)), "first_patch_bytes": per[0][1],
        "bytes_per_patch_after_first": round((fetched - per[0][1]) / max(1, len(per) - 1)),
        "http_range_bytes": fetched, "fetched_fraction": round(fetched / files.nbytes, 3),
        "requests_per_patch": round(sum(q for q, _ in per) / len(per), 2), "first_patch_requests": per[0][0],
        "size_probes": total["probes"], "size_probe_bytes_at_most": total["probe_bytes"],
    }


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
        fetched = http_bytes(files, patches, args.tile)  # after the timings, and not timed
        print(json.dumps({
            "what": "patches/s per worker (one process, one thread), local COG files, page cache warm",
            "scene_px": list(scene.shape), "tile": args.tile, "block": args.block, "patches": len(patches),
            "bands": len(scene.s2_assets), "scene_bytes": files.nbytes,
            "reader_patches_per_s": round(best_reader, 1), "plain_patches_per_s": round(best_plain, 1),
            "same_ops_patches_per_s": round(best_same, 1),
            "ratio": round(best_reader / best_plain, 3), "ratio_same_ops": round(best_reader / best_same, 3),
            "http": "one SceneReader, every patch once over HTTP range reads (/vsicurl/), 127.0.0.1, untimed",
            **fetched,
        }))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
