"""Starting or joining Ray the same way for every job, locally and on a cluster."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

_private_dir: str | None = None  # 0700 folder of the local Ray this process started, if any
_temp_dir: str | None = None  # Ray's own root inside it (session_*/ live there)
_saved_env: dict[str, str | None] = {}  # the auth variables as they were before the local start

LOOPBACK = "127.0.0.1"
# Ray's token authentication for a local start: the token lives in the private folder, never ~/.ray
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")


def local_temp_dir() -> str | None:
    """Ray's temp root of the local Ray this process started (its processes name it), else None."""
    return _temp_dir


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster this process joins: ``address``, else the one it runs in, else None.

    Inside a Ray job (what ``dsl submit`` runs) Ray sets ``RAY_ADDRESS`` to its cluster.
    """
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` or the one this job runs in; else start a local Ray.

    Reuses an already initialised Ray (tests share one). A joined cluster is used as it is:
    its nodes declare their own CPUs (``num_cpus`` is ignored), a Ray job keeps the runtime
    environment it was submitted with (Ray refuses a second one) and storage credentials come
    from each node's own environment or instance role. A local Ray's processes inherit this
    process's environment (storage settings included), so nothing secret is put in a
    runtime_env, where Ray's job API and logs would show it.

    A local Ray is private to this process's user:

    - **Loopback only.** Every listener binds 127.0.0.1 (IPv6 sockets ``::ffff:127.0.0.1``):
      gcs_server, raylet (node and object manager), the driver's and workers' core-worker
      gRPC servers, the dashboard head (``dashboard_host``) and its metrics port, the
      dashboard agent (HTTP/job agent, gRPC, metrics export), the runtime-env agent and the
      autoscaler monitor's metrics port. Ray chooses all of them from the node IP alone: the
      C++ servers listen on loopback only when the node IP is 127.0.0.1 (else on ``::`` /
      ``0.0.0.0``), the Python agents bind the node IP (plus loopback). But ``ray.init``
      rewrites a loopback ``_node_ip_address`` to the machine's routable IP
      (``services.resolve_ip_for_localhost``) unless Ray clusters are "disabled"
      (``ray_constants.ENABLE_RAY_CLUSTER``, Ray's switch for laptops, read when ``ray`` is
      imported), so that switch is turned off for the duration of ``ray.init`` only: a later
      join of a real cluster from this process is unaffected. There is no per-listener bind
      option (no ``RAY_*`` variable or system config), and none is needed: no listener of a
      local start stays on a non-loopback address (tests/dsl/runtime/test_ray_bind.py lists
      them). Not started here, so not bound: the Ray client server (``ray start
      --ray-client-server-port``) and the external debugger (``RAY_DEBUG`` /
      ``ray_debugger_external``). Ports stay Ray's: some are fixed defaults (52365 dashboard
      agent, 44217/44227 metrics), which ``ray.init`` cannot change.
    - **Token authentication on** (``RAY_AUTH_MODE=token``), whatever this process's
      environment said: another user of the machine reaches loopback too. The token is a
      fresh random one in a 0600 file of the private folder (``RAY_AUTH_TOKEN_PATH``), never
      ``~/.ray/auth_token``; Ray's processes inherit the two variables, and
      :func:`shutdown_ray` gives them back their previous values.
    - **A 0700 folder.** Ray makes its temp root and every folder below it mode 0777
      (``try_to_create_directory``) and its logs 0644, so its root is a subfolder of a
      ``mkdtemp`` folder (0700) that nobody else can enter; :func:`shutdown_ray` (also at
      exit) removes it.
    """
    import ray

    if ray.is_initialized():
        return
    joining = cluster_address(address)
    if joining:
        ray.init(address=joining, log_to_driver=False)
        return
    global _private_dir, _temp_dir
    # short path: Ray's unix socket paths must stay under 107 characters
    _private_dir = tempfile.mkdtemp(prefix="dslray-", dir="/tmp")  # 0700, ours
    _temp_dir = os.path.join(_private_dir, "ray")  # Ray chmods this one 0777: only reachable through ours
    try:
        _use_private_token(_private_dir)
        with _loopback_node():
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                dashboard_host=LOOPBACK,
                _temp_dir=_temp_dir,
                _node_ip_address=LOOPBACK,
                log_to_driver=False,
                configure_logging=False,
            )
    except BaseException:
        shutdown_ray()
        raise
    # Registered after ray.init, so it runs before Ray's own exit hook: a job that simply
    # returns (the CLI) stops its Ray and removes the folder too.
    atexit.unregister(shutdown_ray)  # once, and after this ray.init's own hook
    atexit.register(shutdown_ray)


def _use_private_token(folder: str) -> None:
    """Turn on Ray's token auth for this process and its children, with a new token in ``folder``."""
    path = os.path.join(folder, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    _saved_env.update({k: os.environ.get(k) for k in AUTH_ENV if k not in _saved_env})
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=path)
    _reload_auth()


def _restore_auth_env() -> None:
    """Give the auth variables the values they had before :func:`_use_private_token`."""
    if not _saved_env:
        return
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()
    _reload_auth()


def _reload_auth() -> None:
    # Ray caches the mode (RayConfig) and the token (its C++ loader) per process
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Keep ``ray.init`` from replacing the loopback node IP by the machine's routable one."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def alive_nodes() -> int:
    """How many nodes of the Ray this process started or joined are alive."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def shutdown_ray() -> None:
    """Stop this process's Ray and delete the folder :func:`init_ray` made for it, if any.

    Safe to call more than once, and when Ray was joined rather than started (then only the
    connection is closed: a cluster's folders are not ours). The auth variables a local start
    set are restored.
    """
    import ray

    global _private_dir, _temp_dir
    if ray.is_initialized():
        ray.shutdown()
    private_dir, _private_dir, _temp_dir = _private_dir, None, None
    if private_dir:
        shutil.rmtree(private_dir, ignore_errors=True)
    _restore_auth_env()
