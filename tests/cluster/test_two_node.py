"""``dsl submit --wait -- pretrain`` on a real two-node Ray cluster, and a node lost mid-run.

The cluster is ``ray start --head`` plus ``ray start --address`` on 127.0.0.1, one CPU each, so
the two training workers land on different nodes. The nodes carry the S3 variables in their own
environment, as real nodes carry their credentials; the submitter sends none. Shards and
checkpoints live on moto's S3 server, runs and models in a real ``mlflow server``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
import s3fs
from fixtures.services import REPO, MlflowServer, make_bucket
from mlflow import MlflowClient

from cluster import jobs
from dsl.contracts.config import IngestConfig
from dsl.registry import load_backbones
from ingest.run import ingest
from ingest.synth import synthesise

pytestmark = pytest.mark.slow  # a Ray cluster of two nodes, DeepSpeed jobs

BUCKET = "dsl-two-node"


@pytest.fixture(scope="module")
def shards(ray_two_nodes, s3_server, tmp_path_factory) -> str:
    """Synthetic shards on S3, written by Ray tasks on the cluster's nodes (their credentials)."""
    import ray

    from dsl.runtime.ray_start import shutdown_ray

    make_bucket(BUCKET)
    raw = tmp_path_factory.mktemp("two-node") / "raw"
    synthesise(raw, "sen12ms", 96, seed=13, size=64)
    joins = not ray.is_initialized()  # else the session's Ray runs the tasks: it is not ours to stop
    try:
        ingest(IngestConfig(source="sen12ms", input=str(raw), output=f"s3://{BUCKET}/shards", shard_size_mb=0.5,
                            progress=False, address=ray_two_nodes.gcs))
    finally:
        if joins:
            shutdown_ray()
    return f"s3://{BUCKET}/shards"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A real ``mlflow server``: rank 0 may run on either node, a sqlite file on one would not do."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()


def overrides(shards: str, tracking_uri: str, name: str, *extra: str) -> list[str]:
    return ["--config", "configs/pretrain/tiny.yaml", f"data.shards={shards}", "data.split=null",
            f"scale.storage_path=s3://{BUCKET}/runs", f"scale.name={name}", f"mlflow.tracking_uri={tracking_uri}",
            f"mlflow.registered_model={name}", "mlflow.system_metrics=false", "scale.log_every=1", *extra]


def submit(dashboard: str, submission_id: str, args: list[str]) -> subprocess.Popen:
    """``dsl submit --wait -- pretrain ...`` from a submitter that holds no storage credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.Popen([sys.executable, "-m", "dsl.cli", "submit", "--address", dashboard, "--id", submission_id,
                             "--wait", "--", "pretrain", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def job_log(dashboard: str, submission_id: str) -> str:
    """The job's status and the end of its driver log, for a failure's message."""
    return f"{jobs.status(dashboard, submission_id)}\n{jobs.logs(dashboard, submission_id)[-4000:]}"


def train_workers(dashboard: str, state: str | None = None) -> list:
    """Ray Train's worker actors in the cluster (alive and dead, or in ``state``)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), *([("state", "=", state)] if state else [])]
    return list_actors(address=dashboard, filters=filters, limit=1000, raise_on_missing_output=False)


def history(uri: str, run_id: str, key: str) -> list:
    return MlflowClient(uri).get_metric_history(run_id, key)


