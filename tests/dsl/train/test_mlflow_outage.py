"""A real pretraining job whose ``mlflow server`` goes down mid-run: training must not notice.

Rank 0 logs every step; once the server holds its first point it is stopped, and started again
only after rank 0 has dropped points (its warning is in the worker's log). The job must finish,
checkpoint and register (the driver's own requests, made after training, need the server: with
it still down they would fail after the MLflow client's retries, with the checkpoint in storage
and a rerun of the job registering it).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from fixtures.shards import ingested_shards, tiny_config
from mlflow import MlflowClient

from dsl.runtime.ray_start import local_temp_dir
from dsl.runtime.tracking import DROPPED_POINTS
from dsl.train.pretrain import pretrain

pytestmark = pytest.mark.slow  # Ray Train + DeepSpeed + an mlflow server

MAX_STEPS = 40
FIRST = "launch_to_first_step_s"  # logged at step 0, before the first step
# rank 0's warning about training points it dropped: "... dropped 16 points (loss, lr, ...; steps 3..4)"
DROP = re.compile(r"dropped \d+ points \(([^;]+); steps (\d+)\.\.(\d+)\)")


@pytest.fixture(scope="module")
def outage_shards(tmp_path_factory, ray_session):
    return ingested_shards(tmp_path_factory.mktemp("outage"), "sen12ms", 128, seed=13)


def wait_for(condition, timeout_s: float, what: str, job: threading.Thread):
    deadline = time.time() + timeout_s
    while not (value := condition()):
        if time.time() > deadline or not job.is_alive():
            raise AssertionError(f"no {what} (job {'ended' if not job.is_alive() else 'still running'})")
        time.sleep(0.3)
    return value


def worker_warnings(uri: str) -> list[str]:
    """Rank 0's tracking warnings about ``uri`` in the session Ray's worker logs."""
    lines = []
    for f in Path(local_temp_dir()).glob("session_*/logs/worker-*"):
        try:
            lines += [ln for ln in f.read_text(errors="replace").splitlines() if f"MLflow logging to {uri}:" in ln]
        except OSError:
            pass
    return lines


def test_training_survives_a_tracking_server_outage(outage_shards, tmp_path, ray_session, mlflow_server):
    server = mlflow_server
    # the tracking URI given last wins over tiny_config's sqlite one
    cfg = tiny_config(tmp_path, outage_shards, "data.split=null", f"mlflow.tracking_uri={server.uri}",
                      f"optim.max_steps={MAX_STEPS}", "scale.log_every=1", f"scale.checkpoint_every={MAX_STEPS}",
                      "scale.name=outage", "scale.max_failures=0", "mlflow.retry_budget_s=1",
                      "mlflow.flush_timeout_s=120", "mlflow.system_metrics_interval_s=1")
    box: dict = {}

    def job() -> None:
        try:
            box["out"] = pretrain(cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            box["error"] = e

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    client = MlflowClient(server.uri)

    def logged_run() -> str | None:
        """The run, once rank 0 logged its first point (before its first step)."""
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs[0].info.run_id if runs and client.get_metric_history(runs[0].info.run_id, FIRST) else None

    run_id = wait_for(logged_run, 500, "first logged point", thread)
    server.stop()
    wait_for(lambda: [w for w in worker_warnings(server.uri) if DROP.search(w)], 300,
             "warning about dropped training points", thread)
    server.start()
    thread.join(500)
    assert not thread.is_alive() and "error" not in box, box.get("error")

    out = box["out"]
    assert out["step"] == MAX_STEPS and out["model_version"] == "1" and out["run_id"] == run_id
    assert (Path(out["checkpoint"]) / "model.safetensors").exists()
    assert client.get_run(run_id).info.status == "FINISHED"

    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    missing = set(range(1, MAX_STEPS + 1)) - logged
    assert missing and [m.step for m in client.get_metric_history(run_id, FIRST)] == [0], sorted(logged)
    # the warnings name what went: points, keys, steps; those steps are the ones missing
    warnings = worker_warnings(server.uri)
    drops = [(w, m) for w in warnings if (m := DROP.search(w))]
    assert drops, warnings
    for w, m in drops:
        lo, hi = int(m[2]), int(m[3])
        assert "loss" in m[1].split(", ") and set(range(max(lo, 1), hi + 1)) <= missing, (w, sorted(missing))
    # once the server answered again, the count went there too: every per-step key of each missing step
    per_step = [k for k in client.get_run(run_id).data.metrics
                if not k.startswith("system/") and k not in (DROPPED_POINTS, FIRST, "torch_threads")]
    count = client.get_metric_history(run_id, DROPPED_POINTS)
    assert count and count[-1].value >= len(per_step) * len(missing), (count, per_step, sorted(missing))
    summary = [w for w in warnings if "logged as mlflow_dropped_points" in w]
    assert summary and f"{int(count[-1].value)} in total" in summary[-1], summary
