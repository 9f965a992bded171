"""``dsl.registry.lock`` step by step, fast: a fake clock, a fake registry, real flock.

``test_lock.py`` shows the locks exclude for real (threads, processes, sqlite MLflow). This file
pins every rule the locks are built from, with time, randomness and the registry replaced by
fakes so each test takes milliseconds: which store gets which lock, the lease's content and
expiry, the verification after ``settle``, the back-off, the timeout messages, and that only
the owner releases.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException

import dsl.registry.lock as L
from dsl.registry.lock import FileLock, LockTimeout, RegistryLock, local_store, promotion_lock

NAME = "dsl-dual-backbone"
KEY = "dsl.lock.champion"
T0 = 1_000_000.0


class Clock:
    """``time`` for lock.py: ``sleep`` advances ``time``/``monotonic`` and is recorded."""

    def __init__(self, on_sleep=None):
        self.now, self.sleeps, self.on_sleep = T0, [], on_sleep

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - T0

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:  # every wait here (jitter, back-off, settle) is a real one: no busy loop
            raise ValueError(f"sleep({seconds}): a wait that does not wait")
        self.sleeps.append(round(seconds, 9))
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(len(self.sleeps))


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(L, "time", c)
    monkeypatch.setattr(L, "random", SimpleNamespace(random=lambda: 0.5))
    return c


class Registry:
    """The registered-model tags of one model; ``fail_writes`` writes raise first."""

    def __init__(self, tags=None, fail_writes: int = 0, on_write=None):
        self.tags, self.fail_writes, self.on_write, self.writes, self.deletes = dict(tags or {}), fail_writes, on_write, [], []

    def get_registered_model(self, name):
        assert name == NAME
        return SimpleNamespace(tags=dict(self.tags))

    def set_registered_model_tag(self, name, key, value):
        assert name == NAME and isinstance(value, str)
        if self.fail_writes:
            self.fail_writes -= 1
            raise MlflowException("UNIQUE constraint failed: registered_model_tags")
        self.tags[key] = value
        self.writes.append((key, json.loads(value)))
        if self.on_write:
            self.on_write(self)

    def delete_registered_model_tag(self, name, key):
        assert name == NAME
        del self.tags[key]
        self.deletes.append(key)


def lease(owner: str, expires: float) -> str:
    return json.dumps({"owner": owner, "expires": expires})


def lock(client, timeout=10.0, ttl=60.0, settle=0.25) -> RegistryLock:
    return RegistryLock(client, NAME, "champion", timeout, ttl, settle)


# ---------------------------------------------------------------- which lock


@pytest.mark.parametrize(("uri", "store"), [
    ("sqlite:///rel/mlflow.db", Path("rel/mlflow.db")),
    ("sqlite:////abs/mlflow.db", Path("/abs/mlflow.db")),
    ("sqlite:///mlflow.db?mode=ro?x=1", Path("mlflow.db")),
    ("sqlite:///:memory:", None),
    ("sqlite:///", None),
    ("file:///srv/mlruns", Path("/srv/mlruns")),
    ("/srv/mlruns", Path("/srv/mlruns")),
    ("mlruns", Path("mlruns")),
    ("", None),
    ("http://mlflow:5000", None),
    ("postgresql://db/mlflow", None),
])
def test_local_store(uri, store):
    assert local_store(uri) == store


def test_promotion_lock_kinds_and_defaults(tmp_path):
    client = object()
    local = f"sqlite:///{tmp_path}/mlflow.db"
    for kind in ("auto", "file"):
        f = promotion_lock(client, local, NAME, "champion", kind, timeout=7.0)
        assert isinstance(f, FileLock) and f.path == Path(f"{tmp_path}/mlflow.db.dsl-promote.lock") and f.timeout == 7.0
    assert promotion_lock(client, local, NAME, "champion").timeout == 120.0
    for uri, kind in (("http://mlflow:5000", "auto"), ("http://mlflow:5000", "registry"), (local, "registry")):
        r = promotion_lock(client, uri, NAME, "gold", kind, 3.0, 4.0, 5.0)
        assert isinstance(r, RegistryLock) and (r.client, r.name, r.key) == (client, NAME, "dsl.lock.gold")
        assert (r.timeout, r.ttl, r.settle) == (3.0, 4.0, 5.0)
    r = promotion_lock(client, "http://mlflow:5000", NAME, "champion")
    assert (r.timeout, r.ttl, r.settle) == (120.0, 300.0, 1.0)
    with pytest.raises(ValueError) as e:
        promotion_lock(client, "http://mlflow:5000", NAME, "champion", "file")
    assert str(e.value) == "promote.lock=file needs a local sqlite or file store, not 'http://mlflow:5000'"
    for uri in (local, "http://mlflow:5000"):
        with pytest.raises(ValueError) as e:
            promotion_lock(client, uri, NAME, "champion", "flock")
        assert str(e.value) == "promote.lock must be auto, file or registry, got 'flock'"


# ---------------------------------------------------------------- file lock


def test_file_lock_creates_its_file_and_names_its_holder(tmp_path):
    path = tmp_path / "new" / "dir" / "mlflow.db.dsl-promote.lock"  # two folders to make
    with FileLock(path, timeout=1) as held:
        assert held._fd is not None
        assert path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~umask
        held.check()  # nothing to check: the kernel holds it
    assert held._fd is None
    path.write_text("x" * 200)  # an older, longer holder line is replaced, not overwritten in part
    with FileLock(path, timeout=1):
        assert path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
    with FileLock(path, timeout=1):  # released on exit: free again at once
        pass


def hold(path: Path, text: bytes = b"") -> int:
    """Another open file description holding ``path``'s flock (conflicts even in this process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, text)
    return fd


