"""Label fractions: reproducible from the seed, class-balanced, nested; and the loader's key filter."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fixtures.shards import cfg_for, keys_of, write_dataset

from dsl.data import batches_per_epoch, make_loader
from dsl.finetune.labels import class_counts, read_labels, select_fraction

# class of sample i: 40 x class 0, 20 x 1, 10 x 2, 3 x 5, 2 x 255 (no valid pixel), interleaved
CLASSES = np.random.default_rng(5).permutation([0] * 40 + [1] * 20 + [2] * 10 + [5] * 3 + [255] * 2)


def _labelled(root: Path, sizes: list[int]) -> str:
    def relabel(idx: int, members: list) -> list:
        return [(n, str(CLASSES[idx]).encode() if n.endswith(".cls") else d) for n, d in members]

    return write_dataset(root, sizes, split="train", labels=True, size=16, members=relabel)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return _labelled(tmp_path_factory.mktemp("labels") / "a", [30, 25, 20])


def test_read_labels(shards):
    table = read_labels(shards, "train")
    assert table.keys == [f"loc{i:04d}" for i in range(75)]
    assert table.cls.tolist() == CLASSES.tolist()
    assert table.shards[0] == "pairs-train-000000.tar" and table.shards[-1] == "pairs-train-000002.tar"


def test_fraction_is_class_balanced_and_reproducible(shards, tmp_path):
    table = read_labels(shards, "train")
    sel = select_fraction(table, 0.1, seed=0)
    # round(0.1 * n_c), at least 1; the ignore class is never selected
    assert class_counts(table, sel) == {0: 4, 1: 2, 2: 1, 5: 1}
    assert class_counts(table, select_fraction(table, 0.5, seed=0)) == {0: 20, 1: 10, 2: 5, 5: 2}
    assert sel == select_fraction(table, 0.1, seed=0)
    others = [select_fraction(table, 0.1, seed=s) for s in (1, 2, 3)]
    assert all(o != sel for o in others)
    flat = {k for keys in sel.values() for k in keys}
    assert flat <= {k for keys in select_fraction(table, 0.5, seed=0).values() for k in keys}  # nested
    everything = select_fraction(table, 1.0, seed=7)
    assert sum(map(len, everything.values())) == 73  # all but the two unlabelled samples
    # the choice depends on keys and seed only, not on how the samples are sharded
    other = read_labels(_labelled(tmp_path / "b", [10, 10, 10, 10, 35]), "train")
    assert {k for keys in select_fraction(other, 0.1, seed=0).values() for k in keys} == flat
    with pytest.raises(ValueError, match=r"label fraction must be in \(0, 1\]"):
        select_fraction(table, 0.0, seed=0)


def test_loader_reads_only_selected_keys(shards):
    sel = select_fraction(read_labels(shards, "train"), 0.5, seed=3)
    n = sum(map(len, sel.values()))
    wanted = {k for keys in sel.values() for k in keys}
    cfg = cfg_for(shards, split="train", batch_size=4)
    assert batches_per_epoch(cfg, 2, keys=sel) == n // 8
    seen = Counter()
    for rank in (0, 1):
        batches = list(make_loader(cfg, rank, 2, labels=True, keys=sel))
        assert len(batches) == n // 8
        seen.update(keys_of(batches))
        for b in batches:  # each selected sample keeps its own label
            assert all(CLASSES[int(k[3:])] == c for k, c in zip(b["key"], b["cls"].tolist(), strict=True))
    assert set(seen) <= wanted  # (an epoch longer than the selection lays it out again: repeats allowed)
    evaluated = [k for rank in (0, 1) for k in keys_of(make_loader(cfg, rank, 2, train=False, keys=sel))]
    assert sorted(evaluated) == sorted(wanted)  # eval mode: every selected sample once
    one_shard = {"pairs-train-000001.tar": ["loc0031", "loc0040"]}
    assert sorted(keys_of(make_loader(cfg, 0, 1, train=False, keys=one_shard))) == ["loc0031", "loc0040"]
    with pytest.raises(ValueError, match=r"names shards \['nope.tar'\] that are not in split 'train'"):
        make_loader(cfg, 0, 1, keys={"nope.tar": ["x"]})
