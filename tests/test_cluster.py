"""Jobs reach a real Ray cluster: `ray start --head` on 127.0.0.1 and the Jobs API."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from services import free_port

from cluster import jobs
from cluster.schedule import run_schedule, slot_id
from dsl.cli import main as cli

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head():
    """A head node of our own; stopped by killing exactly its processes (never `ray stop`)."""
    temp = tempfile.mkdtemp(prefix="dslhead-", dir="/tmp")
    port, dash = free_port(), free_port()
    # as on a real cluster, the head's `python` is the environment DSL's dependencies live in
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    marker = f"dsl-test-head-{os.getpid()}-{port}"  # inherited by every process the head starts
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "DSL_TEST_RAY_HEAD": marker}
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
                    # free ports, not Ray's fixed defaults: another Ray on this machine must not collide
                    "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                    "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                    "--num-cpus", "2", "--temp-dir", temp, "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(address + "/api/version", timeout=2)
            break
        except OSError:
            assert time.time() < deadline, "Ray dashboard did not come up"
            time.sleep(0.5)
    yield address
    mine = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("DSL_TEST_RAY_HEAD") == marker:
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    for p in mine:
        p.terminate()
    _, alive = psutil.wait_procs(mine, timeout=5)
    for p in alive:
        p.kill()


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
