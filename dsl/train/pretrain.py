"""``dsl pretrain``: the driver.

Launches the Ray TorchTrainer, tracks the job in MLflow and registers the backbones when
training reaches ``optim.max_steps``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dsl.contracts.config import Config, dump_config
from dsl.contracts.errors import JobFailed
from dsl.contracts.manifest import manifest_sha256, read_manifest
from dsl.contracts.provenance import code_version
from dsl.contracts.shard_format import MANIFEST
from dsl.contracts.storage import join
from dsl.data.checks import check_crop
from dsl.runtime.trainer import resolve_paths, start_ray, take_failure


def _mlflow_run(cfg: Config, job: str, manifest_sha: str) -> str:
    """The job's MLflow run: the unfinished one of this job name (a resume) or a new one."""
    from dsl.runtime.tracking import client as mlflow_client
    from dsl.runtime.tracking import experiment_id, log_config

    client = mlflow_client(cfg.mlflow.tracking_uri)
    exp_id = experiment_id(client, cfg)
    runs = client.search_runs([exp_id], filter_string=f"tags.`dsl.job` = '{job}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    if runs:
        return runs[0].info.run_id
    tags = {
        "dsl.job": job,
        "dsl.manifest_url": join(cfg.data.shards, MANIFEST),
        "dsl.manifest_sha256": manifest_sha,
        "dsl.code_version": code_version(),
        "mlflow.runName": job,
    }
    run = client.create_run(exp_id, tags=tags)
    log_config(client, run.info.run_id, cfg)
    return run.info.run_id


def worker_job_failure(error: BaseException) -> JobFailed | None:
    """The :class:`JobFailed` a training worker raised, out of Ray's wrapping of it, or None.

    Ray Train (2.x, v2) raises ``WorkerGroupError`` with ``worker_failures``: rank -> the
    worker's exception, wrapped with its traceback text (the original in ``_base_exc``). Its
    message is every worker's traceback; the user needs the one line the worker meant.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, JobFailed):
            return e
        failures = getattr(e, "worker_failures", None)
        todo += list(failures.values()) if isinstance(failures, dict) else []
        todo += [getattr(e, "_base_exc", None), getattr(e, "cause", None), e.__cause__]
    return None


def check_weights_finite(directory: Path) -> None:
    """Refuse to register a checkpoint whose weights hold a NaN or an infinity.

    Raises:
        JobFailed: Naming the checkpoint and the first tensors that are not finite.
    """
    import torch
    from safetensors.torch import load_file

    from dsl.contracts.model_card import WEIGHTS

    weights = load_file(str(directory / WEIGHTS))
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise JobFailed(f"checkpoint {directory}: {len(bad)} weight tensors hold NaN or infinite values "
                        f"(e.g. {', '.join(bad[:3])}): not registered")


def pretrain(cfg: Config) -> dict:
    """Run (or resume) a pretraining job; returns run id, model version and final metrics."""
    from dsl.registry import register_backbones
    from dsl.runtime.checkpoint import load_state, local_copy
    from dsl.runtime.tracking import client as mlflow_client
    from dsl.runtime.trainer import make_trainer
    from dsl.train.loop import train_loop

    launch_time = time.time()
    cfg = resolve_paths(cfg)
    manifest_sha = manifest_sha256(cfg.data.shards)
    check_crop(cfg.data, read_manifest(cfg.data.shards))  # here: a worker's error would be retried
    job = cfg.scale.name if cfg.scale.resume else f"{cfg.scale.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    start_ray(cfg)  # joins the cluster this job runs in, if any
    run_id = _mlflow_run(cfg, job, manifest_sha)
    client = mlflow_client(cfg.mlflow.tracking_uri)
    trainer = make_trainer(cfg, train_loop, {"cfg": dump_config(cfg), "run_id": run_id, "launch_time": launch_time}, job)
    take_failure(cfg, job)  # a resumed job's earlier failure is not this attempt's
    try:
        result = trainer.fit()
    except Exception as e:
        client.set_terminated(run_id, status="FAILED")
        failure = worker_job_failure(e)
        if failure is not None:  # the worker's own one-line reason, without Ray's tracebacks
            raise JobFailed(" ".join(str(failure).split())) from e
        raise
    failure = take_failure(cfg, job)
    if failure is not None:  # stopped by a check every rank made alike (dsl.train.loop)
        client.set_terminated(run_id, status="FAILED")
        raise JobFailed(failure)
    out = {"run_id": run_id, "job": job, "metrics": result.metrics, "model_version": None,
           "checkpoint": result.checkpoint.path if result.checkpoint else None}
    if result.checkpoint is None:
        return out
    with local_copy(result.checkpoint) as d:
        state = load_state(Path(d))
        out["step"] = state["step"]
        if not state["final"]:
            return out  # stopped early (stop_at_step): the job is resumable, nothing to register
        tags = client.get_run(run_id).data.tags
        if "dsl.model_version" in tags:  # a rerun of a finished job registers nothing new
            out["model_version"] = tags["dsl.model_version"]
            return out
        try:
            check_weights_finite(Path(d))
        except JobFailed:
            client.set_terminated(run_id, status="FAILED")
            raise
        version = register_backbones(
            d, run_id, cfg.mlflow.registered_model, cfg.mlflow.alias,
            {"run_id": run_id, "manifest_sha256": manifest_sha, "steps": str(state["step"]),
             "manifest_url": join(cfg.data.shards, MANIFEST)},
            cfg.mlflow.tracking_uri,
        )
    client.set_tag(run_id, "dsl.model_version", version)
    client.set_terminated(run_id, status="FINISHED")
    out["model_version"] = version
    return out


def command(cfg: Config, args: argparse.Namespace) -> int:
    """``dsl pretrain``: run (or resume) the job and print its run, step and model version."""
    out = pretrain(cfg)
    keep = ("run_id", "job", "step", "model_version", "checkpoint")
    print(json.dumps({k: out[k] for k in keep if k in out}, indent=1, default=str))
    return 0
