"""What every Ray Train job (pretraining, fine-tuning) shares.

That is the driver's path resolution and Ray start, the trainer and the worker's set-up.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from dsl.contracts.config import Config
from dsl.contracts.errors import UserError
from dsl.contracts.storage import filesystem, is_local, join, ray_storage
from dsl.runtime.device import configure_backends
from dsl.runtime.ray_start import alive_nodes, cluster_address, init_ray


def resolve_paths(cfg: Config) -> Config:
    """Workers run in other folders (and other machines): make local paths absolute."""
    upd = cfg.model_copy(deep=True)
    if is_local(upd.data.shards):
        upd.data.shards = str(Path(upd.data.shards.removeprefix("file://")).resolve())
    if is_local(upd.scale.storage_path):
        upd.scale.storage_path = str(Path(upd.scale.storage_path).resolve())
    uri = upd.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        upd.mlflow.tracking_uri = f"sqlite:///{db}"
    if upd.mlflow.artifact_location is None and upd.mlflow.tracking_uri.startswith("sqlite:///"):
        upd.mlflow.artifact_location = str(Path(upd.mlflow.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return upd


def local_cpus(cfg: Config) -> int | None:
    """CPUs for a local Ray that fits ``cfg.scale``'s workers.

    None when joining a cluster (``scale.address``, or the Ray job this runs in): its nodes
    have their own.
    """
    if cluster_address(cfg.scale.address):
        return None
    return max(2, int(cfg.scale.num_workers * cfg.scale.cpus_per_worker))


def require_shared_tracking(tracking_uri: str, nodes: int) -> None:
    """Refuse a tracking store on one node's disk when the job's Ray has more than one node.

    Rank 0 logs the metrics and may land on any node; a sqlite file or an ``mlruns`` folder on
    the driver's disk is not there.

    Raises:
        UserError: ``tracking_uri`` is a sqlite or file store and ``nodes`` > 1.
    """
    scheme = urlparse(tracking_uri).scheme
    on_disk = scheme in ("sqlite", "file") or (scheme == "" and not tracking_uri.startswith("databricks"))
    if nodes > 1 and on_disk:
        raise UserError(f"mlflow.tracking_uri={tracking_uri} is on one node's disk, but this Ray cluster has "
                        f"{nodes} nodes: run an `mlflow server` and set mlflow.tracking_uri=http://<host>:<port>")


def start_ray(cfg: Config) -> None:
    """Start or join Ray for a training job, and check every node can reach its tracking store.

    Raises:
        UserError: See :func:`require_shared_tracking`.
    """
    init_ray(cfg.scale.address, num_cpus=local_cpus(cfg))
    require_shared_tracking(cfg.mlflow.tracking_uri, alive_nodes())


def setup_worker(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker; sets threads and the accelerator.

    On GPU also the process-wide speed settings (:func:`dsl.runtime.device.configure_backends`);
    the model's (``scale.channels_last``, ``scale.compile``) wait for the model:
    :func:`dsl.runtime.device.prepare_model`.
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.scale.use_gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
        device = torch.device("cpu")
    torch.set_num_threads(cfg.scale.torch_threads or max(1, int(cfg.scale.cpus_per_worker)))
    configure_backends(cfg.scale, device)
    return rank, world, device


def make_trainer(cfg: Config, loop, loop_config: dict, job: str, keep_checkpoints: int = 2):
    """Return a TorchTrainer running ``loop(loop_config)`` on ``cfg.scale``'s workers.

    It stores checkpoints under ``scale.storage_path/job``; the path must already be resolved
    (see :func:`resolve_paths`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs = ray_storage(cfg.scale.storage_path)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scale.num_workers,
            use_gpu=cfg.scale.use_gpu,
            resources_per_worker={"CPU": cfg.scale.cpus_per_worker, **({"GPU": 1} if cfg.scale.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=job,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scale.use_gpu else "gloo"),
    )


# A failure every rank of a job met alike (a data or training check whose decision is
# all-reduced). Raised in the workers it would make Ray Train restart the job, which would fail
# the same way: rank 0 writes it here instead, every rank returns, and the driver raises it.
# Ray's Result cannot carry it: Ray Train 2 keeps only the metrics reported with a checkpoint.
FAILURE = "failure.json"


def _failure_url(cfg: Config, job: str) -> str:
    return join(cfg.scale.storage_path, job, FAILURE)


def write_failure(cfg: Config, job: str, message: str) -> None:
    """Record the job's failure (called by rank 0 of the workers)."""
    import json

    fs, path = filesystem(_failure_url(cfg, job))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # object stores: no folders, a no-op
    fs.pipe_file(path, json.dumps({"message": message}).encode())


def take_failure(cfg: Config, job: str) -> str | None:
    """The failure a job's workers recorded, removing it (None: none); the driver calls it."""
    import json

    fs, path = filesystem(_failure_url(cfg, job))
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    fs.rm_file(path)
    try:
        return str(json.loads(data)["message"])
    except (ValueError, KeyError, TypeError):
        return f"the job's workers failed; their record {path} is unreadable"
