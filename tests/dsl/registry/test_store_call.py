"""``dsl.registry.lock.store_call`` and ``classify``, fast: errors stood in, time and jitter fixed.

test_promote_crash.py shows a real sqlite store held busy and made read-only; this file pins
which error is which (read-only, transient, anything else), the back-off (doubling, capped,
jittered), the bound and the one-line messages, in milliseconds (what ``make mutate`` needs).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException

import dsl.registry.lock as L
from dsl.registry.lock import (
    RegistryLock,
    StoreReadOnly,
    StoreUnavailable,
    classify,
    promotion_lock,
    store_call,
)

LOCAL = "sqlite:////srv/mlflow.db"
REMOTE = "http://mlflow:5000"


class Coded(Exception):
    """An error with MLflow's ``message`` and ``error_code`` attributes, ``str`` unlike both."""

    def __init__(self, message: str, error_code: str | None = None):
        super().__init__("str of the error")
        self.message, self.error_code = message, error_code


def chained(outer: Exception, inner: Exception, explicit: bool) -> Exception:
    if explicit:
        outer.__cause__ = inner
    else:
        outer.__context__ = inner
    return outer


# ---------------------------------------------------------------- which error is which


@pytest.mark.parametrize("text", ["attempt to write a readonly database", "Read-Only Database",
                                  "[Errno 30] Read-only file system: '/srv'"])
def test_a_read_only_store_is_read_only_from_any_store(text):
    for uri in (LOCAL, REMOTE):
        assert classify(RuntimeError(text), uri) == "read-only"


@pytest.mark.parametrize("text", ["database is locked", "Database Table Is Locked", "(sqlite3) database is busy"])
def test_a_busy_store_is_transient(text):
    assert classify(RuntimeError(text), LOCAL) == "transient"


def test_read_only_wins_over_busy():
    assert classify(RuntimeError("database is locked; readonly database"), LOCAL) == "read-only"


@pytest.mark.parametrize("explicit", [True, False])
def test_the_cause_is_read_too(explicit):
    e = chained(RuntimeError("(sqlalchemy) OperationalError"), RuntimeError("database is locked"), explicit)
    assert classify(e, LOCAL) == "transient"
    e = chained(RuntimeError("wrapped"), OSError("read-only file system"), explicit)
    assert classify(e, LOCAL) == "read-only"


def test_the_message_attribute_is_read_before_str():
    assert classify(Coded("database is locked"), LOCAL) == "transient"
    assert classify(Coded(""), LOCAL) is None  # empty message: str(e) is read instead
    assert classify(RuntimeError("str of the error"), LOCAL) is None


@pytest.mark.parametrize("code", ["TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED",
                                  "DEADLINE_EXCEEDED"])
def test_overload_codes_are_transient_from_any_store(code):
    assert classify(Coded("overloaded", code), LOCAL) == "transient"
    assert classify(MlflowException("overloaded", error_code=code), REMOTE) == "transient"


@pytest.mark.parametrize("uri", [REMOTE, "https://mlflow.example.com"])
def test_a_server_error_or_no_answer_is_transient_only_from_a_server(uri):
    internal = Coded("boom", "INTERNAL_ERROR")
    no_answer = RuntimeError("API request to endpoint /api/2.0/mlflow/x failed with exception boom")
    refused = ConnectionRefusedError("refused")
    for e in (internal, no_answer, refused):
        assert classify(e, uri) == "transient"
        assert classify(e, LOCAL) is None  # a local store's 5xx is a bug: keep its traceback
        assert classify(e, "file:///srv/mlruns") is None


@pytest.mark.parametrize("e", [ValueError("bad"), Coded("no such model", "RESOURCE_DOES_NOT_EXIST"),
                               KeyError("k"), Coded("invalid", "INVALID_PARAMETER_VALUE")])
def test_anything_else_is_nobody_s_business(e):
    assert classify(e, REMOTE) is None and classify(e, LOCAL) is None


@pytest.mark.parametrize(("e", "line"), [
    (RuntimeError("first\nsecond"), "first"),
    (RuntimeError("  padded  \n"), "padded"),
    (RuntimeError("x" * 400), "x" * 300),
    (RuntimeError(""), "RuntimeError"),
    (Coded("the message\nmore"), "the message"),
])
def test_first_line(e, line):
    assert L._first_line(e) == line


# ---------------------------------------------------------------- retrying


