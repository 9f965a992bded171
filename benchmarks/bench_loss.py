"""Per-rank cost of the Dual NT-Xent: local loss on gathered keys vs the full global matrix.

Global batch: 4096 pairs of 128-d float32 embeddings (8192 embeddings). The local loss is
simulated on one process as rank 0 of ``--world`` ranks: its anchor rows ([2b, 2B] logits)
against all keys, the other ranks' keys being leaves that need gradient, as with
``gather_with_grad=True`` (so the backward does the same work; the all_gather/all_to_all
communication is not included). The global variant is what every rank computes with
``local_loss=False``: the [2B, 2B] matrix.

Memory: peak RSS growth (``ru_maxrss`` after the steps minus the RSS before the first step),
each variant in its own spawned process so one's peak does not hide the other's. torch's CPU
allocator bypasses Python's, so tracemalloc would not see the logits.

Prints one JSON object. Usage: ``python benchmarks/bench_loss.py [--pairs 4096] [--world 2]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure(variant: str, pairs: int, dim: int, world: int, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dsl.losses.dual_ntxent import dual_ntxent

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    b = pairs // world if variant == "local" else pairs
    z1, z2 = (torch.randn(b, dim, generator=g).requires_grad_() for _ in range(2))
    # The other ranks' part of the gathered keys (local variant only).
    o1, o2 = (torch.randn(pairs - b, dim, generator=g).requires_grad_() for _ in range(2))
    scale = 1 / 0.07

    def step() -> None:
        q1, q2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        k1 = torch.cat([q1, F.normalize(o1, dim=1)])
        k2 = torch.cat([q2, F.normalize(o2, dim=1)])
        dual_ntxent(q1, q2, k1, k2, 0, scale).backward()

    base = _rss_mib()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        step()
        if i:  # the first step warms up the allocator and kernels
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "logits_shape": [2 * b, 2 * pairs],
        "logits_mib": round(2 * b * 2 * pairs * 4 / 2**20, 1),
        "time_s_median": round(statistics.median(times), 3),
        "time_s_min": round(min(times), 3),
        "peak_rss_growth_mib": round(peak - base, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4096, help="global batch (pairs)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--world", type=int, default=2, help="simulated ranks for the local loss")
    parser.add_argument("--steps", type=int, default=5, help="timed forward+backward steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.pairs % args.world:
        raise ValueError(f"--pairs ({args.pairs}) must be divisible by --world ({args.world})")

    ctx = mp.get_context("spawn")
    results = {}
    for variant in ("local", "global"):
        with ctx.Pool(1) as pool:  # a fresh process: its own peak RSS
            params = (variant, args.pairs, args.dim, args.world, args.steps, args.threads)
            results[variant] = pool.apply(_measure, params)
    local, full = results["local"], results["global"]
    print(
        json.dumps(
            {
                "loss": "dual_ntxent",
                "global_pairs": args.pairs,
                "dim": args.dim,
                "dtype": "float32",
                "simulated_world_size": args.world,
                "torch_threads": args.threads,
                "timed_steps": args.steps,
                "what": "forward+backward per rank; local = gather_with_grad=True, local_loss=True "
                "(communication excluded); global = local_loss=False full matrix",
                "memory_method": "peak RSS growth: ru_maxrss after the steps minus RSS before, one spawned process per variant",
                "local_loss": local,
                "global_matrix": full,
                "time_ratio_global_over_local": round(
                    full["time_s_median"] / local["time_s_median"], 2
                ),
                "memory_ratio_global_over_local": round(
                    full["peak_rss_growth_mib"] / max(local["peak_rss_growth_mib"], 1e-9), 2
                ),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
