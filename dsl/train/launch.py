"""What every Ray Train job (pretraining, fine-tuning) shares: the trainer, the worker's setup,
the MLflow experiment and the logged config."""

from __future__ import annotations

import os

import torch

from dsl.config import Config, dump_config, flatten


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
    """A TorchTrainer running ``loop(loop_config)`` on ``cfg.scale``'s workers, storing under
    ``scale.storage_path/job`` (which must already be resolved, see ``resolve_paths``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dsl.train.pretrain import storage

    storage_path, storage_fs = storage(cfg.scale.storage_path)
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


def experiment_id(client, cfg: Config) -> str:
    """``mlflow.experiment``'s id, created (with ``mlflow.artifact_location``) when missing."""
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(cfg.mlflow.experiment, artifact_location=cfg.mlflow.artifact_location)


def log_config(client, run_id: str, cfg: Config) -> None:
    """The resolved config tree as the run's params (``section.key``)."""
    from mlflow.entities import Param

    items = [(k, "" if v is None else str(v)[:6000]) for k, v in flatten(dump_config(cfg)).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
