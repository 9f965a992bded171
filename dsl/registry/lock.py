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
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse


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


class FileLock:
    """An exclusive ``flock`` on ``path``, polled until ``timeout`` seconds have passed."""

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout, self._fd = Path(path), timeout, None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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

    def __init__(self, client, name: str, alias: str, timeout: float, ttl: float, settle: float):
        self.client, self.name, self.key = client, name, f"dsl.lock.{alias}"
        self.timeout, self.ttl, self.settle = timeout, ttl, settle
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"

    def _holder(self) -> dict | None:
        value = self.client.get_registered_model(self.name).tags.get(self.key)
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
                    self.client.set_registered_model_tag(self.name, self.key, lease)
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
            self.client.delete_registered_model_tag(self.name, self.key)


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
    return RegistryLock(client, name, alias, timeout, ttl, settle)