def registered_checkpoint(fs: s3fs.S3FileSystem, run_dir: str) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered, if any."""
    fs.invalidate_cache()
    try:
        state = json.loads(fs.cat(f"{run_dir}/checkpoint_manager_snapshot.json"))
    except (OSError, ValueError):
        return None  # not written yet, or caught mid-write
    latest = state.get("latest_checkpoint_result")
    return latest["metrics"]["step"] if latest else None


def test_pretrain_job_spans_two_nodes_and_registers(ray_two_nodes, shards, tracking):
    name, steps = "two-node-a", 2
    started = time.time()
    sid = f"{name}-{uuid.uuid4().hex[:6]}"
    proc = submit(ray_two_nodes.dashboard, sid, overrides(shards, tracking.uri, name, f"optim.max_steps={steps}",
                                                          f"scale.checkpoint_every={steps}"))
    out, _ = proc.communicate(timeout=600)
    wall = time.time() - started
    assert proc.returncode == 0 and "SUCCEEDED" in out, out[-4000:]
    print(f"\ntwo-node pretrain job ({steps} steps): {wall:.1f} s wall, submit to SUCCEEDED")

    # one worker on each node
    workers = train_workers(ray_two_nodes.dashboard)
    assert len(workers) == 2 and {w.node_id for w in workers} == set(ray_two_nodes.alive().values()), workers

    client = MlflowClient(tracking.uri)
    version = client.get_model_version_by_alias(name, "candidate")
    assert str(version.version) == "1" and version.tags["steps"] == str(steps)
    assert sorted(m.step for m in history(tracking.uri, version.run_id, "loss")) == list(range(1, steps + 1))
    model, card = load_backbones(f"models:/{name}@candidate", tracking.uri)
    assert card.img_size == 32 and sum(p.numel() for p in model.parameters()) > 0


def test_tracking_on_one_nodes_disk_is_refused_on_two_nodes(ray_two_nodes, shards, tmp_path):
    db = tmp_path / "mlflow.db"
    args = overrides(shards, f"sqlite:///{db}", "two-node-sqlite", f"scale.address={ray_two_nodes.gcs}")
    done = subprocess.run([sys.executable, "-m", "dsl.cli", "pretrain", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "mlflow.tracking_uri" in last and "mlflow server" in last and "2 nodes" in last, last
    assert not db.exists()  # refused before any run was created


def test_node_lost_mid_run_resumes_from_checkpoint(ray_two_nodes, shards, tracking):
    name, steps, every = "two-node-b", 16, 4
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    run_dir = f"{BUCKET}/runs/{name}"
    started = time.time()
    sid = f"{name}-{uuid.uuid4().hex[:6]}"
    proc = submit(ray_two_nodes.dashboard, sid, overrides(shards, tracking.uri, name, f"optim.max_steps={steps}",
                                                          f"scale.checkpoint_every={every}", "scale.max_failures=1"))
    try:
        # a checkpoint on S3 is not yet one Ray Train restores from: wait until its controller
        # has registered one (its snapshot file), then lose the second node
        deadline = time.time() + 300
        while (seen := registered_checkpoint(fs, run_dir)) is None:
            assert proc.poll() is None and time.time() < deadline, job_log(ray_two_nodes.dashboard, sid)
            time.sleep(0.5)
        alive = train_workers(ray_two_nodes.dashboard, "ALIVE")
        nodes = ray_two_nodes.alive()
        assert {w.node_id for w in alive} == set(nodes.values()), (alive, nodes)  # one worker on each node
        second = list(ray_two_nodes.nodes)[-1]  # the node started after the head
        ray_two_nodes.kill_node(second)  # raylet, agents and its worker: a machine lost
        killed_at = time.time()
        assert proc.poll() is None and registered_checkpoint(fs, run_dir) < steps, "the job ended before the kill"
        ray_two_nodes.add_node(num_cpus=1)  # a replacement machine joins
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    ended_at = time.time()
    wall = ended_at - started
    assert proc.returncode == 0 and "SUCCEEDED" in out, out[-4000:]

    version = MlflowClient(tracking.uri).get_model_version_by_alias(name, "candidate")
    run_id = version.run_id
    assert version.tags["steps"] == str(steps)
    # the worker group started twice: at step 0, then at a registered checkpoint's step
    starts = history(tracking.uri, run_id, "launch_to_first_step_s")
    assert len(starts) == 2 and starts[0].step == 0, [(m.step, m.timestamp) for m in starts]
    resumed = starts[1].step
    assert resumed % every == 0 and seen <= resumed < steps, (seen, resumed)
    print(f"\ntwo-node pretrain job ({steps} steps, node lost after step {seen}, resumed at {resumed}): "
          f"{wall:.1f} s wall, {ended_at - killed_at:.1f} s from the kill to SUCCEEDED; first step "
          f"{starts[0].value:.1f} s and resumed step {starts[1].value:.1f} s after the driver started")
    # steps up to the checkpoint were trained once, by the first start; those after it were
    # recomputed by the second; the history ends at max_steps
    loss = history(tracking.uri, run_id, "loss")
    counts = Counter(m.step for m in loss)
    assert all(counts[s] == 1 for s in range(1, resumed + 1)), counts
    assert all(m.timestamp <= starts[1].timestamp for m in loss if m.step <= resumed)
    assert set(counts) == set(range(1, steps + 1)) and max(loss, key=lambda m: m.timestamp).step == steps
    # the restarted group used the replacement node
    replacement = set(ray_two_nodes.alive().values()) - set(nodes.values())
    assert replacement and replacement <= {w.node_id for w in train_workers(ray_two_nodes.dashboard)}
    model, _ = load_backbones(f"models:/{name}@candidate", tracking.uri)
    assert sum(p.numel() for p in model.parameters()) > 0
