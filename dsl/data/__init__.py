"""Reading shards for training: normalisation, augmentations and the streaming pair loader.

The manifest itself is a contract: :mod:`dsl.contracts.manifest`.
"""

from dsl.data.augment import augment
from dsl.data.normalise import BandTransform, Normaliser
from dsl.data.pairs import EvalStream, SampleStream, assign_slots, batches_per_epoch, make_loader
from dsl.data.stream import resume_stream, with_positions

__all__ = [
    "BandTransform",
    "Normaliser",
    "EvalStream",
    "SampleStream",
    "assign_slots",
    "augment",
    "batches_per_epoch",
    "make_loader",
    "resume_stream",
    "with_positions",
]
