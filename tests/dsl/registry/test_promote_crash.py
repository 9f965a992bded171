"""Promotion as one recoverable transaction, and a busy, read-only or unreachable store.

Faults are injected for real: ``dsl promote``/``dsl rollback`` run in a subprocess with the
test-only hook ``DSL_TEST_CRASH_AT=<step>`` (``dsl.registry.promote``), which ends the process
with ``os._exit`` right after that write; the sqlite database is locked by a second sqlite
connection holding an exclusive transaction, made read-only by its file mode (and, because root
ignores file modes, by its header's write-version byte, which SQLite honours for everyone); a
tracking server is a closed port or a stub HTTP server answering 5xx. Every test asserts the
alias, the history stack and log, and the decision tags exactly.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fixtures.registry import copy_registry, make_registry
from fixtures.services import REPO
from mlflow import MlflowClient

from dsl.cli import main as cli_main
from dsl.contracts.config import PromoteConfig
from dsl.registry.promote import CRASH_EXIT, promote, read_history

pytestmark = pytest.mark.slow  # MLflow registry stores and `dsl` subprocesses

NAME = "dsl-dual-backbone"
PENDING = "dsl.promotion.pending.champion"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_registry(tmp_path_factory.mktemp("crash-template"), NAME, 6)


@pytest.fixture
def uri(template, tmp_path) -> str:
    return copy_registry(template, tmp_path)


def finetuned(uri: str, version: int, score: float) -> None:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("finetune").experiment_id
    run = client.create_run(exp, tags={
        "dsl.backbone_name": NAME, "dsl.backbone_version": str(version), "dsl.task": "single",
        "dsl.label_fraction": "0.1", "dsl.method": "dual"})
    client.log_metric(run.info.run_id, "test_average_accuracy", score)
    client.set_terminated(run.info.run_id)


def set_alias(uri: str, version: int, name: str = "candidate") -> None:
    MlflowClient(uri).set_registered_model_alias(NAME, name, str(version))


def champion(uri: str) -> str | None:
    v = MlflowClient(uri).get_registered_model(NAME).aliases.get("champion")
    return None if v is None else str(v)


def model_tags(uri: str) -> dict:
    return MlflowClient(uri).get_registered_model(NAME).tags


def tags(uri: str, version: int) -> dict:
    t = MlflowClient(uri).get_model_version(NAME, str(version)).tags
    return {k.removeprefix("dsl.promotion."): v for k, v in t.items() if k.startswith("dsl.promotion.")}


def history(uri: str) -> tuple[list, list]:
    """The stack, and the log as (action, version, previous)."""
    hist = read_history(MlflowClient(uri), NAME, "champion")
    return hist["stack"], [(e["action"], e["version"], e["previous"]) for e in hist["log"]]


def config(uri: str, tmp_path: Path, **promote_keys) -> Path:
    path = tmp_path / "gate.yaml"
    keys = {"margin": 0.0, **promote_keys}
    path.write_text(f"promote: {json.dumps(keys)}\n"
                    f"mlflow: {{tracking_uri: '{uri}', registered_model: {NAME}}}\n")
    return path


def dsl(command: str, cfg: Path, *overrides: str, crash_at: str | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess:
    """``dsl <command>`` in a fresh process (a fresh store connection, as a user's run has)."""
    env = {k: v for k, v in os.environ.items() if k != "DSL_TEST_CRASH_AT"}
    if crash_at:
        env["DSL_TEST_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "dsl.cli", command, "--config", str(cfg), *overrides],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def dsl_lines(stderr: str, command: str) -> list[str]:
    """The lines ``dsl`` itself printed (MLflow's own log lines are not ours to judge)."""
    return [line for line in stderr.splitlines() if line.startswith(f"dsl {command}:")]


def champion_then_candidate(uri: str) -> None:
    """Version 1 champion (0.5), version 2 the better candidate (0.8)."""
    finetuned(uri, 1, 0.5)
    finetuned(uri, 2, 0.8)
    set_alias(uri, 1)
    assert promote(PromoteConfig(), NAME, uri)["decision"] == "promoted"
    set_alias(uri, 2)


PROMOTED_2 = {"decision": "promoted", "candidate_score": "0.8", "champion_score": "0.5",
              "previous_champion": "1", "alias": "champion"}


def decision(t: dict) -> dict:
    """The decision tags without the timestamp and the gate (pinned in test_promote*.py)."""
    return {k: v for k, v in t.items() if k not in ("timestamp", "gate")}


# what each crash point has written when the process dies: (tags of v2 written, history, alias)
PROMOTE_STEPS = {
    "pending": (set(), False, False),
    "tag:decision": ({"decision"}, False, False),
    "tag:candidate_score": ({"decision", "candidate_score"}, False, False),
    "tags": (set(PROMOTED_2) | {"gate", "timestamp"}, False, False),
    "history": (set(PROMOTED_2) | {"gate", "timestamp"}, True, False),
    "alias": (set(PROMOTED_2) | {"gate", "timestamp"}, True, True),
}


@pytest.mark.parametrize("step", list(PROMOTE_STEPS))
def test_a_promotion_killed_after_each_write_is_completed_by_the_next_promote(uri, tmp_path, step, capsys):
    champion_then_candidate(uri)
    cfg = config(uri, tmp_path)
    run = dsl("promote", cfg, crash_at=step)
    assert run.returncode == CRASH_EXIT, run.stderr[-2000:]
    # the state the crash left: exactly the writes before the step, and the pending record
    written, hist_written, alias_moved = PROMOTE_STEPS[step]
    assert set(tags(uri, 2)) == written
    assert history(uri)[0] == (["1", "2"] if hist_written else ["1"])
    assert champion(uri) == ("2" if alias_moved else "1")
    pending = json.loads(model_tags(uri)[PENDING])
    assert (pending["action"], pending["version"], pending["previous"]) == ("promote", "2", "1")
    capsys.readouterr()

    assert cli_main(["promote", "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    lines = dsl_lines(err, "promote")
    assert len(lines) == 1 and lines[0].startswith(
        "dsl promote: completed the interrupted promote of version 2 to 'champion' (decided "), err
    out = json.loads(out)
    assert out["decision"] == "unchanged" and out["recovered"] == lines[0].removeprefix("dsl promote: ")
    assert champion(uri) == "2" and PENDING not in model_tags(uri)
    assert history(uri) == (["1", "2"], [("promote", "1", None), ("promote", "2", "1")])
    assert decision(tags(uri, 2)) == PROMOTED_2
    # the entry and the tags carry the decision's time, written once
    assert tags(uri, 2)["timestamp"] == read_history(MlflowClient(uri), NAME, "champion")["log"][-1]["time"]


@pytest.mark.parametrize("step", ["pending", "tag:alias", "history", "alias"])
def test_a_promotion_killed_is_completed_by_the_next_rollback_then_rolled_back(uri, tmp_path, step):
    champion_then_candidate(uri)
    cfg = config(uri, tmp_path)
    assert dsl("promote", cfg, crash_at=step).returncode == CRASH_EXIT
    run = dsl("rollback", cfg)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = dsl_lines(run.stderr, "rollback")
    assert len(lines) == 1 and "completed the interrupted promote of version 2" in lines[0], run.stderr
    out = json.loads(run.stdout)
    assert (out["restored"], out["demoted"]) == ("1", "2")
    assert champion(uri) == "1" and PENDING not in model_tags(uri)
    assert history(uri) == (["1"], [("promote", "1", None), ("promote", "2", "1"), ("rollback", "1", "2")])
    t = tags(uri, 2)
    assert decision(t) == {**PROMOTED_2, "rolled_back": t["rolled_back"]}
    assert json.loads(t["rolled_back"])["restored"] == "1"
    assert json.loads(tags(uri, 1)["restored"])["replaced"] == "2"


def test_a_rejection_killed_midway_is_completed(uri, tmp_path, capsys):
    champion_then_candidate(uri)
    cfg = config(uri, tmp_path, margin=0.5)  # 0.8 does not beat 0.5 by more than 0.5
    assert dsl("promote", cfg, crash_at="tag:champion_score").returncode == CRASH_EXIT
    assert set(tags(uri, 2)) == {"decision", "candidate_score", "champion_score"}
    assert cli_main(["promote", "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert "completed the interrupted 'rejected' decision on version 2" in dsl_lines(err, "promote")[0]
    # the candidate is decided again under the same gate: the same decision, written over itself
    assert json.loads(out)["decision"] == "rejected"
    assert decision(tags(uri, 2)) == {**PROMOTED_2, "decision": "rejected"}
    assert champion(uri) == "1" and history(uri) == (["1"], [("promote", "1", None)])
    assert PENDING not in model_tags(uri)


@pytest.mark.parametrize("step", ["pending", "tag:rolled_back", "tag:restored", "history", "alias"])
def test_a_rollback_killed_after_each_write_is_completed(uri, tmp_path, step):
    champion_then_candidate(uri)
    assert promote(PromoteConfig(), NAME, uri)["decision"] == "promoted"  # 2 is champion
    cfg = config(uri, tmp_path)
    assert dsl("rollback", cfg, crash_at=step).returncode == CRASH_EXIT
    assert champion(uri) == ("1" if step == "alias" else "2")
    set_alias(uri, 1)  # the promote that finds it: the restored version is its candidate
    run = dsl("promote", cfg)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = dsl_lines(run.stderr, "promote")
    assert len(lines) == 1 and "completed the interrupted rollback of version 1 to 'champion'" in lines[0]
    assert json.loads(run.stdout)["decision"] == "unchanged"
    assert champion(uri) == "1" and PENDING not in model_tags(uri)
    assert history(uri) == (["1"], [("promote", "1", None), ("promote", "2", "1"), ("rollback", "1", "2")])
    assert json.loads(tags(uri, 2)["rolled_back"])["restored"] == "1"
    assert json.loads(tags(uri, 1)["restored"])["replaced"] == "2"


def test_an_interrupted_promotion_is_rolled_back_when_the_alias_moved_meanwhile(uri, tmp_path):
    champion_then_candidate(uri)
    cfg = config(uri, tmp_path)
    assert dsl("promote", cfg, "promote.margin=0.5").returncode == 0  # rejected: tags to restore
    rejected = tags(uri, 2)
    assert rejected["decision"] == "rejected"
    assert dsl("promote", cfg, crash_at="history").returncode == CRASH_EXIT
    assert tags(uri, 2)["decision"] == "promoted" and history(uri)[0] == ["1", "2"]
    set_alias(uri, 5, "champion")  # by hand, while the record was pending
    run = dsl("rollback", cfg)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = dsl_lines(run.stderr, "rollback")
    assert lines == [lines[0]] and lines[0].startswith(
        "dsl rollback: rolled back the interrupted promote of version 2 to 'champion' (decided ")
    assert lines[0].endswith("'champion' is now held by version 5, neither 1 nor 2; "
                             "its tags and history entry undone")
    # undone: version 2 carries its earlier rejection again; the hand move is recorded, and
    # the rollback asked for returns from it to version 1
    assert tags(uri, 2) == rejected
    assert json.loads(run.stdout)["restored"] == "1" and champion(uri) == "1"
    assert history(uri) == (["1"], [("promote", "1", None), ("external", "5", "1"), ("rollback", "1", "5")])
    assert PENDING not in model_tags(uri)


def test_a_garbled_pending_record_is_one_clear_error(uri, tmp_path):
    champion_then_candidate(uri)
    MlflowClient(uri).set_registered_model_tag(NAME, PENDING, "{not json")
    run = dsl("promote", config(uri, tmp_path))
    assert run.returncode == 1
    assert dsl_lines(run.stderr, "promote") == [
        f"dsl promote: error: model '{NAME}': tag '{PENDING}' is not a pending promotion record: "
        "'{not json'; check the alias and its history, then delete the tag"]
    assert champion(uri) == "1" and tags(uri, 2) == {}


# ---------------------------------------------------------------- a busy or read-only store


class Holder:
    """An exclusive sqlite transaction on ``db`` (no reader or writer gets in) until released."""

    def __init__(self, db: Path):
        self.con = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self.con.execute("BEGIN EXCLUSIVE")
        self.released = threading.Event()

    def release_after(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.release)
        timer.start()
        return timer

    def release(self) -> None:
        if not self.released.is_set():
            self.con.rollback()
            self.con.close()
            self.released.set()


def db_of(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///"))


def test_a_locked_db_is_waited_for_with_backoff(uri, tmp_path):
    champion_then_candidate(uri)
    holder = Holder(db_of(uri))
    cmd = [sys.executable, "-m", "dsl.cli", "promote", "--config", str(config(uri, tmp_path, lock_timeout_s=60))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        seen = []
        for line in proc.stderr:  # released only once the command has retried at least once
            seen.append(line)
            if "busy or unreachable" in line:
                break
        holder.release()
        out, rest = proc.communicate(timeout=180)
    finally:
        holder.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(seen) + rest
    waits = [line for line in dsl_lines("".join(seen) + rest, "promote") if "busy or unreachable" in line]
    assert waits and all("database is locked" in w and "retrying opening the store in" in w for w in waits)
    assert json.loads(out)["decision"] == "promoted"
    assert champion(uri) == "2" and history(uri)[0] == ["1", "2"] and decision(tags(uri, 2)) == PROMOTED_2


def test_a_db_locked_past_the_bound_is_one_error_naming_it(uri, tmp_path):
    champion_then_candidate(uri)
    holder = Holder(db_of(uri))
    try:
        run = dsl("promote", config(uri, tmp_path, lock_timeout_s=2))
    finally:
        holder.release()
    assert run.returncode == 1
    err = dsl_lines(run.stderr, "promote")
    assert len(err) == 1 and err[0].startswith(f"dsl promote: error: tracking store {uri} busy or unreachable for ")
    assert "limit 2s; opening the store: (sqlite3.OperationalError) database is locked)" in err[0]
    assert "Traceback" not in run.stderr
    assert champion(uri) == "1" and tags(uri, 2) == {} and PENDING not in model_tags(uri)
    assert history(uri) == (["1"], [("promote", "1", None)])


def make_read_only(db: Path) -> None:
    """Read-only for SQLite: mode 0444, and a write version of 3 in the header (root reads 0444
    as writable; SQLite opens a file whose write version it does not know read-only)."""
    os.chmod(db, 0o444)
    if os.geteuid() == 0:
        with open(db, "r+b") as f:
            f.seek(18)
            assert f.read(1) in (b"\x01", b"\x02")
            f.seek(18)
            f.write(b"\x03")


def test_a_read_only_db_is_one_error_and_nothing_moves(uri, tmp_path):
    champion_then_candidate(uri)
    before = (history(uri), tags(uri, 1), model_tags(uri))
    make_read_only(db_of(uri))
    t0 = time.monotonic()
    run = dsl("promote", config(uri, tmp_path))
    assert run.returncode == 1 and time.monotonic() - t0 < 60  # not retried as if busy
    assert dsl_lines(run.stderr, "promote") == [
        f"dsl promote: error: tracking store {uri} is read-only (set_registered_model_tag: "
        "(sqlite3.OperationalError) attempt to write a readonly database); nothing more was written"]
    assert "Traceback" not in run.stderr
    assert champion(uri) == "1" and tags(uri, 2) == {}
    assert (history(uri), tags(uri, 1), model_tags(uri)) == before


# ---------------------------------------------------------------- a tracking server that fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_retried_then_one_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries off: ours count
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    t0 = time.monotonic()
    assert cli_main(["promote", "--config", str(config(uri, tmp_path, lock_timeout_s=2))]) == 1
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dsl promote: error: tracking store {uri} busy or unreachable for ")
    assert "limit 2s; reading the lock: API request to " in err[0] and "attempts" in err[0]
    assert 0.5 < took < 30


class Stub(BaseHTTPRequestHandler):
    """Answers every request with the server's ``status`` and ``body``; counts them."""

    def _answer(self) -> None:
        self.server.hits += 1
        body = self.server.body.encode()
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status,body,transient", [
    (503, "unavailable", True),
    (502, "bad gateway", True),
    (500, json.dumps({"error_code": "RESOURCE_EXHAUSTED", "message": "too many requests"}), True),
    (503, json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "db busy"}), True),
    (400, json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}), False),
])
def test_a_failing_tracking_server_is_retried_only_when_transient(tmp_path, monkeypatch, capsys, status, body,
                                                                  transient):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.status, server.body, server.hits = status, body, 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code = cli_main(["promote", "--config", str(config(uri, tmp_path, lock_timeout_s=2))])
    except Exception as e:  # a non-transient error is not ours to reword: it surfaces as it is
        code = e
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    err = capsys.readouterr().err.strip().splitlines()
    if transient:
        assert code == 1 and len(err) == 1 and f"tracking store {uri} busy or unreachable" in err[0]
        assert server.hits >= 3  # backoff 0.25, 0.5, 1 s... within the 2 s bound
    else:
        assert server.hits == 1  # asked once, not retried
