"""Starting or joining Ray the same way for every job, locally and on a cluster."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_temp_dir: str | None = None  # of the local Ray this process started, if any


def local_temp_dir() -> str | None:
    """The temp folder of the local Ray this process started (its processes name it)."""
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
    from each node's own environment or instance role. A local Ray is bound to 127.0.0.1; its processes
    inherit this process's environment (storage settings included), so nothing secret is put
    in a runtime_env, where Ray's job API and logs would show it.
    """
    import ray

    if ray.is_initialized():
        return
    joining = cluster_address(address)
    if joining:
        ray.init(address=joining, log_to_driver=False)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes ~/.ray/auth_token
    # short temp dir: Ray's unix socket paths must stay under 107 characters
    global _temp_dir
    temp_dir = _temp_dir = tempfile.mkdtemp(prefix="dslray-", dir="/tmp")
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=temp_dir,
            _node_ip_address="127.0.0.1",
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


def alive_nodes() -> int:
    """How many nodes of the Ray this process started or joined are alive."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def shutdown_ray() -> None:
    """Stop this process's Ray and delete the temp folder :func:`init_ray` made for it, if any.

    Safe to call more than once, and when Ray was joined rather than started (then only the
    connection is closed: a cluster's folders are not ours).
    """
    import ray

    global _temp_dir
    if ray.is_initialized():
        ray.shutdown()
    temp_dir, _temp_dir = _temp_dir, None
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)
