"""Mutual exclusion for alias changes: one promotion or rollback of a model at a time.

MLflow has no compare-and-set on aliases, so two promotions that read the champion at the same
moment would both decide against it and one update would be lost. The read-decide-write
section therefore runs under a lock:

* ``file`` (default for ``sqlite:`` and local ``file:`` stores): ``fcntl.flock`` on
  ``<store>.dsl-promote.lock`` beside the database. The kernel serialises every holder,
  threads included (each acquisition opens its own file description), and frees the lock when
  a holder dies. Needs a local filesystem: flock is not reliable over NFS.
* ``registry`` (default for every other tracking URI, e.g. an MLflow server): a registered-model
  tag ``dsl.lock.<alias>`` holding ``{"owner", "expires"}``. A client writes it only when it is
  absent or expired, waits ``settle`` seconds and reads it back; it holds the lock only if its
  own token survived. This is safe while (a) a client's read-then-write of the tag takes less
  than ``settle`` (a competing write then lands before the verification and is seen), (b) a
  holder finishes within ``ttl`` and (c) the clients' clocks agree to well under ``ttl``. The
  holder re-checks its token right before it writes (:meth:`RegistryLock.check`).

A busy or unreachable store (sqlite's ``database is locked``, MLflow's ``RESOURCE_EXHAUSTED``
or ``TEMPORARILY_UNAVAILABLE``, an HTTP 5xx or a refused connection from an ``mlflow server``)
is not a failure of the promotion: every registry call goes through :func:`store_call`, which
retries it with exponential backoff for a bounded total and then raises one
:class:`StoreUnavailable` naming the tracking URI. Every call it retries is idempotent (reads,
tag and alias writes of fixed values). A read-only store is no such wait: one
:class:`StoreReadOnly` at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from dsl.contracts.errors import JobFailed

# backoff of store_call: the first wait, its cap (doubling in between, plus up to 50% jitter)
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 5.0
# the sqlite store reports a read-only file this way (a chmod, a read-only mount, or a file
# whose header asks for read-only access); pysqlite wraps it, MLflow wraps that again
READ_ONLY = ("readonly database", "read-only database", "read-only file system")
# transient errors of the store: sqlite busy (pysqlite text), MLflow's codes for overload
BUSY = ("database is locked", "database table is locked", "database is busy")
TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED",
                   "DEADLINE_EXCEEDED")


class LockTimeout(TimeoutError):
    """The lock stayed taken for the whole timeout; the message names the lock and holder."""


def local_store(tracking_uri: str) -> Path | None:
    """The database file (sqlite) or folder (file store) of a local tracking URI, else None."""
    if tracking_uri.startswith("sqlite:///"):
        # sqlite:///rel/path.db is relative, sqlite:////abs/path.db absolute (SQLAlchemy rules)
        path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
        return Path(path) if path and path != ":memory:" else None
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" and tracking_uri:  # a plain local path is a file store
        return Path(tracking_uri)
    return None


class StoreUnavailable(JobFailed):
    """The tracking store stayed busy or unreachable for the whole retry bound."""


class StoreReadOnly(JobFailed):
    """The tracking store refuses writes; nothing more was written."""


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def classify(e: BaseException, tracking_uri: str) -> str | None:
    """``"read-only"``, ``"transient"`` or None (any other error: raised as it is).

    Args:
        e: What a registry call raised.
        tracking_uri: HTTP 5xx (``INTERNAL_ERROR``) is transient only from a tracking server;
            from a local store it is a bug and keeps its traceback.
    """
    text = str(getattr(e, "message", None) or e).lower()
    cause = e.__cause__ or e.__context__
    if cause is not None:
        text += " " + str(cause).lower()
    if any(m in text for m in READ_ONLY):
        return "read-only"
    if any(m in text for m in BUSY):
        return "transient"
    code = getattr(e, "error_code", None)
    if code in TRANSIENT_CODES:
        return "transient"
    remote = tracking_uri.startswith(("http://", "https://"))
    if remote and (code == "INTERNAL_ERROR" or "failed with exception" in text):
        return "transient"  # HTTP 5xx, or no answer at all (refused, reset, timed out)
    if isinstance(e, ConnectionError) and remote:
        return "transient"
    return None


def store_call(fn, tracking_uri: str, bound_s: float, what: str = "registry call",
               say=None, sleep=time.sleep, clock=time.monotonic):
    """``fn()``, retried while the store is busy or unreachable, at most ``bound_s`` seconds.

    Args:
        fn: An idempotent registry call (it may run more than once).
        tracking_uri: Named in the errors.
        bound_s: Total seconds of retrying; the last wait never runs past it.
        what: What ``fn`` does, for the messages.
        say: Called with one line before each wait (None: quiet).
        sleep: Injected by tests; ``time.sleep``.
        clock: Injected by tests; ``time.monotonic``.

    Raises:
        StoreReadOnly: The store refused a write as read-only.
        StoreUnavailable: Still busy or unreachable after ``bound_s`` seconds.
    """
    start, wait, attempts = clock(), RETRY_FIRST_S, 0
    while True:
        attempts += 1
        try:
            return fn()
        except Exception as e:
            kind = classify(e, tracking_uri)
            if kind == "read-only":
                raise StoreReadOnly(f"tracking store {tracking_uri} is read-only ({what}: "
                                    f"{_first_line(e)}); nothing more was written") from None
            if kind is None:
                raise
            delay = min(wait, RETRY_MAX_S) * (1 + random.random() / 2)
            if clock() + delay - start > bound_s:
                raise StoreUnavailable(
                    f"tracking store {tracking_uri} busy or unreachable for {clock() - start:.0f}s "
                    f"({attempts} attempts, limit {bound_s:g}s; {what}: {_first_line(e)})") from None
            if say is not None:
                say(f"tracking store {tracking_uri} busy or unreachable ({_first_line(e)}); "
                    f"retrying {what} in {delay:.1f}s")
            sleep(delay)
            wait *= 2


class FileLock:
    """An exclusive ``flock`` on ``path``, polled until ``timeout`` seconds have passed."""

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout, self._fd = Path(path), timeout, None

    def __enter__(self) -> FileLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise StoreReadOnly(f"cannot open the promotion lock {self.path}: {e.strerror} (the store's "
                                "folder is read-only to this user); nothing was written") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = self.path.read_text(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise LockTimeout(f"lock {self.path} still held by {holder} after {self.timeout}s") from None
                time.sleep(0.02 + random.random() * 0.03)
        self._fd = fd
        # who holds it, for the timeout message of the next one waiting
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        return self

    def check(self) -> None:
        """Nothing to check: the kernel keeps the lock until release or death."""

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


class RegistryLock:
    """A lease held as a tag on the registered model (see the module docstring for the rules)."""

    def __init__(self, client, name: str, alias: str, timeout: float, ttl: float, settle: float,
                 tracking_uri: str | None = None):
        self.client, self.name, self.key = client, name, f"dsl.lock.{alias}"
        self.timeout, self.ttl, self.settle = timeout, ttl, settle
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.uri = tracking_uri

    def _call(self, fn, what: str):
        # a busy store is retried (for at most the lock timeout) when the URI is known
        return fn() if self.uri is None else store_call(fn, self.uri, self.timeout, what)

    def _holder(self) -> dict | None:
        model = self._call(lambda: self.client.get_registered_model(self.name), "reading the lock")
        value = model.tags.get(self.key)
        try:
            holder = json.loads(value) if value else None
        except ValueError:
            return None  # garbage in the tag: treat as free
        return holder if isinstance(holder, dict) else None

    def __enter__(self) -> RegistryLock:
        from mlflow.exceptions import MlflowException

        deadline = time.time() + self.timeout
        while True:
            holder = self._holder()
            if holder is None or holder.get("expires", 0) < time.time():
                lease = json.dumps({"owner": self.token, "expires": time.time() + self.ttl})
                try:
                    self._call(lambda lease=lease: self.client.set_registered_model_tag(self.name, self.key, lease),
                               "taking the lock")
                except MlflowException:
                    holder = None  # a competing write collided with ours (e.g. the same insert)
                else:
                    time.sleep(self.settle)  # let a competing write land before we look
                    holder = self._holder()
                    if holder and holder.get("owner") == self.token:
                        return self
            if time.time() > deadline:
                raise LockTimeout(f"registry lock '{self.key}' on model '{self.name}' still held by "
                                  f"{holder.get('owner') if holder else 'unknown'} after {self.timeout}s")
            time.sleep(0.1 + random.random() * 0.2)

    def check(self) -> None:
        """Raise if the lease was lost (expired and taken over) before a write."""
        holder = self._holder()
        if not holder or holder.get("owner") != self.token:
            raise LockTimeout(f"lost registry lock '{self.key}' on model '{self.name}' "
                              f"(now held by {holder.get('owner') if holder else 'nobody'}); nothing written")

    def __exit__(self, *exc) -> None:
        holder = self._holder()
        if holder and holder.get("owner") == self.token:
            self._call(lambda: self.client.delete_registered_model_tag(self.name, self.key),
                       "releasing the lock")


def promotion_lock(client, tracking_uri: str, name: str, alias: str, kind: str = "auto",
                   timeout: float = 120.0, ttl: float = 300.0, settle: float = 1.0):
    """The lock that serialises alias changes of ``name``/``alias`` (a context manager).

    Args:
        client: MlflowClient of ``tracking_uri``.
        tracking_uri: Decides the kind when ``kind`` is ``auto``.
        name: Registered model.
        alias: The alias being moved (registry locks are per alias).
        kind: ``auto``, ``file`` or ``registry``.
        timeout: Seconds to wait for the lock.
        ttl: Registry lock lease length.
        settle: Registry lock verification delay.

    Raises:
        ValueError: ``file`` asked for a tracking URI without a local store.
    """
    store = local_store(tracking_uri)
    if kind == "file" or (kind == "auto" and store is not None):
        if store is None:
            raise ValueError(f"promote.lock=file needs a local sqlite or file store, not '{tracking_uri}'")
        return FileLock(Path(f"{store}.dsl-promote.lock"), timeout)
    if kind not in ("auto", "registry"):
        raise ValueError(f"promote.lock must be auto, file or registry, got '{kind}'")
    return RegistryLock(client, name, alias, timeout, ttl, settle, tracking_uri)
