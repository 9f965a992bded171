"""``dsl pipeline run <name> [--slot SLOT]``: a pipeline's stages for one slot, each stage once.

The pipeline file (``configs/pipelines/<name>.yaml``, :mod:`dsl.contracts.pipeline`) lists
``dsl`` command lines. Each stage runs as its own process, ``python -m dsl.cli <words>``:
stages start or join Ray, build DeepSpeed engines and set MLflow's process-wide tracking URI,
and none of that state may leak into the next stage; a stage that dies hard (out of memory,
``os._exit``) kills its process, not the runner, which then records the failure. Inside a Ray
job (``dsl submit -- pipeline run nightly --slot 2026-11-30``) the stages inherit the job's
``RAY_ADDRESS`` and so join its cluster, as any ``dsl`` command there does.

The slot is recorded in MLflow (experiment ``dsl-pipelines`` by default). Every attempt at a
slot is a run named ``pipeline-<name>-<slot>``, tagged ``dsl.pipeline.key = <name>-<slot>``:

- ``dsl.pipeline.stage.<stage>``: ``running``, then ``done`` or ``failed``; with ``done`` the
  stage's outputs ``dsl.pipeline.output.<stage>.<key>`` (the scalar keys of the JSON object the
  stage printed last, e.g. ``pretrain``'s ``model_version``), written before ``done``;
- ``dsl.pipeline.state = done`` when every stage is done; ``dsl.pipeline.heartbeat`` (epoch
  seconds) refreshed every ``heartbeat_s`` while the attempt runs.

A stage done in any attempt of the slot is skipped, its outputs reused, so a retried slot
resumes at the stage that failed and a finished slot runs nothing. Claim (MLflow has no
compare-and-swap): an attempt whose status is RUNNING and whose heartbeat is younger than
``lease_s`` is live; a new attempt leaves when one is live, else creates its run, waits
``claim_settle_s`` and reads the slot's attempts back: the earliest live one (start time, then
run id) runs, every other ends its run KILLED and exits 0 saying the slot is taken. Safe while
one attempt's search-then-create takes less than ``claim_settle_s``, heartbeats reach the store
within ``lease_s`` and the machines' clocks agree (the same assumptions as the promotion
lock's registry lease). A runner killed outright leaves a RUNNING attempt whose lease expires:
the slot is retryable ``lease_s`` later. On a cluster the Ray submission id
(``dsl submit --id pipeline-<name>-<slot>``) refuses a second submission of the slot before
any of this runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dsl.contracts.config import Config, ConfigError
from dsl.contracts.errors import JobFailed
from dsl.contracts.pipeline import Pipeline, check_id, load_pipeline, substitute

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "configs" / "pipelines"

TAG = "dsl.pipeline."
KEY, NAME, SLOT = TAG + "key", TAG + "name", TAG + "slot"
STATE, HEARTBEAT, LOST_TO, SUBMISSION = TAG + "state", TAG + "heartbeat", TAG + "lost_to", TAG + "submission_id"
STAGE, OUTPUT = TAG + "stage.", TAG + "output."
DONE, RUNNING, FAILED = "done", "running", "failed"
_OUTPUT_KEY = re.compile(r"^[A-Za-z0-9_]+$")
TAG_CHARS = 5000  # MLflow's limit on a tag value


def pipeline_file(name: str) -> Path:
    """``configs/pipelines/<name>.yaml``, or ``name`` itself when it is a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return Path(name)
    return PIPELINES / f"{check_id(name, 'pipeline')}.yaml"


def default_slot(now: float | None = None) -> str:
    """Today's UTC date (``2026-11-30``): a nightly's slot when none is given."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def last_json(text: str) -> dict[str, str]:
    """The scalar keys of the last JSON object printed on its own lines in ``text``, as strings.

    ``dsl pretrain`` and ``dsl promote`` end their output with one (``json.dumps(..., indent=1)``).
    Nested values, nulls and keys that are not plain words are left out.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("{")]
    for i in reversed(starts[-50:]):
        try:  # raw_decode: a log line printed after the object does not hide it
            obj, _ = json.JSONDecoder().raw_decode("\n".join(lines[i:]))
        except ValueError:
            continue
        if isinstance(obj, dict):
            return {k: str(v)[:TAG_CHARS] for k, v in obj.items()
                    if _OUTPUT_KEY.match(k) and isinstance(v, (str, int, float, bool))}
    return {}