def test_file_lock_polls_with_jitter_until_the_holder_leaves(tmp_path, clock):
    path = tmp_path / "lock"
    fd = hold(path)

    def release(n: int) -> None:
        if n == 3:
            os.close(fd)

    clock.on_sleep = release
    with FileLock(path, timeout=0.2):
        pass
    assert clock.sleeps == [0.035] * 3  # 0.02 + 0.5 * 0.03 each


@pytest.mark.parametrize(("text", "named"), [(b"", "unknown"), (b"  pid 7 on host\n", "pid 7 on host"),
                                             (b"\xff\xfepid 8", "\ufffd\ufffdpid 8")])
def test_file_lock_times_out_naming_the_holder(tmp_path, clock, text, named):
    path = tmp_path / "lock"
    fd = hold(path, text)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(LockTimeout) as e:
            with FileLock(path, timeout=0.1):
                pytest.fail("two holders")
        assert str(e.value) == f"lock {path} still held by {named} after 0.1s"
        assert e.value.__cause__ is None and e.value.__suppress_context__
        assert len(os.listdir("/proc/self/fd")) == fds  # its own descriptor was closed
        assert clock.sleeps == [0.035] * 3  # waited the whole timeout (0.105 > 0.1), not longer
    finally:
        os.close(fd)


def test_file_lock_still_tries_at_the_deadline(tmp_path, clock):
    # a timeout that two back-offs reach exactly: the try at the deadline is not yet too late
    backoff = 0.02 + 0.5 * 0.03
    timeout = ((T0 + backoff) + backoff) - T0  # what the fake monotonic clock reads then
    path = tmp_path / "lock"
    fd = hold(path)
    try:
        with pytest.raises(LockTimeout):
            with FileLock(path, timeout=timeout):
                pytest.fail("two holders")
        assert clock.sleeps == [0.035] * 3
    finally:
        os.close(fd)


# ---------------------------------------------------------------- registry lock


def test_registry_lock_token_and_key():
    r = RegistryLock(Registry(), NAME, "gold", 1, 2, 3)
    host, pid, tail = r.token.split(":")
    assert (host, pid, len(tail), r.key) == (socket.gethostname(), str(os.getpid()), 32, "dsl.lock.gold")
    int(tail, 16)
    assert r.token != RegistryLock(Registry(), NAME, "gold", 1, 2, 3).token


@pytest.mark.parametrize("value", [None, "", "not json", "[1, 2]", "3", '"owner"'])
def test_a_missing_or_garbled_lease_is_free(value):
    reg = Registry({} if value is None else {KEY: value})
    assert lock(reg)._holder() is None


