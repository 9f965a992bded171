"""``dsl pretrain``: the driver. Launches the Ray TorchTrainer, tracks the job in MLflow and
registers the backbones when training reaches ``optim.max_steps``."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from urllib.parse import urlparse

from dsl.config import Config, dump_config
from dsl.format import MANIFEST
from dsl.storage import filesystem, is_local, join
from ingest.run import code_version


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


def storage(path: str):
    """(storage_path, storage_filesystem) for RunConfig; S3 honours AWS_ENDPOINT_URL."""
    if not path.startswith("s3://"):
        return path, None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        u = urlparse(endpoint)
        kwargs.update(endpoint_override=u.netloc, scheme=u.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    # with a custom filesystem Ray wants the path without its scheme
    return path.removeprefix("s3://"), pyarrow.fs.S3FileSystem(**kwargs)


def manifest_hash(shards: str) -> str:
    fs, path = filesystem(join(shards, MANIFEST))
    if not fs.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} at {shards}: the ingest did not finish")
    return hashlib.sha256(fs.cat_file(path)).hexdigest()


def _mlflow_run(cfg: Config, job: str, manifest_sha: str) -> str:
    """The job's MLflow run: the unfinished one of this job name (a resume) or a new one."""
    import mlflow
    from mlflow import MlflowClient

    from dsl.train.launch import experiment_id, log_config

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    client = MlflowClient(cfg.mlflow.tracking_uri)
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


def pretrain(cfg: Config) -> dict:
    """Run (or resume) a pretraining job; returns run id, model version and final metrics."""
    from mlflow import MlflowClient

    from dsl.ray_utils import init_ray
    from dsl.registry import register_backbones
    from dsl.train.checkpoint import load_state
    from dsl.train.launch import make_trainer
    from dsl.train.loop import train_loop

    launch_time = time.time()
    cfg = resolve_paths(cfg)
    manifest_sha = manifest_hash(cfg.data.shards)
    job = cfg.scale.name if cfg.scale.resume else f"{cfg.scale.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(cfg.scale.address, num_cpus=None if cfg.scale.address else
             max(2, int(cfg.scale.num_workers * cfg.scale.cpus_per_worker)))
    run_id = _mlflow_run(cfg, job, manifest_sha)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    trainer = make_trainer(cfg, train_loop, {"cfg": dump_config(cfg), "run_id": run_id, "launch_time": launch_time}, job)
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    out = {"run_id": run_id, "job": job, "metrics": result.metrics, "model_version": None,
           "checkpoint": result.checkpoint.path if result.checkpoint else None}
    if result.checkpoint is None:
        return out
    with result.checkpoint.as_directory() as d:
        state = load_state(Path(d))
        out["step"] = state["step"]
        if not state["final"]:
            return out  # stopped early (stop_at_step): the job is resumable, nothing to register
        tags = client.get_run(run_id).data.tags
        if "dsl.model_version" in tags:  # a rerun of a finished job registers nothing new
            out["model_version"] = tags["dsl.model_version"]
            return out
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