def _submission_id() -> str | None:
    """The Ray Jobs submission id this process runs under, if any (from the job's config)."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, ValueError, TypeError):
        return None


def run_stage(argv: list[str], beat: Callable[[], None], every_s: float) -> tuple[int, str]:
    """Run ``python -m dsl.cli <argv>``, its stdout echoed and kept, calling ``beat`` every ``every_s``.

    Returns:
        The exit code and the stage's stdout.
    """
    proc = subprocess.Popen([sys.executable, "-m", "dsl.cli", *argv], stdout=subprocess.PIPE, text=True,
                            errors="replace")
    kept: list[str] = []

    def echo() -> None:  # the stage's output is the job's log; stderr goes straight through
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            kept.append(line)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        while True:
            try:
                rc = proc.wait(timeout=every_s)
                break
            except subprocess.TimeoutExpired:
                beat()
    except BaseException:  # the runner is stopping (Ctrl-C, a failed heartbeat): the stage with it
        proc.kill()
        proc.wait()
        raise
    reader.join()
    return rc, "".join(kept)


class Slot:
    """The MLflow record of one pipeline's slot: its attempts, and the claim among them."""

    def __init__(self, client, experiment: str, name: str, slot: str):
        self.client, self.name, self.slot, self.key = client, name, slot, f"{name}-{slot}"
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another attempt created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def attempts(self) -> list:
        """Every attempt run of the slot (deleted runs aside), earliest first."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{KEY}` = '{self.key}'",
                                           max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def create(self) -> str:
        """A new attempt run, RUNNING, with a fresh heartbeat; its run id."""
        tags = {KEY: self.key, NAME: self.name, SLOT: self.slot, HEARTBEAT: str(time.time()),
                TAG + "host": f"{socket.gethostname()}:{os.getpid()}", "mlflow.runName": f"pipeline-{self.key}"}
        sid = _submission_id()
        if sid:
            tags[SUBMISSION] = sid
        return self.client.create_run(self.experiment_id, tags=tags).info.run_id


def live(attempts: list, now: float, lease_s: float) -> list:
    """The attempts still running: status RUNNING and a heartbeat younger than ``lease_s``."""
    out = []
    for r in attempts:
        try:
            beat = float(r.data.tags.get(HEARTBEAT, "nan"))
        except ValueError:
            continue
        if r.info.status == "RUNNING" and now - beat < lease_s:
            out.append(r)
    return out


def winner(contenders: list) -> str | None:
    """The run id that holds the slot among live ``contenders``: the earliest (start time, run id)."""
    if not contenders:
        return None
    return min(contenders, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


def finished(attempts: list) -> dict[str, dict[str, str]]:
    """Stage -> its outputs, for every stage some attempt of the slot marked ``done``."""
    out: dict[str, dict[str, str]] = {}
    for r in attempts:
        tags = r.data.tags
        for key, value in tags.items():
            if key.startswith(STAGE) and value == DONE:
                stage = key[len(STAGE):]
                prefix = f"{OUTPUT}{stage}."
                out.setdefault(stage, {k[len(prefix):]: v for k, v in tags.items() if k.startswith(prefix)})
    return out


def run_pipeline(name: str, slot: str | None = None, tracking_uri: str | None = None,
                 say: Callable[[str], None] | None = None, stage_runner: Callable = run_stage) -> dict:
    """Run the pipeline ``name`` for ``slot``, skipping what the slot has done already.

    Args:
        name: ``configs/pipelines/<name>.yaml``, or a path to a pipeline file.
        slot: The slot id (default: today's UTC date).
        tracking_uri: The MLflow store of the slot records (default: the file's ``tracking_uri``).
        say: Where progress lines go (default: stderr, prefixed ``dsl pipeline:``).
        stage_runner: ``(argv, beat, every_s) -> (exit code, stdout)``; tests may wrap it.

    Returns:
        ``{"status": "done" | "skipped" | "taken", "run_id", "ran": [stages], "skipped": [stages],
        "outputs": {stage: {key: value}}}``.

    Raises:
        ConfigError: A bad pipeline file, slot id or missing tracking URI.
        JobFailed: A stage failed (the slot stays retryable from that stage).
    """
    say = say or (lambda line: print(f"dsl pipeline: {line}", file=sys.stderr, flush=True))
    path = pipeline_file(name)
    p: Pipeline = load_pipeline(path)
    pname = check_id(path.stem, "pipeline name")
    slot = check_id(slot if slot is not None else default_slot(), "--slot")
    uri = tracking_uri or p.tracking_uri
    if not uri:
        raise ConfigError(f"{path}: no tracking_uri; give one in the file or --tracking-uri "
                          "(the slot's stages are recorded there)")
    from dsl.runtime.tracking import client as mlflow_client

    client = mlflow_client(uri)
    record = Slot(client, p.experiment, pname, slot)
    names = [s.name for s in p.stages]

    attempts = record.attempts()
    done = finished(attempts)
    if all(n in done for n in names):
        say(f"slot {record.key}: every stage done already ({', '.join(names)}); nothing to run")
        return {"status": "skipped", "run_id": None, "ran": [], "skipped": names, "outputs": done}
    holder = winner(live(attempts, time.time(), p.lease_s))
    if holder is not None:
        say(f"slot {record.key} is taken: attempt run {holder} is running it")
        return {"status": "taken", "run_id": holder, "ran": [], "skipped": [], "outputs": done}

    run_id = record.create()
    time.sleep(p.claim_settle_s)  # contenders that searched when we did have created theirs by now
    attempts = record.attempts()
    holder = winner(live(attempts, time.time(), p.lease_s))
    if holder != run_id:
        client.set_tag(run_id, LOST_TO, str(holder))
        client.set_terminated(run_id, status="KILLED")
        say(f"slot {record.key} is taken: attempt run {holder} claimed it first")
        return {"status": "taken", "run_id": holder, "ran": [], "skipped": [], "outputs": done}

    done = finished(attempts)  # an attempt may have finished stages between our two reads
    values = {"slot": slot, "pipeline": pname}
    ran, skipped = [], []

    def beat() -> None:
        client.set_tag(run_id, HEARTBEAT, str(time.time()))

    try:
        for stage in p.stages:
            if stage.name in done:
                skipped.append(stage.name)
                values.update({f"{stage.name}.{k}": v for k, v in done[stage.name].items()})
                say(f"slot {record.key}: stage {stage.name} done already, skipped")
                continue
            try:
                argv = [substitute(w, values) for w in stage.command]
            except KeyError as e:
                client.set_tag(run_id, STAGE + stage.name, FAILED)
                raise JobFailed(f"{path}: stage {stage.name}: {{{e.args[0]}}} has no value: the earlier stage "
                                f"printed no '{e.args[0].split('.', 1)[-1]}' in its last JSON object") from None
            say(f"slot {record.key}: stage {stage.name}: dsl {' '.join(argv)}")
            beat()
            client.set_tag(run_id, STAGE + stage.name, RUNNING)
            rc, out = stage_runner(argv, beat, p.heartbeat_s)
            if rc != 0:
                client.set_tag(run_id, STAGE + stage.name, FAILED)
                raise JobFailed(f"slot {record.key}: stage {stage.name} failed (exit {rc}); the stages before it "
                                "are recorded: rerun the same command to retry from this stage")
            outputs = last_json(out)
            for k, v in outputs.items():
                client.set_tag(run_id, f"{OUTPUT}{stage.name}.{k}", v)
            client.set_tag(run_id, STAGE + stage.name, DONE)  # after the outputs: done means recorded
            values.update({f"{stage.name}.{k}": v for k, v in outputs.items()})
            done[stage.name] = outputs
            ran.append(stage.name)
        client.set_tag(run_id, STATE, DONE)
        client.set_terminated(run_id, status="FINISHED")
    except BaseException:
        try:  # the lease ends now rather than lease_s later: the slot is retryable at once
            client.set_terminated(run_id, status="FAILED")
        except Exception:  # the store is what failed: the lease runs out instead
            pass
        raise
    say(f"slot {record.key}: done (ran {', '.join(ran) or 'nothing'}; skipped {', '.join(skipped) or 'nothing'})")
    return {"status": "done", "run_id": run_id, "ran": ran, "skipped": skipped, "outputs": done}


def command(_: Config, args: argparse.Namespace) -> int:
    """``dsl pipeline run <name> [--slot SLOT] [--tracking-uri URI]``: print the outcome as JSON."""
    if getattr(args, "action", "run") != "run":
        raise ConfigError(f"dsl pipeline: unknown action {args.action!r} (use: run)")
    out = run_pipeline(args.name, args.slot, getattr(args, "tracking_uri", None))
    print(json.dumps({k: out[k] for k in ("status", "run_id", "ran", "skipped")}, indent=1))
    return 0
