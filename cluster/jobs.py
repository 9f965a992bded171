"""Submitting ``dsl`` commands to a Ray cluster through the Jobs API."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from dsl.contracts.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
# What a job's working directory need not carry: data, runs, environments, caches, mutmut's copies.
EXCLUDES = [".venv", "work", ".git", ".cache", "**/__pycache__", ".pytest_cache", "*.db", "mlruns", ".whl", ".gl",
            "mutants"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, or a RuntimeError for a non-dashboard address
        raise ConnectionError(f"cannot reach the Ray Jobs API at {address}: {e}") from None


def submit(address: str, args: list[str], submission_id: str | None = None, ship_code: bool = True,
           env: dict[str, str] | None = None) -> str:
    """Submit ``dsl <args>`` to the Ray cluster at ``address``; returns the submission id.

    ``address`` is the cluster's dashboard URL, e.g. http://head:8265. A head that is up but
    whose job agent is not yet is retried for up to a minute.

    Args:
        address: Ray dashboard / Jobs API URL.
        args: The ``dsl`` command line after ``dsl`` (e.g. ["pretrain", "--config", "..."]).
        submission_id: Idempotency key: submitting the same id twice fails instead of
            running twice (the scheduler uses one per slot).
        ship_code: Upload this repository as the job's working directory (else the cluster
            must have DSL installed).
        env: Extra environment variables for the job. Object-storage credentials are not
            sent: the cluster's nodes have their own (environment, instance role), and a job's
            runtime environment is readable by everyone with access to the dashboard.
    """
    runtime_env: dict = {"env_vars": dict(env or {})}
    if ship_code:
        runtime_env["working_dir"] = str(REPO)
        runtime_env["excludes"] = EXCLUDES
    entrypoint = "python -m dsl.cli " + " ".join(shlex.quote(a) for a in args)
    client = _client(address)
    deadline = time.time() + 60
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
        except RuntimeError as e:
            # a freshly started head answers before its job agent is up: transient
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1)


def wait(address: str, submission_id: str, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
    """Block until the job ends; returns its final status (SUCCEEDED, FAILED or STOPPED)."""
    client = _client(address)
    deadline = time.time() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL:
            return status
        if time.time() > deadline:
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def logs(address: str, submission_id: str) -> str:
    """Return the job's driver log so far, as one string."""
    return _client(address).get_job_logs(submission_id)


def status(address: str, submission_id: str) -> str:
    """Return the job's current status name (PENDING, RUNNING, SUCCEEDED, FAILED, ...)."""
    return str(_client(address).get_job_status(submission_id).value)


def dsl_args(rest: list[str]) -> list[str]:
    """The dsl command line after ``--``.

    Raises:
        ConfigError: Nothing after ``--``.
    """
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if not rest:
        raise ConfigError("give the dsl command to run after --, e.g. -- pretrain --config configs/pretrain/paper.yaml")
    return rest


def command(cfg, args) -> int:
    """``dsl submit``: submit the command after ``--``; with ``--wait``, its logs and exit status."""
    sid = submit(args.address, dsl_args(args.command_line), submission_id=args.id, ship_code=not args.no_ship_code)
    print(f"submitted {sid} to {args.address}")
    if not args.wait:
        return 0
    final = wait(args.address, sid)
    print(logs(args.address, sid)[-4000:])
    print(f"{sid}: {final}")
    return 0 if final == "SUCCEEDED" else 1
