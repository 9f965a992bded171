"""Reading shards for training: manifest, normalisation and the streaming pair loader."""

from dsl.data.manifest import read_manifest, select_shards, shard_urls, split_samples
from dsl.data.normalise import BandTransform, Normaliser
from dsl.data.pairs import PairStream, assign_slots, batches_per_epoch, make_loader

__all__ = [
    "BandTransform",
    "Normaliser",
    "PairStream",
    "assign_slots",
    "batches_per_epoch",
    "make_loader",
    "read_manifest",
    "select_shards",
    "shard_urls",
    "split_samples",
]
