"""MLflow tracking for every job: experiments, the logged config, metrics.

Only rank 0 of a Ray Train job and the drivers write; the other ranks never touch MLflow.
"""

from __future__ import annotations

import time

from dsl.contracts.config import Config, dump_config, flatten


def client(tracking_uri: str):
    """Return an MlflowClient for ``tracking_uri``.

    The URI is also made the process default, as mlflow's artifact helpers read that.
    """
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


def experiment_id(mlflow_client, cfg: Config) -> str:
    """``mlflow.experiment``'s id, created (with ``mlflow.artifact_location``) when missing."""
    exp = mlflow_client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    return mlflow_client.create_experiment(cfg.mlflow.experiment, artifact_location=cfg.mlflow.artifact_location)


def log_config(mlflow_client, run_id: str, cfg: Config) -> None:
    """The resolved config tree as the run's params (``section.key``)."""
    from mlflow.entities import Param

    items = [(k, "" if v is None else str(v)[:6000]) for k, v in flatten(dump_config(cfg)).items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log ``metrics`` at ``step`` in one request."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


class MetricLogger:
    """Rank 0's MLflow writer: metrics every N steps and the node's system metrics.

    Built with ``run_id=None`` (every other rank) it does nothing.
    """

    def __init__(self, cfg: Config, run_id: str | None):
        self.client, self.monitor, self.run_id = None, None, run_id
        if run_id is None:
            return
        self.client = client(cfg.mlflow.tracking_uri)
        if cfg.mlflow.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=True,
                                                tracking_uri=cfg.mlflow.tracking_uri)
            self.monitor.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``; a no-op on ranks other than 0."""
        if self.client is not None:
            log_metrics(self.client, self.run_id, metrics, step)

    def close(self) -> None:
        """Stop the system-metrics monitor, if one was started."""
        if self.monitor is not None:
            self.monitor.finish()
