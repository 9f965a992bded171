"""Bytes per delivered 128-px pair: format-1 samples (256 px, float32 S1, plain S2) against
format 2 (128-px tiles, compact members), on real SEN12MS pixels.

    python benchmarks/bench_bytes.py [--repeats 20]

Prints one JSON object. Targets (issue 9): <= 0.6 MB per delivered 128-px pair, goal 0.25 MB.

Input: the real SEN12MS patches of ../shared/realdata (README there). It holds five real S2 L1C
patches but only two real S1 patches, one of them on an S2's grid; so every S2 is paired with
each S1, the S1 pixels written onto the S2's grid (real values, borrowed georeferencing):
10 pairs of 256 px. Both variants are ingested by the real `dsl ingest` (local Ray, one
worker). Bytes are whole shard files (tar headers and padding included) over samples.

- ``bytes_per_128px_pair``: shard bytes / samples x (128 / tile)^2, the bytes per 128 x 128 px
  of stored area.
- ``bytes_read_per_128px_crop``: shard bytes / samples, what a reader moves for one crop when
  it must read a whole sample (the loader reads one crop per sample per epoch).
- ``decode_us_per_sample``: ``decode_array`` of the S1 and S2 members of one sample, from its
  bytes in memory (median over samples and repeats); the limit is ``np.frombuffer`` of the
  same arrays' raw bytes. Blosc runs on one thread (as in a loader worker that has threads of
  its own) and, for comparison, with blosc's own threads (numcodecs' default in a main thread).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

# This folder holds a file named like the `ingest` package; keep it off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
S1_FILES = ["sen12ms-cr/ROIs1868_summer_s1_19_p30.tif", "sen12ms/ROIs1158_spring_s1_1_p30.tif"]
S2_FILES = ["sen12ms-cr/ROIs1868_summer_s2_cloudy_19_p30.tif", "sen12ms-cr/ROIs1868_summer_s2_31_p100.tif",
            "sen12ms-cr/ROIs1868_summer_s2_cloudy_31_p100.tif", "sen12ms-cr/ROIs2017_winter_s2_102_p926.tif",
            "sen12ms-cr/ROIs2017_winter_s2_cloudy_102_p926.tif"]


def build_tree(root: Path) -> dict[str, np.ndarray]:
    """A SEN12MS tree of every real S2 with every real S1 (the S1 on the S2's grid).

    Returns:
        The S1 arrays written, by sample key (the reference for the S1 error).
    """
    s1 = []
    for f in S1_FILES:
        with rasterio.open(REALDATA / f) as ds:
            s1.append((ds.read(), ds.profile))
    written = {}
    for i, f in enumerate(S2_FILES):
        with rasterio.open(REALDATA / f) as ds:
            s2, grid = ds.read(), ds.profile
        for j, (a1, p1) in enumerate(s1):
            scene, patch = 100 + i, j
            key = f"ROIs9999_summer_{scene}_p{patch}"
            for sensor, data, profile in (("s1", a1, p1), ("s2", s2, grid)):
                out = root / f"ROIs9999_summer/{sensor}_{scene}/ROIs9999_summer_{sensor}_{scene}_p{patch}.tif"
                out.parent.mkdir(parents=True, exist_ok=True)
                prof = {**profile, "crs": grid["crs"], "transform": grid["transform"]}
                with rasterio.open(out, "w", **prof) as dst:
                    dst.write(data)
            written[key] = a1
    return written


def shard_members(out: Path, manifest) -> list[dict[str, bytes]]:
    """Every sample's members, raw bytes by extension, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for s in manifest.shards:
        with tarfile.open(out / s.name) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [dict(v, __key__=k) for k, v in samples.items()]


def decode_us(samples: list[dict], repeats: int) -> float:
    from dsl.contracts.shard_format import S1_MEMBERS, S2_MEMBERS, decode_array

    times = []
    for _ in range(repeats):
        for s in samples:
            (e1,) = [e for e in S1_MEMBERS if e in s]
            (e2,) = [e for e in S2_MEMBERS if e in s]
            t0 = time.perf_counter()
            decode_array(e1, s[e1], e1)
            decode_array(e2, s[e2], e2)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def frombuffer_us(samples: list[dict], repeats: int) -> float:
    """The limit: the arrays' raw bytes (as .npy payloads would hold them) viewed as arrays."""
    from dsl.contracts.shard_format import S1_MEMBERS, S2_MEMBERS, decode_array

    raw = []
    for s in samples:
        (e1,) = [e for e in S1_MEMBERS if e in s]
        (e2,) = [e for e in S2_MEMBERS if e in s]
        a1, a2 = decode_array(e1, s[e1], e1), decode_array(e2, s[e2], e2)
        raw.append(((a1.astype(np.float32).tobytes(), a1.shape), (a2.tobytes(), a2.shape)))
    times = []
    for _ in range(repeats):
        for (b1, sh1), (b2, sh2) in raw:
            t0 = time.perf_counter()
            np.frombuffer(b1, np.float32).reshape(sh1)
            np.frombuffer(b2, np.uint16).reshape(sh2)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import numcodecs.blosc

    from dsl.contracts.config import IngestConfig
    from dsl.contracts.shard_format import S1_MEMBERS, decode_array
    from ingest.run import ingest

    tmp = Path(tempfile.mkdtemp(prefix="dsl-bench-"))
    try:
        raw = tmp / "raw"
        s1_in = build_tree(raw)
        result: dict = {}
        variants = {"before": {"tile_size": 256, "encoding": "plain"}, "after": {"tile_size": 128, "encoding": "compact"}}
        for name, opts in variants.items():
            out = tmp / name
            m = ingest(IngestConfig(source="sen12ms", input=str(raw), output=str(out), workers=1, progress=False, **opts))
            samples = shard_members(out, m)
            shard_bytes = sum(s.bytes for s in m.shards)
            per_sample = shard_bytes / m.samples
            tile = opts["tile_size"]
            s2_member = [len(s.get("s2.blosc", s.get("s2.npy"))) for s in samples]
            s1_member = [len(next(s[e] for e in S1_MEMBERS if e in s)) for s in samples]
            # S1 error: every decoded sample against the float32 input at its tile
            s1_error, fallbacks = 0.0, 0
            for s in samples:
                ext = next(e for e in S1_MEMBERS if e in s)
                fallbacks += name == "after" and ext == "s1.npy"
                meta = json.loads(s["json"])
                base = meta["key"].rsplit("_r", 1)[0] if "tile" in meta else meta["key"]
                r, c = meta.get("tile", [0, 0])
                want = s1_in[base][:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
                s1_error = max(s1_error, float(np.abs(decode_array(ext, s[ext], ext) - want).max()))
            numcodecs.blosc.use_threads = False
            one_thread = decode_us(samples, args.repeats)
            numcodecs.blosc.use_threads = None
            threaded = decode_us(samples, args.repeats)
            result[name] = {
                "tile_px": tile,
                "encoding": opts["encoding"],
                "samples": m.samples,
                "shard_bytes": shard_bytes,
                "bytes_per_sample": round(per_sample),
                "bytes_per_128px_pair": round(per_sample * (128 / tile) ** 2),
                "bytes_read_per_128px_crop": round(per_sample),
                "s1_member_bytes_mean": round(float(np.mean(s1_member))),
                "s2_member_bytes_mean": round(float(np.mean(s2_member))),
                "s2_compression_ratio": round(13 * tile * tile * 2 / float(np.mean(s2_member)), 3),
                "s1_compression_ratio_vs_float32": round(2 * tile * tile * 4 / float(np.mean(s1_member)), 3),
                "s1_max_error_db": s1_error,
                "s1_full_precision_fallbacks": int(fallbacks),
                "decode_us_per_sample": round(one_thread, 1),
                "decode_us_per_sample_blosc_threads": round(threaded, 1),
                "limit_frombuffer_us_per_sample": round(frombuffer_us(samples, args.repeats), 2),
            }
        b, a = result["before"], result["after"]
        print(json.dumps({
            "benchmark": "bytes",
            "command": f"python benchmarks/bench_bytes.py --repeats {args.repeats}",
            "input": f"{len(S2_FILES)} real SEN12MS S2 x {len(S1_FILES)} real S1 patches, 256 px",
            **result,
            "ratio_bytes_per_128px_pair_after_vs_before": round(a["bytes_per_128px_pair"] / b["bytes_per_128px_pair"], 4),
            "ratio_bytes_read_per_128px_crop_after_vs_before": round(
                a["bytes_read_per_128px_crop"] / b["bytes_read_per_128px_crop"], 4),
            "target_bytes_per_128px_pair": 600_000,
            "goal_bytes_per_128px_pair": 250_000,
            "s1_error_bound_db": 0.01,
            "cpus": os.cpu_count(),
        }, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
