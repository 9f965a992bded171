"""Submitting ``dsl`` commands to a Ray cluster through the Jobs API, and following them.

Nothing secret travels with a job: its runtime environment is the working directory only (no
``env_vars``, no metadata), because Ray shows both to everyone who reaches the dashboard (Jobs
API, ``ray job list``) and writes them into its logs (``runtime_env_agent.log``). The job's
processes take storage credentials from their own node's environment or instance role.

Exit codes of ``dsl submit --wait`` and ``dsl jobs logs --follow``: the job's final status,
SUCCEEDED 0, FAILED 1, STOPPED 130 (stopped on purpose, e.g. ``dsl jobs stop``: an
interruption, as Ctrl-C's 130, not a failure of the command); Ctrl-C while following stops
following only (the job goes on) and exits 130 too.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from dsl.contracts.config import ConfigError
from dsl.contracts.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# What a job's working directory need not carry: data, runs, environments, caches, mutmut's copies,
# and files that may hold secrets (the working directory is stored on the cluster, readable there).
EXCLUDES = [".venv", "work", ".git", ".cache", "**/__pycache__", ".pytest_cache", "*.db", "mlruns", ".whl", ".gl",
            "mutants", ".env", ".env.*", "*.pem", ".aws"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
ENTRYPOINT = "python -m dsl.cli "
# What a dsl job prints about its MLflow results: lines a job prints for people ("mlflow run: URL",
# "registered model ..."), else the keys of pretrain/finetune's JSON summary, evaluate's "MLflow run ID".
RESULT_LINE = re.compile(r"^\s*(mlflow run:|registered model).*$", re.IGNORECASE | re.MULTILINE)
RESULT_KEYS = {"run_id": "mlflow run", "model_version": "model version"}
EVALUATE_RUN = re.compile(r"^MLflow run (\w+) ", re.MULTILINE)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, or a RuntimeError for a non-dashboard address
        raise ConnectionError(f"cannot reach the Ray Jobs API at {address}: {e}") from None


def _missing(e: Exception, submission_id: str, address: str) -> Exception:
    """A one-line error for an unknown job id; any other error as it is."""
    if isinstance(e, RuntimeError) and ("404" in str(e) or "does not exist" in str(e)):
        return UserError(f"no job {submission_id!r} on {address}")
    return e


def submit(address: str, args: list[str], submission_id: str | None = None, ship_code: bool = True) -> str:
    """Submit ``dsl <args>`` to the Ray cluster at ``address``; returns the submission id.

    ``address`` is the cluster's dashboard URL, e.g. http://head:8265. A head that is up but
    whose job agent is not yet is retried for up to a minute. No environment variable is sent
    (see the module docstring): settings a job needs that are not secret go in its config.

    Args:
        address: Ray dashboard / Jobs API URL.
        args: The ``dsl`` command line after ``dsl`` (e.g. ["pretrain", "--config", "..."]).
        submission_id: Idempotency key: submitting the same id twice fails instead of
            running twice (the scheduler uses one per slot).
        ship_code: Upload this repository as the job's working directory (else the cluster
            must have DSL installed).
    """
    runtime_env: dict = {}
    if ship_code:
        runtime_env["working_dir"] = str(REPO)
        runtime_env["excludes"] = EXCLUDES
    entrypoint = ENTRYPOINT + " ".join(shlex.quote(a) for a in args)
    client = _client(address)
    deadline = time.time() + 60
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None,
                                     submission_id=submission_id)
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
    try:
        return _client(address).get_job_logs(submission_id)
    except RuntimeError as e:
        raise _missing(e, submission_id, address) from None


def status(address: str, submission_id: str) -> str:
    """Return the job's current status name (PENDING, RUNNING, SUCCEEDED, FAILED, ...)."""
    try:
        return str(_client(address).get_job_status(submission_id).value)
    except RuntimeError as e:
        raise _missing(e, submission_id, address) from None


def follow(address: str, submission_id: str, out: TextIO | None = None, poll_s: float = 1.0) -> str:
    """Write the job's log to ``out`` as it grows until the job ends; returns its final status.

    The log is streamed (Ray's ``tail_job_logs``); if that stream ends early (a dropped
    connection) the rest is polled. Either way the job's status is read before its log, so
    once the status is final the log written is complete.
    """
    out = out or sys.stdout
    client = _client(address)
    shown = 0

    def emit(text: str) -> None:
        nonlocal shown
        if text:
            out.write(text)
            out.flush()
            shown += len(text)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            emit(chunk)

    try:
        client.get_job_status(submission_id)  # an unknown id: one line, before any streaming
    except RuntimeError as e:
        raise _missing(e, submission_id, address) from None
    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - the stream closed or broke before the job ended: poll the rest below
        pass
    while True:
        final = str(client.get_job_status(submission_id).value)
        emit(client.get_job_logs(submission_id)[shown:])
        if final in TERMINAL:
            return final
        time.sleep(poll_s)


