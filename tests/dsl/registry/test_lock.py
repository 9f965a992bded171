"""The promotion locks exclude for real, and a holder that lost its lease never writes.

File lock: holders in two threads and in two processes, ordered with events and pipes (no
sleeps of a guessed length). Registry lock: a competing lease write that lands during the
verification, and a lease taken over before the write, on a sqlite MLflow registry.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures.registry import copy_registry, make_registry
from fixtures.services import REPO

from dsl.registry.lock import FileLock, LockTimeout, RegistryLock

# ---------------------------------------------------------------- file lock (no MLflow)


def hold_in_thread(path: Path) -> tuple[threading.Thread, threading.Event, threading.Event]:
    """A thread that takes the lock, sets ``held``, and keeps it until ``release`` is set."""
    held, release = threading.Event(), threading.Event()

    def run() -> None:
        with FileLock(path, timeout=10):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert held.wait(10), "the first holder never got the lock"
    return thread, held, release


def test_file_lock_excludes_a_second_thread(tmp_path):
    path = tmp_path / "mlflow.db.dsl-promote.lock"
    thread, _, release = hold_in_thread(path)
    try:
        with pytest.raises(LockTimeout, match=rf"lock {path} still held by pid {os.getpid()} on .* after 0.3s"):
            with FileLock(path, timeout=0.3):
                pytest.fail("two holders of one file lock")
    finally:
        release.set()
        thread.join(10)
    with FileLock(path, timeout=5):  # free again once the holder left
        pass


def test_file_lock_waiter_enters_only_after_release(tmp_path):
    path = tmp_path / "lock"
    thread, _, release = hold_in_thread(path)
    entered, order = threading.Event(), []

    def wait_for_it() -> None:
        with FileLock(path, timeout=30):
            order.append("waiter in")
            entered.set()

    waiter = threading.Thread(target=wait_for_it, daemon=True)
    waiter.start()
    try:
        assert not entered.wait(0.5), "the waiter entered while the lock was held"
        order.append("holder out")
    finally:
        release.set()
        thread.join(10)
    assert entered.wait(10) and order == ["holder out", "waiter in"]
    waiter.join(10)


HOLDER = """
import sys
from pathlib import Path
from dsl.registry.lock import FileLock
with FileLock(Path(sys.argv[1]), timeout=30):
    print("held", flush=True)
    sys.stdin.readline()  # hold until the parent says so (or kills us)
"""


def holder_process(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held", "holder process failed to take the lock"
    return proc


def test_file_lock_excludes_another_process_and_survives_its_death(tmp_path):
    path = tmp_path / "lock"
    proc = holder_process(path)
    try:
        with pytest.raises(LockTimeout, match=rf"still held by pid {proc.pid} "):
            with FileLock(path, timeout=0.3):
                pytest.fail("two processes hold one file lock")
        proc.stdin.write("release\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
        with FileLock(path, timeout=5):
            pass
        proc = holder_process(path)  # a holder that dies holding it frees it (kernel)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        with FileLock(path, timeout=5):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# ---------------------------------------------------------------- registry lock (sqlite MLflow)

NAME = "dsl-dual-backbone"
KEY = "dsl.lock.champion"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_registry(tmp_path_factory.mktemp("lock-template"), NAME, 2)


@pytest.fixture
def uri(template, tmp_path) -> str:
    return copy_registry(template, tmp_path)


def lease(owner: str) -> str:
    return json.dumps({"owner": owner, "expires": time.time() + 3600})


def owner(uri: str) -> str | None:
    from mlflow import MlflowClient

    value = MlflowClient(uri).get_registered_model(NAME).tags.get(KEY)
    return json.loads(value)["owner"] if value else None


class RacedClient:
    """An MlflowClient whose lock-tag writes are followed at once by a competitor's write.

    That is the race the verification exists for: the competitor read the tag as free just
    before our write, and its own write lands while we settle.
    """

    def __init__(self, client, competitor: str):
        self.client, self.competitor, self.raced = client, competitor, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def set_registered_model_tag(self, name, key, value):
        self.client.set_registered_model_tag(name, key, value)
        if key == KEY and self.competitor not in value:
            self.raced += 1
            self.client.set_registered_model_tag(name, key, lease(self.competitor))


@pytest.mark.slow
def test_registry_lock_verifies_its_write_before_holding(uri):
    from mlflow import MlflowClient

    client = RacedClient(MlflowClient(uri), "host:1:competitor")
    lock = RegistryLock(client, NAME, "champion", timeout=0.5, ttl=60, settle=0.05)
    with pytest.raises(LockTimeout, match="still held by host:1:competitor after 0.5s"):
        with lock:
            pytest.fail("holds the lock although the competitor's write replaced its lease")
    assert client.raced >= 1
    assert owner(uri) == "host:1:competitor"  # the competitor's lease stands: not deleted by the loser


@pytest.mark.slow
def test_registry_lock_check_fails_after_a_takeover(uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    with RegistryLock(client, NAME, "champion", timeout=5, ttl=60, settle=0.05) as lock:
        lock.check()  # still ours
        client.set_registered_model_tag(NAME, KEY, lease("host:2:usurper"))  # expired and taken over
        with pytest.raises(LockTimeout, match=r"lost registry lock 'dsl.lock.champion' .*\(now held by host:2:usurper\)"):
            lock.check()
    assert owner(uri) == "host:2:usurper"  # not released by the loser


@pytest.mark.slow
def test_promotion_that_lost_its_lease_writes_nothing(uri, monkeypatch):
    from mlflow import MlflowClient

    import dsl.registry.promote as promote_mod
    from dsl.contracts.config import PromoteConfig

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("finetune").experiment_id
    for version, score in ((1, 0.5), (2, 0.9)):
        run = client.create_run(exp, tags={"dsl.backbone_name": NAME, "dsl.backbone_version": str(version),
                                           "dsl.task": "single", "dsl.label_fraction": "0.1",
                                           "dsl.method": "dual"})
        client.log_metric(run.info.run_id, "test_average_accuracy", score)
        client.set_terminated(run.info.run_id)
    client.set_registered_model_alias(NAME, "champion", "1")
    client.set_registered_model_alias(NAME, "candidate", "2")
    original = promote_mod.score

    def score_then_lose_the_lease(*args, **kwargs):
        client.set_registered_model_tag(NAME, KEY, lease("host:3:usurper"))  # our lease expired meanwhile
        return original(*args, **kwargs)

    monkeypatch.setattr(promote_mod, "score", score_then_lose_the_lease)
    cfg = PromoteConfig(lock="registry", lock_settle_s=0.05, lock_timeout_s=5)
    with pytest.raises(LockTimeout, match="lost registry lock .* host:3:usurper.*nothing written"):
        promote_mod.promote(cfg, NAME, uri)
    model = client.get_registered_model(NAME)
    assert str(model.aliases["champion"]) == "1"  # the better candidate was NOT promoted by the loser
    assert not [k for k in client.get_model_version(NAME, "2").tags if k.startswith("dsl.promotion.")]
