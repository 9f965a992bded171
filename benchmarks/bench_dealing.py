"""Dealing and resume planning at archive scale: seconds and memory, no shard read.

Prints one JSON object. A fabricated layout of ``--shards`` shards (sizes drawn around
``--samples / --shards``, some empty), ``--world`` ranks x ``--workers`` loader workers:

- ``rank_epoch``: what one rank's loader computes for a whole epoch (every batch's sample ids,
  ``SampleStream.batch_ids`` arithmetic), the cost each rank pays per epoch;
- ``resume``: planning a resume mid-epoch on another world size (the first batch's ids);
- ``full_order``: the whole epoch's order at once (what no rank needs; the O(samples) bound);
- ``before``: the replaced shard-to-slot deal (``load.index(min(load))`` per shard, as the
  loader did until format 2), timed on the same layout: the limit it had to beat.

    .venv/bin/python benchmarks/bench_dealing.py [--samples 10000000 --shards 100000 --world 512 --workers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import tracemalloc

import numpy as np

from dsl.data.dealing import EpochOrder, batches_left, rank_slice


def layout(samples: int, shards: int, seed: int = 0) -> np.ndarray:
    """Shard sizes summing to about ``samples``: uneven, 3% empty."""
    rng = np.random.default_rng(seed)
    mean = samples / shards
    counts = rng.integers(int(mean * 0.5), int(mean * 1.5) + 1, size=shards)
    counts[rng.random(shards) < 0.03] = 0
    return counts


def rank_epoch(counts, world: int, batch: int, workers: int, block: int, start: int = 0) -> dict:
    """One rank's batch ids for a whole epoch, all its workers together."""
    tracemalloc.start()
    t0 = time.perf_counter()
    order = EpochOrder(counts, 0, 0, block)
    n = batches_left(order.length, start, world, batch)
    ids = 0
    for g in range(n):
        ids += len(order.ids(*rank_slice(start, g, world, batch, world // 2)))
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": round(seconds, 3), "batches": n, "samples": ids, "peak_mb": round(peak / 2**20, 1),
            "per_worker_seconds": round(seconds / workers, 3)}


def resume(counts, world: int, batch: int, block: int, at: int) -> dict:
    t0 = time.perf_counter()
    order = EpochOrder(counts, 0, 0, block)
    first = order.ids(*rank_slice(at, 0, world, batch, world - 1))
    return {"seconds": round(time.perf_counter() - t0, 4), "start_sample": at, "batch_ids": len(first)}


def full_order(counts, block: int) -> dict:
    tracemalloc.start()
    t0 = time.perf_counter()
    order = EpochOrder(counts, 0, 0, block)
    ids = order.ids(0, order.length)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.bincount(ids, minlength=order.length).max() == 1
    return {"seconds": round(seconds, 3), "samples": int(order.length), "peak_mb": round(peak / 2**20, 1)}


def before(counts, n_slots: int) -> dict:
    """The shard-to-slot deal the loader used before sample-level dealing (per rank, per epoch)."""
    t0 = time.perf_counter()
    load = [0] * n_slots
    for i in sorted(range(len(counts)), key=lambda i: -counts[i]):
        s = load.index(min(load))
        load[s] += int(counts[i])
    return {"seconds": round(time.perf_counter() - t0, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--world", type=int, default=512)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block", type=int, default=262_144)
    args = p.parse_args()

    counts = layout(args.samples, args.shards)
    total = int(counts.sum())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "benchmark": "dealing",
        "samples": total, "shards": args.shards, "world": args.world, "workers": args.workers,
        "slots": args.world * args.workers, "batch_size": args.batch_size, "shuffle_block": args.block,
        "cpu_cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
        "rank_epoch": rank_epoch(counts, args.world, args.batch_size, args.workers, args.block),
        "resume": resume(counts, args.world * 2, args.batch_size, args.block, at=total // 3),
        "full_order": full_order(counts, args.block),
        "before": before(counts, args.world * args.workers),
    }
    out["max_rss_growth_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
    out["rank_epoch_over_before"] = round(out["rank_epoch"]["seconds"] / out["before"]["seconds"], 3)
    out["target_full_order_under_1s"] = out["full_order"]["seconds"] < 1.0
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
