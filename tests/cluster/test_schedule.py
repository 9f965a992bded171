"""The scheduler's slot logic on a simulated clock: one submission per slot, none while the
previous job still runs. (Submission itself is tested against a real head in test_cluster.py.)"""

from __future__ import annotations

import pytest

from cluster import jobs
from cluster.schedule import run_schedule, slot_id


class FakeCluster:
    """Jobs API stand-in: each submitted job runs for ``runs_for`` seconds of the fake clock."""

    def __init__(self, runs_for: float):
        self.now, self.runs_for, self.started = 0.0, runs_for, {}

    def clock(self) -> float:
        self.now += 2.5  # every look at the clock moves time on: no real waiting
        return self.now

    def submit(self, address, args, submission_id=None, ship_code=True):
        assert submission_id not in self.started, "a slot was submitted twice"
        self.started[submission_id] = self.now
        return submission_id

    def status(self, address, submission_id):
        return "RUNNING" if self.now - self.started[submission_id] < self.runs_for else "SUCCEEDED"


@pytest.mark.parametrize("runs_for, skipped", [(1.0, 0), (12.0, 2)])
def test_a_running_job_makes_the_next_slot_skip(monkeypatch, runs_for, skipped):
    fake = FakeCluster(runs_for)
    monkeypatch.setattr(jobs, "submit", fake.submit)
    monkeypatch.setattr(jobs, "status", fake.status)
    lines: list[str] = []
    ids = run_schedule("http://head:8265", "nightly", ["synth"], every_s=10, max_runs=3, clock=fake.clock,
                       log=lines.append)
    assert ids == list(fake.started) and len(ids) == 3
    assert len({i.rsplit("-", 1)[1] for i in ids}) == 3  # three distinct slots
    assert sum("skipped" in line for line in lines) == skipped, lines
    if skipped:
        assert "is still running" in next(line for line in lines if "skipped" in line)


def test_slot_ids_are_the_interval_start():
    assert slot_id("n", 3599.9, 3600) == "n-0" and slot_id("n", 3600, 3600) == "n-3600"
