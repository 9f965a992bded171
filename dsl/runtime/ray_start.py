"""Starting or joining Ray the same way for every job."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from dsl.contracts.storage import storage_env

_temp_dir: str | None = None  # of the local Ray this process started, if any


def local_temp_dir() -> str | None:
    """The temp folder of the local Ray this process started (its processes name it)."""
    return _temp_dir


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (a cluster) or start a local Ray bound to 127.0.0.1.

    Reuses an already initialised Ray (tests share one). Storage credentials and endpoints
    (AWS_* ...) are forwarded to workers so s3:// works the same in every task.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes ~/.ray/auth_token
    runtime_env = {"env_vars": storage_env()}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return
    # short temp dir: Ray's unix socket paths must stay under 107 characters
    global _temp_dir
    temp_dir = _temp_dir = tempfile.mkdtemp(prefix="dslray-", dir="/tmp")
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=temp_dir,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env,
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
