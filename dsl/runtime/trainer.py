"""What every Ray Train job (pretraining, fine-tuning) shares.

That is the driver's path resolution, the trainer and the worker's set-up.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dsl.contracts.config import Config
from dsl.contracts.storage import is_local, ray_storage


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
    """CPUs for a local Ray that fits ``cfg.scale``'s workers; None when joining a cluster."""
    return None if cfg.scale.address else max(2, int(cfg.scale.num_workers * cfg.scale.cpus_per_worker))


def setup_worker(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker; sets threads and the accelerator."""
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