def results(log: str) -> list[str]:
    """What the job's log says about its MLflow run and registered model version, if anything."""
    found = [m.group(0).strip() for m in RESULT_LINE.finditer(log)]
    if found:
        return found
    for key, label in RESULT_KEYS.items():
        values = re.findall(rf'^\s*"{key}": "?([^",\s]+)"?,?\s*$', log, re.MULTILINE)
        if values:
            found.append(f"{label}: {values[-1]}")
    if not found:
        found = [f"mlflow run: {run}" for run in EVALUATE_RUN.findall(log)[-1:]]
    return found


def finish(address: str, submission_id: str, follower: Callable[[], str]) -> int:
    """Follow a job to its end, print its status and results; returns the exit code for it."""
    try:
        final = follower()
    except KeyboardInterrupt:
        print(f"\nstopped following {submission_id}; it goes on (dsl jobs stop {submission_id} --address "
              f"{address} stops it)")
        return 130
    print(f"{submission_id}: {final}")
    for line in results(logs(address, submission_id)):
        print(line)
    return EXIT_CODES[final]


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
    """``dsl submit``: submit the command after ``--``; with ``--wait``, stream its logs, exit with its status."""
    sid = submit(args.address, dsl_args(args.command_line), submission_id=args.id, ship_code=not args.no_ship_code)
    print(f"submitted {sid} to {args.address}", flush=True)
    if not args.wait:
        print(f"follow it: dsl jobs logs {sid} --follow --address {args.address}")
        return 0
    return finish(args.address, sid, lambda: follow(args.address, sid))


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _short(entrypoint: str, width: int = 60) -> str:
    text = entrypoint.removeprefix(ENTRYPOINT).replace("\n", " ")
    text = "dsl " + text if entrypoint.startswith(ENTRYPOINT) else text
    return text if len(text) <= width else text[:width - 3] + "..."


def list_jobs(address: str) -> list[dict]:
    """The cluster's jobs, oldest first: submission id, status, start time (UTC), entrypoint (shortened)."""
    rows = []
    for j in sorted(_client(address).list_jobs(), key=lambda j: j.start_time or 0):
        rows.append({"id": j.submission_id or j.job_id or "-", "status": str(j.status.value),
                     "start": _when(j.start_time), "entrypoint": _short(j.entrypoint or "")})
    return rows


def stop(address: str, submission_id: str) -> bool:
    """Ask the cluster to stop the job; True if it was still running."""
    try:
        return bool(_client(address).stop_job(submission_id))
    except RuntimeError as e:
        raise _missing(e, submission_id, address) from None


def jobs_command(cfg, args) -> int:
    """``dsl jobs list|status|logs|stop``: the cluster's jobs, one's status, its logs, stopping it."""
    action, sid = args.action, args.id
    if action != "list" and not sid:
        raise ConfigError(f"dsl jobs {action} needs a submission id (see dsl jobs list --address {args.address})")
    if action == "list":
        rows = list_jobs(args.address)
        widths = {k: max([len(k)] + [len(r[k]) for r in rows]) for k in ("id", "status", "start")}
        print(f"{'id':<{widths['id']}}  {'status':<{widths['status']}}  {'start (UTC)':<{widths['start']}}  entrypoint")
        for r in rows:
            print(f"{r['id']:<{widths['id']}}  {r['status']:<{widths['status']}}  {r['start']:<{widths['start']}}  "
                  f"{r['entrypoint']}")
        return 0
    if action == "status":
        try:
            info = _client(args.address).get_job_info(sid)
        except RuntimeError as e:
            raise _missing(e, sid, args.address) from None
        message = f" ({info.message})" if info.message else ""
        print(f"{sid}: {info.status.value}{message}; started {_when(info.start_time)}, ended {_when(info.end_time)}")
        return 0
    if action == "logs":
        if args.follow:
            return finish(args.address, sid, lambda: follow(args.address, sid))
        print(logs(args.address, sid), end="")
        return 0
    was_running = stop(args.address, sid)
    print(f"{sid}: {'stopping' if was_running else 'not running (' + status(args.address, sid) + ')'}")
    return 0

