"""How many bad samples a job tolerates: ``data.max_bad_fraction``.

The loader drops a sample that fails a check (digest, decoding, shape, non-finite or
out-of-range values: "bad") or whose shard cannot be read ("skipped"), and puts a good stand-in
in its place; each training batch says how many it replaced. A job counts them with a
:class:`BadSampleBudget` and, at its log steps, checks the counts of all ranks together (so
every rank stops at the same step, with the same message).
"""

from __future__ import annotations

from dsl.contracts.errors import JobFailed


class TooManyBadSamples(JobFailed):
    """More samples were dropped than ``data.max_bad_fraction`` allows."""


class BadSampleBudget:
    """Counts the samples a rank planned to read and those it dropped.

    Args:
        max_fraction: ``data.max_bad_fraction``.
        epoch_samples: Samples of one epoch: the fraction is of at least that many, so a few
            bad samples met early in a run do not stop it, while a damaged share of the dataset
            larger than the limit does, within its first epoch.
    """

    def __init__(self, max_fraction: float, epoch_samples: int):
        self.max_fraction, self.epoch_samples = max_fraction, epoch_samples
        self.planned = self.bad = self.skipped = 0

    def add(self, batch: dict) -> None:
        """Count one batch's samples and what it replaced."""
        self.planned += len(batch["key"])
        self.bad += int(batch.get("bad", 0))
        self.skipped += int(batch.get("skipped", 0))

    def counts(self) -> list[float]:
        """``[planned, bad, skipped]`` of this rank, to sum over ranks."""
        return [float(self.planned), float(self.bad), float(self.skipped)]

    def check(self, planned: float, bad: float, skipped: float) -> None:
        """Stop when the dropped samples of all ranks exceed the limit.

        Args:
            planned: Samples all ranks planned to read (sum over ranks of :meth:`counts`).
            bad: Of them, dropped as bad.
            skipped: Of them, dropped with their unreadable shards.

        Raises:
            TooManyBadSamples: ``bad + skipped > max_fraction x max(planned, epoch_samples)``.
        """
        dropped = bad + skipped
        if dropped > self.max_fraction * max(planned, self.epoch_samples):
            raise TooManyBadSamples(
                f"{int(dropped)} of {int(planned)} samples read were dropped ({int(bad)} bad: digest, decoding or "
                f"values; {int(skipped)} of unreadable shards), more than data.max_bad_fraction "
                f"{self.max_fraction:g} of {max(int(planned), self.epoch_samples)}; the warnings name the shards"
            )
