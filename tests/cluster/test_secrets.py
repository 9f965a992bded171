"""Credentials never leave the environment they are in: a submission carries none.

A canary secret planted in the submitting process's environment only must appear nowhere the
cluster keeps or shows jobs: the Jobs API, ``ray job list``, any file under the head's temp
folder (logs, runtime_env_agent.log, the uploaded working directory, GCS tables), and the
submitting command's own output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
from fixtures.services import RAY, REPO

from cluster import jobs

SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")


class FakeClient:
    """Records what a submission hands to Ray's Jobs API."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def submit_job(self, **kwargs) -> str:
        self.calls.append(kwargs)
        return kwargs.get("submission_id") or "raysubmit_fake"


def test_a_submission_sends_no_environment(monkeypatch):
    canary = f"dsl-canary-{uuid.uuid4().hex}"
    for name in SECRETS:
        monkeypatch.setenv(name, canary)
    fake = FakeClient()
    monkeypatch.setattr(jobs, "_client", lambda address: fake)
    for ship_code in (True, False):
        jobs.submit("http://head:8265", ["synth", "--out", "/tmp/x"], submission_id="s", ship_code=ship_code)
    assert len(fake.calls) == 2
    for call in fake.calls:
        assert "env_vars" not in (call.get("runtime_env") or {}) and "metadata" not in call, call
        assert canary not in repr(call)
    assert fake.calls[0]["runtime_env"]["working_dir"] == str(REPO) and fake.calls[1]["runtime_env"] is None


def test_secret_files_stay_out_of_the_working_directory():
    assert {".env", ".env.*", "*.pem", ".aws"} <= set(jobs.EXCLUDES)


def head_temp_dir(address: str) -> Path:
    """The ``--temp-dir`` of the head serving ``address`` (its dashboard process names it)."""
    port = urlparse(address).port
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            for arg in psutil.Process(c.pid).cmdline():
                if arg.startswith("--temp-dir="):
                    return Path(arg.split("=", 1)[1])
    raise AssertionError(f"no process serving {address} names its --temp-dir")


def files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            try:
                if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:  # a socket, or a file gone meanwhile
                pass
    return hits


@pytest.mark.slow
def test_a_secret_of_the_submitter_appears_nowhere_on_the_cluster(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    canary = f"dsl-canary-{uuid.uuid4().hex}"
    # in the submitting process's environment only (the head was started without it)
    env = {**os.environ, **dict.fromkeys(SECRETS, canary), "DSL_TEST_CANARY": canary}
    out = tmp_path / "synth"
    sid = f"secret-{uuid.uuid4().hex[:8]}"
    done = subprocess.run([sys.executable, "-m", "dsl.cli", "submit", "--address", ray_head, "--id", sid, "--wait",
                           "--", "synth", "--out", str(out), "--locations", "2", "--size", "16"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list(out.rglob("*.tif"))) == 6  # the job ran: s1, s2, lc for 2 locations
    assert canary not in done.stdout + done.stderr

    client = JobSubmissionClient(ray_head)
    answers = [j.model_dump() for j in client.list_jobs()] + [client.get_job_info(sid).model_dump()]
    record = json.dumps(answers, default=str)
    assert sid in record and canary not in record
    listed = subprocess.run([RAY, "job", "list", "--address", ray_head], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and sid in listed.stdout, listed.stderr[-2000:]
    assert canary not in listed.stdout + listed.stderr

    temp = head_temp_dir(ray_head)
    assert files_holding(temp, sid.encode()), f"the walk of {temp} misses the job's own files"
    assert files_holding(temp, canary.encode()) == []
