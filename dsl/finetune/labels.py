"""Which labelled samples a fine-tuning run may use: a class-balanced, seeded label fraction.

The training split's labels are read once (only the small ``cls`` members, by seeking past the
arrays). Per class ``c`` with ``n_c`` samples, ``round(fraction * n_c)`` (at least one) are
kept, the first ones of a permutation seeded by ``(seed, c)`` over the class's keys in sorted
order. So the choice depends only on the keys, the seed and the fraction (never on shard
layout, workers or read order), and fractions are nested: with one seed the 1% subset lies
inside the 10% one. The stratum is the single-label class (the multi-hot always contains it:
a majority class covers >= 1/8 of the valid pixels), for both tasks; samples without a valid
pixel (class 255) have no label and are never selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsl.contracts.manifest import Manifest, read_manifest, select_shards
from dsl.contracts.shard_format import IGNORE
from dsl.contracts.storage import join, register_webdataset_handlers
from dsl.data.pairs import read_shard


@dataclass
class LabelTable:
    """The training split's single-label classes: ``keys[i]`` lives in shard ``shards[i]``."""

    keys: list[str]
    shards: list[str]
    cls: np.ndarray  # int64 [N]


def read_labels(shards_url: str, split: str | None, manifest: Manifest | None = None) -> LabelTable:
    """Read every sample's ``cls`` of ``split`` (None: all shards).

    Raises:
        ValueError: A sample has no ``cls`` member or an unreadable one (names shard and key).
    """
    register_webdataset_handlers()
    manifest = manifest if manifest is not None else read_manifest(shards_url)
    keys, names, cls = [], [], []
    for shard in select_shards(manifest, split):
        url = join(shards_url, shard.name)
        for sample in read_shard(url, ("cls",)):
            if "cls" not in sample:
                raise ValueError(f"{url}: sample {sample['__key__']!r} has no cls member: not labelled shards")
            try:
                cls.append(int(sample["cls"].decode("ascii").strip()))
            except (UnicodeDecodeError, ValueError):
                raise ValueError(f"{url}: sample {sample['__key__']!r}: cls is not a decimal integer") from None
            keys.append(sample["__key__"])
            names.append(shard.name)
    return LabelTable(keys, names, np.asarray(cls, dtype=np.int64))


def select_fraction(table: LabelTable, fraction: float, seed: int) -> dict[str, list[str]]:
    """The selected keys per shard name (the loader's ``keys``), each list sorted.

    Raises:
        ValueError: ``fraction`` outside (0, 1] or no labelled sample at all.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    keys = np.asarray(table.keys, dtype=object)
    chosen: list[int] = []
    for c in np.unique(table.cls):
        if c == IGNORE:
            continue
        idx = np.flatnonzero(table.cls == c)
        idx = idx[np.argsort(keys[idx].astype(str), kind="stable")]
        k = max(1, int(np.floor(fraction * len(idx) + 0.5)))  # round half up, unlike round()
        perm = np.random.default_rng([seed, int(c)]).permutation(len(idx))
        chosen += idx[perm[:k]].tolist()
    if not chosen:
        raise ValueError("no labelled sample to select: every class is the ignore value 255")
    out: dict[str, list[str]] = {}
    for i in sorted(chosen, key=lambda i: table.keys[i]):
        out.setdefault(table.shards[i], []).append(table.keys[i])
    return out


def class_counts(table: LabelTable, selection: dict[str, list[str]] | None = None) -> dict[int, int]:
    """Samples per class (255 included) in the table or in a selection of it."""
    cls = table.cls
    if selection is not None:
        wanted = {k for keys in selection.values() for k in keys}
        cls = cls[[k in wanted for k in table.keys]]
    values, counts = np.unique(cls, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts, strict=True)}
