"""``dsl submit --wait`` streams a job's log and exits with its status; ``dsl jobs list|status|logs|stop``."""

from __future__ import annotations

import io
import shlex
import threading
import time
import uuid
from collections.abc import Callable

import pytest

import dsl.cli as cli
from cluster import jobs
from dsl.contracts.errors import UserError


@pytest.fixture
def dsl() -> Callable[..., int]:
    return lambda *argv: cli.main(list(argv))


def until(condition: Callable[[], object], what: str, timeout_s: float = 120):
    deadline = time.time() + timeout_s
    while not (value := condition()):
        if time.time() > deadline:
            raise AssertionError(f"no {what} after {timeout_s:.0f} s")
        time.sleep(0.2)
    return value


# -- fast: what is read out of a log, how a job is shown ------------------------------------------

def test_results_prefers_the_lines_a_job_prints_for_people():
    log = "step 1\nmlflow run: http://mlflow:5000/#/experiments/1/runs/abc\nregistered model dsl-dual version 3\n"
    assert jobs.results(log) == ["mlflow run: http://mlflow:5000/#/experiments/1/runs/abc",
                                 "registered model dsl-dual version 3"]


def test_results_reads_pretrains_summary_and_evaluates_run_line():
    summary = '{\n "run_id": "4f2a9c",\n "job": "paper",\n "step": 12,\n "model_version": "7"\n}\n'
    assert jobs.results("loss 0.3\n" + summary) == ["mlflow run: 4f2a9c", "model version: 7"]
    assert jobs.results("table\nMLflow run 9e1 (6 fine-tuning runs)\n") == ["mlflow run: 9e1"]
    assert jobs.results("wrote 2 synthetic sen12ms locations to /tmp/x\n") == []


def test_exit_codes_and_short_entrypoints():
    assert jobs.EXIT_CODES == {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
    assert jobs._short(jobs.ENTRYPOINT + "synth --out /tmp/x") == "dsl synth --out /tmp/x"
    long = jobs._short(jobs.ENTRYPOINT + "pretrain " + "x" * 200)
    assert len(long) == 60 and long.endswith("...")
    assert jobs._short("python -c 'print(1)'") == "python -c 'print(1)'"


def test_an_unknown_job_is_a_user_error():
    e = jobs._missing(RuntimeError("Request failed with status code 404: Job nope does not exist."), "nope", "http://h")
    assert isinstance(e, UserError) and str(e) == "no job 'nope' on http://h"
    other = RuntimeError("Request failed with status code 500")
    assert jobs._missing(other, "x", "http://h") is other


def test_jobs_needs_an_id_but_for_list(dsl, capsys):
    assert dsl("jobs", "logs", "--address", "http://127.0.0.1:9") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a submission id" in err


# -- slow: against a real head ---------------------------------------------------------------------

class Lines(io.TextIOBase):
    """A stream whose text a test can watch while another thread writes it."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


@pytest.mark.slow
def test_follow_streams_the_log_while_the_job_runs(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    go = tmp_path / "go"
    # printed as two words: Ray's log repeats the entrypoint, whose text must not match
    script = (f"import os, time\nprint('job', 'started', flush=True)\n"
              f"while not os.path.exists({str(go)!r}): time.sleep(0.1)\nprint('job', 'done', flush=True)\n")
    sid = JobSubmissionClient(ray_head).submit_job(entrypoint=f"python -c {shlex.quote(script)}")
    out, result = Lines(), {}
    follower = threading.Thread(target=lambda: result.update(final=jobs.follow(ray_head, sid, out=out)))
    follower.start()
    try:
        until(lambda: "job started" in out.text, "first line streamed")
        # streamed while the job still runs: it cannot end before the file exists
        assert jobs.status(ray_head, sid) == "RUNNING" and "job done" not in out.text
    finally:
        go.touch()
        follower.join(timeout=300)
    assert result["final"] == "SUCCEEDED"
    assert out.text.count("job started") == 1 and out.text.count("job done") == 1  # each line once


@pytest.mark.slow
def test_submit_wait_exits_with_the_jobs_status_and_jobs_show_it(ray_head, tmp_path, dsl, capsys):
    ok, bad = f"ok-{uuid.uuid4().hex[:8]}", f"bad-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "synth"
    assert dsl("submit", "--address", ray_head, "--id", ok, "--wait", "--", "synth", "--out", str(out),
               "--locations", "2", "--size", "16") == 0
    shown = capsys.readouterr().out
    assert f"wrote 2 synthetic sen12ms locations to {out}" in shown and shown.rstrip().endswith(f"{ok}: SUCCEEDED")

    assert dsl("submit", "--address", ray_head, "--id", bad, "--wait", "--", "ingest", "--source", "sen12ms",
               "--input", "/nonexistent", "--output", str(tmp_path / "o")) == 1
    shown = capsys.readouterr().out
    assert "does not exist" in shown and f"{bad}: FAILED" in shown

    assert dsl("jobs", "list", "--address", ray_head) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == ["id", "status", "start", "(UTC)", "entrypoint"]
    row = next(line for line in listed if line.startswith(ok + " "))
    assert "SUCCEEDED" in row and "dsl synth --out" in row
    assert any(line.startswith(bad + " ") and "FAILED" in line for line in listed)

    assert dsl("jobs", "status", bad, "--address", ray_head) == 0
    assert capsys.readouterr().out.startswith(f"{bad}: FAILED")
    assert dsl("jobs", "logs", ok, "--address", ray_head) == 0
    assert f"wrote 2 synthetic sen12ms locations to {out}" in capsys.readouterr().out
    assert dsl("jobs", "logs", bad, "--follow", "--address", ray_head) == 1  # an ended job: its log, its status


@pytest.mark.slow
def test_jobs_stop_stops_a_running_job(ray_head, dsl, capsys):
    from ray.job_submission import JobSubmissionClient

    script = "import time\nprint('u' + 'p', 'now', flush=True)\ntime.sleep(600)\n"
    sid = JobSubmissionClient(ray_head).submit_job(entrypoint=f"python -c {shlex.quote(script)}")
    until(lambda: "up now" in jobs.logs(ray_head, sid), "running job")
    assert dsl("jobs", "stop", sid, "--address", ray_head) == 0
    assert capsys.readouterr().out.strip() == f"{sid}: stopping"
    until(lambda: jobs.status(ray_head, sid) == "STOPPED", "stopped job", timeout_s=60)
    assert dsl("jobs", "logs", sid, "--address", ray_head, "--follow") == 130
    assert capsys.readouterr().out.rstrip().endswith(f"{sid}: STOPPED")
    assert dsl("jobs", "stop", sid, "--address", ray_head) == 0  # again: said, not an error
    assert capsys.readouterr().out.strip() == f"{sid}: not running (STOPPED)"


@pytest.mark.slow
@pytest.mark.parametrize("action", ["status", "logs", "stop"])
def test_an_unknown_job_id_is_one_line(ray_head, dsl, capsys, action):
    assert dsl("jobs", action, "no-such-job", "--address", ray_head) == 2
    captured = capsys.readouterr()
    assert captured.err == f"dsl jobs: error: no job 'no-such-job' on {ray_head}\n" and captured.out == ""
