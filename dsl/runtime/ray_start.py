"""Starting or joining Ray the same way for every job."""

from __future__ import annotations

import os
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
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=False,
        configure_logging=False,
    )
