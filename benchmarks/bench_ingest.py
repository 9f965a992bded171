"""Ingest throughput: pairs/s per worker against reading the same files and dropping them.

    python benchmarks/bench_ingest.py [--locations 400] [--size 256]

Prints one JSON object. Targets: ingest(1 worker) / read-only >= 0.8; 2 workers / 1 >= 1.7.
Synthetic SEN12MS-layout GeoTIFFs with the real band counts, dtypes and (uncompressed) layout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import rasterio

# This folder holds a file named like the `ingest` package; keep it off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def read_only(root: Path) -> float:
    """The limit: the simplest loop that reads every pair's S1 and S2 raster with rasterio (in
    the order ingest reads them) and drops them."""
    s1 = sorted(root.rglob("*_s1_*.tif"))
    t0 = time.perf_counter()
    for f in s1:
        for path in (f, Path(str(f).replace("_s1_", "_s2_").replace("/s1_", "/s2_"))):
            with rasterio.open(path) as ds:
                ds.read()
    return len(s1) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--locations", type=int, default=400)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--shard-size-mb", type=float, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from dsl.contracts.config import IngestConfig
    from dsl.runtime.ray_start import init_ray
    from ingest.run import ingest
    from ingest.synth import synthesise

    tmp = Path(tempfile.mkdtemp(prefix="dsl-bench-"))
    try:
        raw = tmp / "raw"
        synthesise(raw, "sen12ms", args.locations, seed=0, size=args.size)
        init_ray(num_cpus=2)  # started once, outside the timed runs
        read_only(raw)  # warm the page cache so every variant reads from memory
        # This VM's timings swing by 30-50% run to run: interleave the variants, keep each best.
        baseline, rates, per_worker = 0.0, {1: 0.0, 2: 0.0}, 0.0
        for rep in range(args.repeats):
            baseline = max(baseline, read_only(raw))
            for workers in (1, 2):
                out = tmp / f"out{workers}-{rep}"
                t0 = time.perf_counter()
                m = ingest(IngestConfig(source="sen12ms", input=str(raw), output=str(out), workers=workers,
                                        shard_size_mb=args.shard_size_mb, progress=False))
                rates[workers] = max(rates[workers], m.samples / (time.perf_counter() - t0))
                if workers == 1:  # steady state: pairs per busy second of the one worker
                    per_worker = max(per_worker, m.samples / m.task_seconds)
                shutil.rmtree(out)
        print(json.dumps({
            "benchmark": "ingest",
            "command": f"python benchmarks/bench_ingest.py --locations {args.locations} --size {args.size} --repeats {args.repeats}",
            "pairs": args.locations,
            "patch_px": args.size,
            "read_only_pairs_per_s": round(baseline, 1),
            "ingest_1_worker_pairs_per_s_wall": round(rates[1], 1),
            "ingest_pairs_per_s_per_worker_busy": round(per_worker, 1),
            "ingest_2_workers_pairs_per_s_wall": round(rates[2], 1),
            "ratio_1_worker_wall_vs_read_only": round(rates[1] / baseline, 3),
            "ratio_per_worker_busy_vs_read_only": round(per_worker / baseline, 3),
            "target_ratio": 0.8,
            "speedup_2_vs_1": round(rates[2] / rates[1], 3),
            "target_speedup": 1.7,
            "cpus": os.cpu_count(),
        }, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
