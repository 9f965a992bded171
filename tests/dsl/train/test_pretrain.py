"""Pretraining end to end: Ray TorchTrainer (2 CPU workers) + DeepSpeed ZeRO-2 + MLflow (sqlite).

The synthetic data share land cover between S1 and S2 (see ingest/synth.py), so a working
Dual-SimCLR must make in-batch retrieval far better than chance; a broken gather, loss or
pairing would not.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import s3fs
import torch
from fixtures.services import REPO, make_bucket
from mlflow import MlflowClient

from dsl.contracts.config import IngestConfig, load_config
from dsl.registry import load_backbones
from dsl.runtime.checkpoint import load_state
from dsl.train.pretrain import pretrain
from ingest.run import ingest
from ingest.synth import synthesise

pytestmark = pytest.mark.slow  # Ray Train + DeepSpeed jobs

TINY = REPO / "configs" / "pretrain" / "tiny.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("pretrain")
    synthesise(root / "raw", "sen12ms", 400, seed=11, size=64)
    ingest(IngestConfig(source="sen12ms", input=str(root / "raw"), output=str(root / "shards"),
                        shard_size_mb=1, val_fraction=0.1, progress=False))
    return root / "shards"


def tiny(tmp_path: Path, shards: str, *extra: str):
    return load_config(TINY, [f"data.shards={shards}", f"scale.storage_path={tmp_path / 'runs'}",
                              f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra])


def history(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(run_id, key)]


def test_pretrain_learns_checkpoints_and_registers(shards, tmp_path, ray_session):
    cfg = tiny(tmp_path, shards, "optim.max_steps=60")
    out = pretrain(cfg)
    assert out["step"] == 60 and out["model_version"] == "1"
    loss = history(cfg, out["run_id"], "loss")
    acc = history(cfg, out["run_id"], "retrieval_s2_to_s1")
    assert [s for s, _ in loss] == [10, 20, 30, 40, 50, 60]
    assert loss[-1][1] < loss[0][1] - 1.0, loss
    chance = 1 / cfg.data.batch_size
    assert acc[-1][1] > 10 * chance, acc
    # checkpoints (DeepSpeed shards of both ranks, weights, stream position) in storage
    ckpts = sorted(p for p in (tmp_path / "runs" / "tiny").glob("checkpoint_*") if p.is_dir())
    assert ckpts and (ckpts[-1] / "model.safetensors").exists()
    assert len(list((ckpts[-1] / "deepspeed").glob("*optim_states.pt"))) == 2
    assert load_state(ckpts[-1])["step"] == 60

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["loss.temperature"] == "0.1"
    assert run.data.tags["dsl.manifest_sha256"] and run.data.tags["dsl.manifest_url"].endswith("manifest.json")
    mv = client.get_model_version_by_alias(cfg.mlflow.registered_model, "candidate")
    assert str(mv.version) == "1" and mv.tags["steps"] == "60" and mv.tags["run_id"] == out["run_id"]

    model, info = load_backbones(f"models:/{cfg.mlflow.registered_model}@candidate", cfg.mlflow.tracking_uri)
    assert info.s2_chans == 13 and info.img_size == 32
    # the registered weights are the trained ones: they still retrieve partners
    from dsl.data import make_loader

    batch = next(iter(make_loader(cfg.data.model_copy(update={"split": "val", "batch_size": 32}), 0, 1, train=False)))
    with torch.no_grad():
        z1, z2 = model(batch["s1"], batch["s2"])
    sim = torch.nn.functional.normalize(z1, dim=1) @ torch.nn.functional.normalize(z2, dim=1).T
    assert (sim.argmax(1) == torch.arange(len(sim))).float().mean() > 5 * chance
    # rerunning the finished job registers nothing new
    assert pretrain(cfg)["model_version"] == "1"
    assert len(client.search_model_versions(f"name='{cfg.mlflow.registered_model}'")) == 1


def test_resume_continues_step_and_stream_position(shards, tmp_path, ray_session):
    # 360 train pairs / (2 ranks x 16) = 11 batches per epoch: step 7 is mid-epoch
    args = ["optim.max_steps=15", "data.batch_size=16", "scale.checkpoint_every=7", "scale.log_every=1"]
    first = pretrain(tiny(tmp_path, shards, *args, "scale.stop_at_step=7"))
    assert first["step"] == 7 and first["model_version"] is None
    ckpt = Path(first["checkpoint"])
    assert load_state(ckpt)["position"] == {"epoch": 0, "batch": 7}

    cfg = tiny(tmp_path, shards, *args)
    second = pretrain(cfg)
    assert second["run_id"] == first["run_id"] and second["step"] == 15
    steps = [s for s, _ in history(cfg, second["run_id"], "loss")]
    assert steps == list(range(1, 16))  # 1..7 from the first job, 8..15 from the resumed one
    epochs = dict(history(cfg, second["run_id"], "epoch"))
    assert epochs[11] == 0 and epochs[12] == 1  # the epoch boundary fell where a clean run puts it
    assert load_state(Path(second["checkpoint"]))["position"] == {"epoch": 1, "batch": 4}
    assert second["model_version"] is not None


def _train_workers() -> list[psutil.Process]:
    """Ray Train workers of the Ray this session started (children of its raylet), no other."""
    from dsl.runtime.ray_start import local_temp_dir

    temp = local_temp_dir()
    assert temp, "the session's Ray was not started by dsl.runtime.ray_start.init_ray"

    def ours(p: psutil.Process) -> bool:
        return any(temp in " ".join(a.cmdline()) for a in p.parents())

    return [p for p in psutil.process_iter(["cmdline"])
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and ours(p)]


def test_worker_killed_mid_run_and_run_completes(shards, tmp_path, ray_session):
    cfg = tiny(tmp_path, shards, "optim.max_steps=40", "scale.checkpoint_every=10", "scale.name=failing")
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(out=pretrain(cfg)), daemon=True)
    thread.start()
    runs = tmp_path / "runs" / "failing"
    deadline = time.time() + 300
    while not list(runs.glob("checkpoint_*/state.json")) and time.time() < deadline:
        time.sleep(0.5)
    victims = _train_workers()
    assert len(victims) == 2, victims
    os.kill(victims[0].pid, signal.SIGKILL)  # a real process kill, not an exception
    thread.join(600)
    assert not thread.is_alive()
    out = box["out"]
    assert out["step"] == 40 and out["model_version"] is not None
    assert not psutil.pid_exists(victims[0].pid) or victims[0].status() == psutil.STATUS_ZOMBIE
    steps = [s for s, _ in history(cfg, out["run_id"], "loss")]
    assert steps[-1] == 40 and steps == sorted(steps)


def test_pretrain_on_s3(tmp_path, ray_session, s3_server):
    bucket = make_bucket("dsl-pretrain")
    raw = tmp_path / "raw"
    synthesise(raw, "sen12ms", 96, seed=12, size=64)
    shards = f"{bucket}/shards"
    ingest(IngestConfig(source="sen12ms", input=str(raw), output=shards, shard_size_mb=0.5, progress=False))
    cfg = load_config(TINY, [f"data.shards={shards}", "data.split=null", f"scale.storage_path={bucket}/runs",
                             f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "optim.max_steps=10",
                             "scale.checkpoint_every=5", "scale.log_every=5", "scale.name=on-s3"])
    out = pretrain(cfg)
    assert out["step"] == 10 and out["model_version"] == "1"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    ckpts = fs.glob(f"{bucket}/runs/on-s3/checkpoint_*/model.safetensors")
    assert ckpts
    state = json.loads(fs.cat(ckpts[-1].rsplit("/", 1)[0] + "/state.json"))
    assert state["step"] == 10 and np.isfinite(history(cfg, out["run_id"], "loss")[-1][1])
