"""dsl.data.dealing: one seeded order per epoch, cut into global batches, at archive scale.

No shard is read here: the orders are checked as numbers, on fabricated shard layouts of up to
100,000 shards and 512 simulated ranks x 12 loader workers (``SampleStream.batch_ids`` in
``test_sample_stream.py`` runs the same arithmetic per rank and worker).
"""

from __future__ import annotations

import numpy as np
import pytest

from dsl.data.dealing import EpochOrder, batches_left, crop_fractions, rank_slice


def uneven_counts(n_shards: int, seed: int = 0) -> np.ndarray:
    """Shard sizes as an ingest leaves them: mostly full, some short, a few empty."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(60, 140, size=n_shards)
    counts[rng.random(n_shards) < 0.05] = 0
    counts[rng.random(n_shards) < 0.05] = 1
    return counts


def test_an_epoch_is_a_permutation_of_every_sample():
    counts = uneven_counts(1000)
    order = EpochOrder(counts, seed=3, epoch=0, block=4096)
    ids = order.ids(0, order.length)
    assert np.array_equal(np.sort(ids), np.arange(counts.sum()))
    assert not np.array_equal(ids, np.arange(counts.sum()))  # shuffled
    # the same seed and epoch: the same order, asked for in any pieces
    again = EpochOrder(counts, seed=3, epoch=0, block=4096)
    pieces = [again.ids(lo, min(lo + 777, order.length)) for lo in range(0, order.length, 777)]
    assert np.array_equal(np.concatenate(pieces), ids)
    # another epoch or seed: another order
    assert not np.array_equal(EpochOrder(counts, 3, 1, 4096).ids(0, 5000), ids[:5000])
    assert not np.array_equal(EpochOrder(counts, 4, 0, 4096).ids(0, 5000), ids[:5000])


def test_blocks_keep_reads_within_a_few_shards_and_shuffle_inside():
    counts = np.full(2000, 100)
    order = EpochOrder(counts, seed=0, epoch=0, block=1000)
    first = np.concatenate([[0], np.cumsum(counts)])
    for b in range(0, 200, 37):
        ids = order.ids(b * 1000, (b + 1) * 1000)
        shards = np.unique(np.searchsorted(first, ids, side="right") - 1)
        assert len(shards) <= 11  # 1,000 samples of 100-sample shards: 10, or 11 when cut mid-shard
        assert not np.array_equal(ids, np.sort(ids))  # shuffled within the block
    # shard order itself is shuffled: the first block is not the first shards
    assert (np.searchsorted(first, order.ids(0, 1000), side="right") - 1).min() > 0


def test_subset_orders_yield_only_the_members():
    counts = [5, 0, 7, 3]
    members = np.array([1, 4, 6, 9, 20, 30, 31])
    sub_counts = [2, 0, 3, 2]  # members per shard of a 5/0/7/3 layout with ids 0..14 ... (universe)
    order = EpochOrder(sub_counts, seed=1, epoch=0, block=3, members=members)
    assert sorted(order.ids(0, 7).tolist()) == members.tolist()
    assert order.total == 7 and sum(counts) == 15


def test_an_epoch_longer_than_the_data_lays_the_shards_out_again():
    order = EpochOrder([4, 6], seed=0, epoch=0, block=5, length=25)
    ids = order.ids(0, 25)
    counts = np.bincount(ids, minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3  # two and a half passes
    for p in range(2):  # each full pass of 10 positions (before block shuffling) covers every sample once
        assert sorted(order._laid_out(np.arange(p * 10, p * 10 + 10)).tolist()) == list(range(10))
    with pytest.raises(ValueError, match=r"positions \[20, 26\) outside the epoch's 25 samples"):
        order.ids(20, 26)


def test_extra_passes_repeat_a_sample_in_a_batch_only_across_a_pass_boundary():
    """An epoch of 5 passes (fine-tuning on a label fraction) with a block larger than a pass."""
    order = EpochOrder([100] * 10, seed=0, epoch=0, block=4096, length=5000)
    ids = order.ids(0, 5000)
    for k in range(5):  # each pass is a permutation of the data
        assert sorted(ids[k * 1000 : (k + 1) * 1000].tolist()) == list(range(1000))
    with_repeats = [g for g in range(5000 // 128) if len(set(ids[g * 128 : (g + 1) * 128].tolist())) < 128]
    assert all(g * 128 // 1000 != ((g + 1) * 128 - 1) // 1000 for g in with_repeats)  # only straddling batches


def test_global_batches_are_cut_in_rank_order():
    assert batches_left(100, 0, 4, 8) == 3 and batches_left(100, 32, 4, 8) == 2 and batches_left(100, 96, 4, 8) == 0
    assert batches_left(10, 20, 1, 1) == 0
    assert rank_slice(0, 0, 4, 8, 0) == (0, 8) and rank_slice(0, 0, 4, 8, 3) == (24, 32)
    assert rank_slice(40, 2, 4, 8, 1) == (40 + 64 + 8, 40 + 64 + 16)


def simulate(counts, world: int, batch: int, workers: int, start: int = 0, seed: int = 0, block: int = 1 << 16):
    """Every (rank, worker)'s batches of one epoch from ``start``, dealt as the loader deals them:
    the rank's k-th batch is worker k % workers' (returns {(rank, worker): [ids, ...]})."""
    order = EpochOrder(counts, seed, 0, block)
    out: dict[tuple[int, int], list[np.ndarray]] = {}
    for g in range(batches_left(order.length, start, world, batch)):
        for r in range(world):
            out.setdefault((r, g % workers), []).append(order.ids(*rank_slice(start, g, world, batch, r)))
    return order, out


@pytest.mark.slow
def test_512_ranks_x_12_workers_on_100k_shards_see_every_sample_once():
    counts = uneven_counts(100_000, seed=1)  # ~9.5M samples
    world, batch, workers = 512, 64, 12
    order, dealt = simulate(counts, world, batch, workers, block=1 << 18)
    per_rank = {r: sum(len(b) for w in range(workers) for b in dealt.get((r, w), [])) for r in range(world)}
    assert len(set(per_rank.values())) == 1  # equal batches on every rank
    seen = np.concatenate([b for batches in dealt.values() for b in batches])
    used = batches_left(order.length, 0, world, batch) * world * batch
    assert len(seen) == used and np.bincount(seen).max() == 1  # no sample twice in the epoch
    assert order.length - used < world * batch  # only the drop-last tail is unseen
    # no local batch holds a sample twice, no global batch either
    assert all(len(np.unique(b)) == batch for batches in dealt.values() for b in batches)


def test_64_ranks_x_12_workers_no_false_negatives_no_unseen_pairs():
    """The issue's measurement at 64 ranks x 12 workers: 9.1% repeats and ~9% unseen before."""
    counts = uneven_counts(3000, seed=2)
    world, batch, workers = 64, 32, 12
    order, dealt = simulate(counts, world, batch, workers, block=4096)
    seen = np.concatenate([b for batches in dealt.values() for b in batches])
    repeats_in_batch = sum(batch - len(np.unique(b)) for batches in dealt.values() for b in batches)
    assert repeats_in_batch == 0
    assert np.bincount(seen).max() == 1 and order.length - len(seen) < world * batch