def test_a_free_lock_is_leased_verified_held_and_released(clock):
    reg = Registry({"other": "tag"})
    with lock(reg, ttl=60.0, settle=0.25) as held:
        assert reg.writes == [(KEY, {"owner": held.token, "expires": T0 + 60.0})]
        assert clock.sleeps == [0.25]  # settle, then read back: it is ours
        held.check()
    assert reg.deletes == [KEY] and reg.tags == {"other": "tag"}


def test_a_live_lease_is_waited_for_and_an_expired_one_taken(clock):
    reg = Registry({KEY: lease("host:1:first", T0 + 0.5)})
    with lock(reg, settle=0.25) as held:
        assert reg.writes == [(KEY, {"owner": held.token, "expires": pytest.approx(T0 + 0.6 + 60.0)})]
    # not expired at T0 + 0.2 and T0 + 0.4 (0.1 + 0.5 * 0.2 each), expired at T0 + 0.6
    assert clock.sleeps == [0.2, 0.2, 0.2, 0.25]
    reg = Registry({KEY: lease("host:1:first", clock.now)})  # expiring now is not expired yet
    with lock(reg, settle=0.25):
        pass
    assert clock.sleeps[4:] == [0.2, 0.25]
    reg = Registry({KEY: json.dumps({"owner": "host:1:no-expiry"})})  # a lease without expiry is void
    with lock(reg, settle=0.25):
        pass
    assert clock.sleeps[6:] == [0.25]


def test_a_collided_write_is_retried(clock):
    reg = Registry(fail_writes=1)
    with lock(reg, settle=0.25) as held:
        assert reg.writes == [(KEY, {"owner": held.token, "expires": pytest.approx(T0 + 0.2 + 60.0)})]
    assert clock.sleeps == [0.2, 0.25]


def test_a_lease_replaced_while_settling_is_not_held_and_not_released(clock):
    def competitor(reg: Registry) -> None:
        if "rival" not in reg.tags[KEY]:
            reg.tags[KEY] = lease("host:2:rival", T0 + 3600)

    reg = Registry(on_write=competitor)
    with pytest.raises(LockTimeout) as e:
        with lock(reg, timeout=1.0, settle=0.25):
            pytest.fail("held a lock whose lease was replaced")
    assert str(e.value) == "registry lock 'dsl.lock.champion' on model 'dsl-dual-backbone' still held by host:2:rival after 1.0s"
    assert json.loads(reg.tags[KEY])["owner"] == "host:2:rival" and reg.deletes == []
    # lease, settle (0.25), back-off (0.2); the rival's live lease: back-off until past the deadline
    assert clock.sleeps == [0.25, 0.2, 0.2, 0.2, 0.2]


def test_timeout_without_a_holder_says_unknown(clock):
    reg = Registry(fail_writes=100)
    with pytest.raises(LockTimeout) as e:
        with lock(reg, timeout=0.3):
            pass
    assert str(e.value) == "registry lock 'dsl.lock.champion' on model 'dsl-dual-backbone' still held by unknown after 0.3s"
    assert clock.sleeps == [0.2, 0.2]


def test_check_and_exit_after_a_takeover(clock):
    reg = Registry()
    with pytest.raises(LockTimeout) as e:
        with lock(reg) as held:
            reg.tags[KEY] = lease("host:3:usurper", T0 + 3600)
            held.check()
    assert str(e.value) == ("lost registry lock 'dsl.lock.champion' on model 'dsl-dual-backbone' (now held by "
                            "host:3:usurper); nothing written")
    assert json.loads(reg.tags[KEY])["owner"] == "host:3:usurper" and reg.deletes == []
    with pytest.raises(LockTimeout) as e:
        with lock(reg := Registry()) as held:
            del reg.tags[KEY]
            held.check()
    assert str(e.value).endswith("(now held by nobody); nothing written") and reg.deletes == []


def test_registry_lock_still_tries_at_the_deadline(clock):
    # a timeout that two back-offs reach exactly: the try at the deadline is not yet too late
    backoff = 0.1 + 0.5 * 0.2
    timeout = ((T0 + backoff) + backoff) - T0  # time.time() + timeout is then the clock's reading
    reg = Registry({KEY: lease("host:4:forever", T0 + 3600)})
    with pytest.raises(LockTimeout, match="still held by host:4:forever"):
        with lock(reg, timeout=timeout):
            pass
    assert clock.sleeps == [0.2] * 3 and reg.writes == []
