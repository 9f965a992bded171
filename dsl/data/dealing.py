"""Which samples every rank reads: one seeded order of the epoch, cut into global batches.

Sample-level dealing (as MosaicML Streaming does it): the epoch is a permutation of global sample
ids (numbered in manifest shard order), read ``world x batch`` at a time; global batch ``g`` is
positions ``[g * world * batch, (g + 1) * world * batch)`` of the order and rank ``r`` gets the
``r``-th ``batch`` of it. So within an epoch every sample is read once, never twice in one global
batch, whatever the shard sizes, ranks and loader workers; only a tail shorter than one global
batch is left out (drop-last).

The order does not depend on the world size, the loader workers or the batch size, so a job's
position is just *samples of this epoch consumed*: a job resumed on another number of ranks
continues the same order at the same place.

Reads stay local (block shuffling): the shards are put in a seeded order and their samples laid
end to end, then shuffled within blocks of ``block`` consecutive samples. A global batch draws
from the shards of one block (``block`` samples, many shards: scattered by the ingest, so
many places), and the blocks are computed lazily: memory and time per block are O(block), the
shard order O(shards), whatever the dataset's size.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class EpochOrder:
    """The seeded sample order of one epoch, computed a block at a time.

    Args:
        counts: Samples per shard (manifest order) in the stream's universe.
        seed: Data seed.
        epoch: Epoch number (reseeds everything).
        block: Shuffle block in samples (>= 1).
        length: Samples in the epoch (default: all of them). Longer than the universe: the
            shards are laid out again in a new order for each extra pass.
        members: With a subset, the global id of each universe sample (sorted); the order then
            yields those ids.
    """

    def __init__(self, counts, seed: int, epoch: int, block: int, length: int | None = None,
                 members: np.ndarray | None = None):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)])
        self.total = int(self.first[-1])
        self.length = self.total if length is None else int(length)
        if self.total == 0 or self.length < 0:
            raise ValueError("an epoch order needs at least one sample")
        self.seed, self.epoch, self.block, self.members = seed, epoch, max(1, int(block)), members
        self._passes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _pass(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Pass ``k``'s shard order and where each of its shards starts in the pass."""
        if k not in self._passes:
            order = np.random.default_rng([self.seed, self.epoch, 0, k]).permutation(len(self.counts))
            starts = np.concatenate([[0], np.cumsum(self.counts[order])])
            self._passes = {k: (order, starts)}  # passes are consumed in order: keep one
        return self._passes[k]

    def _laid_out(self, positions: np.ndarray) -> np.ndarray:
        """Universe ids at ``positions`` of the shards laid end to end (before block shuffling)."""
        if self.length <= self.total:  # one pass (the usual epoch): no division
            return self._in_pass(0, positions)
        k, p = np.divmod(positions, self.total)
        out = np.empty(len(positions), dtype=np.int64)
        for pass_k in range(int(k.min()), int(k.max()) + 1) if len(k) else ():
            sel = k == pass_k
            out[sel] = self._in_pass(pass_k, p[sel])
        return out

    def _in_pass(self, k: int, p: np.ndarray) -> np.ndarray:
        """Universe ids at positions ``p`` of pass ``k``."""
        order, starts = self._pass(k)
        if len(p) * 4 >= self.total:  # most of a pass: lay it out whole, O(samples)
            # id = first[shard] + (p - starts[run]): the run's constant part, repeated per sample
            return np.repeat(self.first[order] - starts[:-1], self.counts[order])[p] + p
        run = np.searchsorted(starts, p, side="right") - 1  # a batch: O(log shards) each
        return self.first[order[run]] + (p - starts[run])

    def _block(self, k: int, j: int) -> np.ndarray:
        """Block ``j`` of pass ``k``: its laid-out positions in epoch order.

        Blocks never cross a pass boundary: no sample repeats within a block, and one repeats
        within a global batch only when that batch straddles two passes. Cached: a worker reads
        a block's batches in turn; only positions are kept, ids are looked up for what is read.
        """
        if (k, j) not in self._blocks:
            lo = k * self.total + j * self.block
            hi = min(lo + self.block, (k + 1) * self.total, self.length)
            key = [self.seed, self.epoch, 1, j] + ([k] if k else [])  # pass 0: as for one-pass epochs
            self._blocks[(k, j)] = lo + np.random.default_rng(key).permutation(hi - lo)
            while len(self._blocks) > 2:  # a batch spans at most two blocks
                self._blocks.popitem(last=False)
        return self._blocks[(k, j)]

    def ids(self, lo: int, hi: int) -> np.ndarray:
        """Ids at order positions ``[lo, hi)``."""
        if not 0 <= lo <= hi <= self.length:
            raise ValueError(f"positions [{lo}, {hi}) outside the epoch's {self.length} samples")
        parts, p = [], lo
        while p < hi:
            k = p // self.total
            j = (p - k * self.total) // self.block
            start = k * self.total + j * self.block
            end = min(start + self.block, (k + 1) * self.total, self.length)
            parts.append(self._block(k, j)[p - start : min(hi, end) - start])
            p = min(hi, end)
        ids = self._laid_out(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        return ids if self.members is None else self.members[ids]


def batches_left(length: int, sample: int, world: int, batch: int) -> int:
    """Full global batches of ``world x batch`` left in an epoch of ``length`` from ``sample``."""
    return max(0, (length - sample) // (world * batch))


def rank_slice(sample: int, g: int, world: int, batch: int, rank: int) -> tuple[int, int]:
    """Order positions of rank ``rank``'s part of global batch ``g`` after ``sample``."""
    lo = sample + g * world * batch + rank * batch
    return lo, lo + batch


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mix (splitmix64's finaliser): uniform bits from consecutive integers."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & MASK64
        return x ^ (x >> np.uint64(31))


def crop_fractions(ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Two uniform fractions in [0, 1) per sample: its crop window in this epoch.

    A function of (seed, epoch, sample id) only, so a sample gets the same crop whichever rank,
    worker or resumed job reads it.
    """
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        base = _splitmix64(_splitmix64(np.uint64(seed % 2**64) ^ (np.uint64(epoch) << np.uint64(40))) ^ ids)
    y, x = _splitmix64(base), _splitmix64(base ^ np.uint64(0x5DEECE66D))
    return np.stack([y >> np.uint64(11), x >> np.uint64(11)], axis=1).astype(np.float64) / float(1 << 53)