def test_resume_on_another_world_size_continues_the_same_order():
    """16 ranks stop mid-epoch, 32 resume at that sample, then 8: each sample once in the epoch."""
    counts = uneven_counts(400, seed=3)
    batch, block = 4, 1000
    order = EpochOrder(counts, 0, 0, block)
    seen, sample = [], 0
    for world, n_batches in ((16, 37), (32, 21), (8, None)):
        n = batches_left(order.length, sample, world, batch) if n_batches is None else n_batches
        for g in range(n):
            for r in range(world):
                seen.append(order.ids(*rank_slice(sample, g, world, batch, r)))
        sample += n * world * batch
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == len(seen)  # nothing twice
    assert np.array_equal(seen, order.ids(0, len(seen)))  # exactly the uninterrupted order's prefix
    assert order.length - len(seen) < 8 * batch  # only the last world's drop-last tail is unseen


def test_crops_depend_on_seed_epoch_and_sample_only():
    ids = np.arange(10_000)
    a = crop_fractions(ids, seed=5, epoch=2)
    assert a.shape == (10_000, 2) and 0 <= a.min() and a.max() < 1
    assert abs(a.mean() - 0.5) < 0.01 and abs(np.corrcoef(a[:, 0], a[:, 1])[0, 1]) < 0.05  # uniform, y and x apart
    assert np.array_equal(crop_fractions(ids[::-1], 5, 2), a[::-1])  # per sample, whatever the batch order
    assert not np.allclose(crop_fractions(ids, 5, 3), a) and not np.allclose(crop_fractions(ids, 6, 2), a)


