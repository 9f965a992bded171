"""The bad-sample budget: what it counts and where it stops a job."""

from __future__ import annotations

import pytest

from dsl.contracts.errors import JobFailed
from dsl.data.bad_samples import BadSampleBudget, TooManyBadSamples


def test_counts_planned_bad_and_skipped_per_batch():
    budget = BadSampleBudget(0.01, 1000)
    budget.add({"key": ["a", "b", "c"], "bad": 1, "skipped": 0})
    budget.add({"key": ["d", "e", "f"], "bad": 0, "skipped": 2})
    budget.add({"key": ["g"]})  # evaluation-style batch: nothing replaced
    assert budget.counts() == [7.0, 1.0, 2.0]


def test_the_limit_is_of_an_epoch_at_least_then_of_all_read():
    budget = BadSampleBudget(0.01, 1000)
    budget.check(64, 10, 0)  # 10 bad in the first batch: within 1% of the epoch's 1000
    budget.check(64, 5, 5)  # exactly the limit: goes on
    with pytest.raises(TooManyBadSamples) as e:
        budget.check(64, 6, 5)
    assert str(e.value) == ("11 of 64 samples read were dropped (6 bad: digest, decoding or values; 5 of unreadable "
                            "shards), more than data.max_bad_fraction 0.01 of 1000; the warnings name the shards")
    assert isinstance(e.value, JobFailed) and e.value.exit_code == 1
    budget.check(5000, 50, 0)  # later epochs: 1% of everything read
    with pytest.raises(TooManyBadSamples, match="51 of 5000 samples"):
        budget.check(5000, 51, 0)


def test_zero_tolerance_and_full_tolerance():
    BadSampleBudget(0.0, 100).check(100, 0, 0)
    with pytest.raises(TooManyBadSamples):
        BadSampleBudget(0.0, 100).check(100, 1, 0)
    BadSampleBudget(1.0, 100).check(100, 60, 40)
