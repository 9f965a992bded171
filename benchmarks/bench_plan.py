"""The ingest driver's planning at archive scale: seconds and peak memory per phase, no raster read.

Prints one JSON object. ``--items`` fabricated single-patch items (a STAC-like key, a grid cell
as the location, one scene file, a row index), then the driver's steps in order:

- ``items``: building the list itself (what a source's listing hands the planner);
- ``plan_count``: :func:`ingest.run.plan_partitions` with ``--per-shard`` items per partition
  (the probe-based sizing);
- ``plan_bytes``: the same cut by each item's own estimated bytes (``--shard-mb``; sizes drawn
  between 0.1 and 3 MB, as single patches and small scenes);
- ``plan_id``: :func:`ingest.run._plan_id` over every item;
- ``resume``: which partitions are left to do when every other one has its sidecar, and how
  many items are already done (:func:`ingest.run.pending`);
- ``listing``: listing ``_parts`` with one (empty) sidecar per committed partition, on local disk;
- ``limit``: the simplest loop doing the planner's irreducible work, sorting the items' seeded
  sha1 digests; ``ratio`` is ``plan_count`` over it.

``peak_mb`` is the process's peak resident memory during the phase (the kernel's high-water mark,
reset before each phase), so it includes the items held since ``items``.

    .venv/bin/python benchmarks/bench_plan.py [--items 1000000 --per-shard 10 --shard-mb 256]

With ``--code DIR`` the ``ingest`` package is imported from DIR instead (a checkout of older
code, for before/after figures; phases it lacks are timed as the code before them did them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import sys
import tempfile
import time


def _hwm_mb() -> float:
    """Peak resident memory since the last reset (Linux), else since the start."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


SKIP: set[str] = set()


def phase(report: dict, name: str, fn):
    """Run ``fn`` as phase ``name`` (unless skipped): its seconds and peak MB go into ``report``."""
    if name in SKIP:
        return None
    _reset_hwm()
    t0 = time.perf_counter()
    out = fn()
    report[name] = {"seconds": round(time.perf_counter() - t0, 3), "peak_mb": round(_hwm_mb(), 1)}
    return out


def fabricate(n: int, PairItem) -> list:
    """Single-patch items as a STAC source lists them: 100 patches a scene, 10 a grid cell."""
    return [PairItem(key=f"S2A_MSIL2A_20240101T103421_N0510_R108_T32TQM_{i:07d}", location=f"cell_{i // 10:06d}",
                     files=(("scene", f"S2A_MSIL2A_20240101T103421_T32TQM_{i // 100:05d}"),), index=i)
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--per-shard", type=int, default=10)
    ap.add_argument("--shard-mb", type=float, default=256.0)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--code", default=None, help="import ingest from this directory (older code)")
    ap.add_argument("--skip", default="", help="phases not to run, comma-separated (e.g. resume on quadratic code)")
    args = ap.parse_args()
    SKIP.update(filter(None, args.skip.split(",")))
    if args.code:
        sys.path.insert(0, args.code)
    import random

    import ingest.run as run
    from dsl.contracts.config import IngestConfig
    from ingest.sources.base import PairItem

    report: dict = {"items_n": args.items, "code": run.__file__}
    items = phase(report, "items", lambda: fabricate(args.items, PairItem))
    parts = phase(report, "plan_count", lambda: run.plan_partitions(items, args.per_shard, args.val_fraction, "pairs"))
    report["partitions_count"] = len(parts)
    if "shard_bytes" in run.plan_partitions.__code__.co_varnames:
        rng = random.Random(0)
        sizes = [rng.randint(100_000, 3_000_000) for _ in items]
        by_bytes = phase(report, "plan_bytes", lambda: run.plan_partitions(
            items, None, args.val_fraction, "pairs", sizes=sizes, shard_bytes=int(args.shard_mb * 1e6)))
        report["partitions_bytes"] = len(by_bytes)
        del sizes, by_bytes
    cfg = IngestConfig(input="/in", val_fraction=args.val_fraction)
    phase(report, "plan_id", lambda: run._plan_id(cfg, items, args.per_shard))
    committed = {p.shard + ".json" for p in parts[::2]}
    if hasattr(run, "pending"):
        phase(report, "resume", lambda: run.pending(parts, committed))
    else:  # the code before: the same expressions as its ingest()
        def before():
            todo = [p for p in parts if p.shard + ".json" not in committed]
            return todo, sum(len(p.items) for p in parts if p not in todo)
        phase(report, "resume", before)
    with tempfile.TemporaryDirectory() as out:
        os.makedirs(os.path.join(out, run.PARTS))
        for name in committed:
            open(os.path.join(out, run.PARTS, name), "w").close()
        if hasattr(run, "committed_sidecars"):
            listed = phase(report, "listing", lambda: run.committed_sidecars(out))
        else:  # the code before: its ingest()'s listing
            def before_listing():
                fs, root = run.filesystem(out)
                found = set(fs.ls(run.join(root, run.PARTS), detail=False)) if fs.exists(run.join(root, run.PARTS)) else set()
                return {e.rsplit("/", 1)[-1] for e in found}
            listed = phase(report, "listing", before_listing)
        assert listed is None or listed == committed
    keys = [it.key for it in items]
    phase(report, "limit", lambda: sorted(hashlib.sha1(f"0:{k}".encode()).digest() for k in keys))
    report["ratio_plan_to_limit"] = round(report["plan_count"]["seconds"] / max(report["limit"]["seconds"], 1e-9), 2)
    report["total_seconds"] = round(sum(v["seconds"] for k, v in report.items()
                                        if isinstance(v, dict) and k not in ("items", "limit")), 3)
    report["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