def test_splitmix64_is_the_reference_mix_and_wraps_silently():
    """SplitMix64 seeded 0 starts 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F.

    The k-th output mixes k x the golden gamma; a numpy scalar overflows with a warning unless the
    mix silences it itself (warnings are errors here).
    """
    import warnings

    from dsl.data.dealing import _splitmix64

    gamma = 0x9E3779B97F4A7C15
    want = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    states = np.array([k * gamma % 2**64 for k in range(3)], dtype=np.uint64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [int(v) for v in _splitmix64(states)] == want
        assert [int(_splitmix64(np.uint64(s))) for s in states] == want


def test_crop_fractions_are_pinned_and_use_the_whole_seed():
    assert crop_fractions(np.array([0, 1, 2]), 7, 3).tolist() == [
        [0.5895855936384568, 0.95876531523445], [0.9992669730831392, 0.8832172285514903],
        [0.6198731235689589, 0.30418170784250265]]
    ids = np.arange(4)
    by_seed = {s: crop_fractions(ids, s, 0).tolist() for s in (0, 2, 5)}
    assert len({str(v) for v in by_seed.values()}) == 3  # not only the seed's parity
    assert crop_fractions(ids, 2**64 + 5, 0).tolist() == by_seed[5]  # seeds are taken modulo 2^64


def test_empty_and_degenerate_orders():
    for counts in ([], [0, 0]):
        with pytest.raises(ValueError) as e:
            EpochOrder(counts, 0, 0, 4)
        assert str(e.value) == "an epoch order needs at least one sample"
    empty = EpochOrder([3, 2], 0, 0, 4, length=0)  # an epoch of no sample is allowed
    for order in (empty, EpochOrder([3, 2], 0, 0, 4), EpochOrder([3, 2], 0, 0, 4, members=np.array([1, 4, 6, 7, 9]))):
        got = order.ids(0, 0)
        assert got.dtype == np.int64 and got.shape == (0,)
    assert EpochOrder([3, 2], 0, 0, 4).ids(5, 5).shape == (0,)


def test_a_short_epoch_shuffles_only_its_own_positions():
    """samples_per_epoch below the data: the last block is cut at the epoch's end, then shuffled."""
    for seed in range(8):
        order = EpochOrder([20], seed, 0, 8, length=12)  # one shard: laid-out position = id
        assert sorted(order.ids(0, 12).tolist()) == list(range(12)), seed


def test_each_extra_pass_is_shuffled_anew_and_read_across_its_boundary():
    one = EpochOrder([16], 0, 0, 16, length=32)  # one shard, one block per pass
    assert one.ids(0, 16).tolist() != one.ids(16, 32).tolist()
    two = EpochOrder([5, 3], 0, 0, 4, length=20)
    assert two.ids(0, 20).tolist() == two.ids(0, 8).tolist() + two.ids(8, 16).tolist() + two.ids(16, 20).tolist()
    assert two.ids(6, 10).tolist() == EpochOrder([5, 3], 0, 0, 4, length=20).ids(0, 20)[6:10].tolist()