class Clock:
    """``clock`` and ``sleep`` for store_call: sleeping advances the clock."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s > 0
        self.sleeps.append(round(s, 6))
        self.now += s


@pytest.fixture
def clock(monkeypatch) -> Clock:
    monkeypatch.setattr(L, "random", SimpleNamespace(random=lambda: 0.5))  # jitter: x 1.25
    return Clock()


class Flaky:
    """Raises ``errors`` in turn, then returns ``value``; counts its calls."""

    def __init__(self, *errors: Exception, value="done"):
        self.errors, self.value, self.calls = list(errors), value, 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def busy(n: int) -> list[Exception]:
    return [RuntimeError(f"database is locked ({i})\nsecond line") for i in range(n)]


def test_a_call_that_works_runs_once_and_never_waits(clock):
    fn = Flaky(value={"v": 1})
    assert store_call(fn, LOCAL, 10.0, sleep=clock.sleep, clock=clock) == {"v": 1}
    assert fn.calls == 1 and clock.sleeps == []


def test_a_busy_store_is_waited_out_with_doubling_jittered_capped_waits(clock):
    said = []
    fn = Flaky(*busy(7))
    assert store_call(fn, LOCAL, 1000.0, "reading", said.append, clock.sleep, clock) == "done"
    assert fn.calls == 8
    # 0.25 doubling to the 5 s cap, each x 1.25 (half the jitter's range)
    assert clock.sleeps == [0.3125, 0.625, 1.25, 2.5, 5.0, 6.25, 6.25]
    assert said[0] == (f"tracking store {LOCAL} busy or unreachable (database is locked (0)); "
                       "retrying reading in 0.3s")
    assert len(said) == 7 and said[-1].endswith("(database is locked (6)); retrying reading in 6.2s")


def test_without_say_it_waits_quietly(clock):
    assert store_call(Flaky(*busy(2)), LOCAL, 100.0, sleep=clock.sleep, clock=clock) == "done"
    assert clock.sleeps == [0.3125, 0.625]


def test_the_bound_ends_the_waiting_with_one_line(clock):
    fn = Flaky(*busy(100))
    with pytest.raises(StoreUnavailable) as e:
        store_call(fn, REMOTE, 2.0, "moving the alias", sleep=clock.sleep, clock=clock)
    # 0.3125 + 0.625 = 0.94 waited; the next wait (1.25) would end past 2 s: no waiting past the bound
    assert clock.sleeps == [0.3125, 0.625] and fn.calls == 3
    assert str(e.value) == (f"tracking store {REMOTE} busy or unreachable for 1s (3 attempts, limit 2s; "
                            "moving the alias: database is locked (2))")
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_a_wait_that_ends_exactly_at_the_bound_still_runs(clock):
    fn = Flaky(*busy(2))
    assert store_call(fn, LOCAL, 0.3125 + 0.625, sleep=clock.sleep, clock=clock) == "done"
    assert clock.sleeps == [0.3125, 0.625]


def test_the_bound_counts_from_the_first_call(clock):
    def slow_then_busy():
        clock.now += 50.0  # each attempt itself takes 50 s
        raise RuntimeError("database is locked")

    # 50 s + the first wait is within 60 s; the second attempt ends at 100 s: no more waiting
    with pytest.raises(StoreUnavailable, match=r"for 100s \(2 attempts, limit 60s"):
        store_call(slow_then_busy, LOCAL, 60.0, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == [0.3125]


def test_a_read_only_store_fails_at_once(clock):
    fn = Flaky(RuntimeError("attempt to write a readonly database\ndetails"))
    with pytest.raises(StoreReadOnly) as e:
        store_call(fn, LOCAL, 100.0, "writing the tag", sleep=clock.sleep, clock=clock)
    assert str(e.value) == (f"tracking store {LOCAL} is read-only (writing the tag: attempt to write a "
                            "readonly database); nothing more was written")
    assert fn.calls == 1 and clock.sleeps == [] and e.value.__cause__ is None and e.value.__suppress_context__


def test_any_other_error_is_raised_as_it_is(clock):
    err = ValueError("a bug")
    fn = Flaky(*busy(1), err)
    with pytest.raises(ValueError) as e:
        store_call(fn, LOCAL, 100.0, sleep=clock.sleep, clock=clock)
    assert e.value is err and fn.calls == 2 and clock.sleeps == [0.3125]


def test_default_what_names_a_registry_call(clock):
    with pytest.raises(StoreUnavailable, match=r"\(1 attempts, limit 0.1s; registry call: database is locked"):
        store_call(Flaky(*busy(1)), LOCAL, 0.1, sleep=clock.sleep, clock=clock)


def test_the_real_clock_and_sleep_are_the_defaults(monkeypatch):
    monkeypatch.setattr(L, "RETRY_FIRST_S", 0.001)
    assert store_call(Flaky(*busy(2)), LOCAL, 5.0) == "done"


# ---------------------------------------------------------------- the registry lock's calls


class BusyRegistry:
    """A registered model whose first ``busy`` reads fail as a busy store."""

    def __init__(self, busy: int):
        self.busy, self.reads = busy, 0

    def get_registered_model(self, name):
        self.reads += 1
        if self.busy:
            self.busy -= 1
            raise RuntimeError("database is locked")
        return SimpleNamespace(tags={})


def test_the_registry_lock_retries_its_calls_when_it_knows_the_store(monkeypatch):
    monkeypatch.setattr(L, "RETRY_FIRST_S", 0.001)
    reg = BusyRegistry(busy=2)
    assert RegistryLock(reg, "m", "champion", 5.0, 60.0, 0.0, REMOTE)._holder() is None
    assert reg.reads == 3
    with pytest.raises(RuntimeError, match="database is locked"):  # no URI: no retrying
        RegistryLock(BusyRegistry(busy=1), "m", "champion", 5.0, 60.0, 0.0)._holder()


def test_the_registry_lock_retries_for_at_most_its_timeout(monkeypatch):
    monkeypatch.setattr(L, "RETRY_FIRST_S", 0.01)
    with pytest.raises(StoreUnavailable, match=r"limit 0.05s; reading the lock: database is locked") as e:
        RegistryLock(BusyRegistry(busy=10**6), "m", "champion", 0.05, 60.0, 0.0, REMOTE)._holder()
    assert str(e.value).startswith(f"tracking store {REMOTE} busy or unreachable")


def test_promotion_lock_hands_the_uri_to_the_registry_lock():
    lock = promotion_lock(object(), REMOTE, "m", "champion", timeout=7.0)
    assert isinstance(lock, RegistryLock) and lock.uri == REMOTE and lock.timeout == 7.0


class BusyWrites(BusyRegistry):
    """A free lock whose tag writes (``write``: set or delete) keep failing as a busy store."""

    def __init__(self, write: str):
        super().__init__(busy=0)
        self.tags, self.write = {}, write

    def get_registered_model(self, name):
        return SimpleNamespace(tags=dict(self.tags))

    def set_registered_model_tag(self, name, key, value):
        if self.write == "set":
            raise RuntimeError("database is locked")
        self.tags[key] = value

    def delete_registered_model_tag(self, name, key):
        raise RuntimeError("database is locked")


def test_a_busy_lock_write_names_what_it_was_doing(monkeypatch):
    monkeypatch.setattr(L, "RETRY_FIRST_S", 0.01)
    with pytest.raises(StoreUnavailable, match=r"limit 0.05s; taking the lock: database is locked"):
        RegistryLock(BusyWrites("set"), "m", "champion", 0.05, 60.0, 0.0, REMOTE).__enter__()
    lock = RegistryLock(BusyWrites("delete"), "m", "champion", 0.05, 60.0, 0.0, REMOTE)
    with pytest.raises(StoreUnavailable, match=r"limit 0.05s; releasing the lock: database is locked"):
        with lock:
            pass


def test_a_busy_error_stays_busy_whatever_its_cause_says():
    try:
        try:
            raise ValueError("a row was not found")
        except ValueError as inner:
            raise RuntimeError("database is locked") from inner
    except RuntimeError as e:
        assert classify(e, LOCAL) == "transient"


@pytest.mark.parametrize("code", ["EACCES", "EPERM", "EROFS"])
def test_a_lock_file_the_user_cannot_create_is_a_read_only_store(tmp_path, monkeypatch, code):
    import errno
    import os

    def refused(*a, **kw):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(L.os, "open", refused)
    path = tmp_path / "mlflow.db.dsl-promote.lock"
    with pytest.raises(StoreReadOnly) as e:
        L.FileLock(path, 1.0).__enter__()
    assert str(e.value) == (f"cannot open the promotion lock {path}: {os.strerror(getattr(errno, code))} (the "
                            "store's folder is read-only to this user); nothing was written")


def test_other_errors_opening_the_lock_file_are_raised_as_they_are(tmp_path, monkeypatch):
    import errno

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(L.os, "open", full)
    with pytest.raises(OSError, match="No space left") as e:
        L.FileLock(tmp_path / "x.lock", 1.0).__enter__()
    assert not isinstance(e.value, StoreReadOnly)
