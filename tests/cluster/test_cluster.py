"""Jobs reach a real Ray cluster: `ray start --head` on 127.0.0.1 and the Jobs API."""

from __future__ import annotations

import os

import pytest

from cluster import jobs
from cluster.schedule import run_schedule, slot_id
from dsl.cli import main as cli

pytestmark = pytest.mark.slow  # a Ray head of our own


def test_submit_runs_a_dsl_command_on_the_cluster(ray_head, tmp_path, capsys):
    out = tmp_path / "synth"
    rc = cli(["submit", "--address", ray_head, "--wait", "--", "synth", "--out", str(out), "--layout", "dfc2020",
              "--locations", "2", "--size", "16"])
    assert rc == 0, capsys.readouterr().out[-3000:]
    assert len(list(out.rglob("*.tif"))) == 8  # s1, s2, dfc, lc for 2 locations


def test_failed_job_is_reported(ray_head):
    sid = jobs.submit(ray_head, ["ingest", "--source", "sen12ms", "--input", "/nonexistent", "--output", "/tmp/x"])
    assert jobs.wait(ray_head, sid, timeout_s=300) == "FAILED"
    assert "does not exist" in jobs.logs(ray_head, sid)


def test_schedule_submits_each_slot_once(ray_head, tmp_path):
    name = f"nightly{os.getpid()}"
    ids = run_schedule(ray_head, name, ["synth", "--out", str(tmp_path / "s"), "--locations", "1", "--size", "16"],
                       every_s=2, max_runs=2, log=lambda _: None)
    assert len(ids) == 2 and len(set(ids)) == 2 and all(i.startswith(name) for i in ids)
    for sid in ids:
        assert jobs.wait(ray_head, sid, timeout_s=300) in ("SUCCEEDED",)
    # a second scheduler for a slot already taken does not run it again
    with pytest.raises(RuntimeError, match="already"):
        jobs.submit(ray_head, ["synth", "--out", str(tmp_path / "t")], submission_id=ids[0])
    assert slot_id("n", 7205, 3600) == "n-7200"


def test_unreachable_cluster_is_a_clear_error():
    with pytest.raises(ConnectionError, match="cannot reach the Ray Jobs API at http://127.0.0.1:9"):
        jobs.submit("http://127.0.0.1:9", ["synth"])
