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
from fixtures.services import make_bucket
from fixtures.shards import TINY, ingested_shards, tiny_config
from mlflow import MlflowClient

from dsl.contracts.config import IngestConfig, load_config
from dsl.registry import load_backbones
from dsl.runtime.checkpoint import load_state
from dsl.train.pretrain import pretrain
from ingest.run import ingest
from ingest.synth import synthesise

pytestmark = pytest.mark.slow  # Ray Train + DeepSpeed jobs

@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session):
    return ingested_shards(tmp_path_factory.mktemp("pretrain"), "sen12ms", 400, seed=11, val_fraction=0.1)


tiny = tiny_config


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

    # an MLflow Model with a signature and only the pickle-free `dsl` flavor (no python_function)
    import mlflow
    import yaml

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.mlflow.registered_model}/1",
                                                      dst_path=str(tmp_path / "mv1")))
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"dsl"} and mlmodel["flavors"]["dsl"]["format"] == "safetensors"
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [(i["name"], i["tensor-spec"]["shape"]) for i in inputs] == [("s1", [-1, 2, 32, 32]), ("s2", [-1, 13, 32, 32])]
    files = {p.name for p in folder.iterdir()}
    assert {"MLmodel", "model.json", "model.safetensors"} <= files, files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))], files  # nothing to unpickle

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
    # 7 batches of 2 ranks x 16 pairs: counted in samples of the epoch (any world size resumes it)
    assert load_state(ckpt)["position"] == {"epoch": 0, "sample": 7 * 2 * 16}

    cfg = tiny(tmp_path, shards, *args)
    second = pretrain(cfg)
    assert second["run_id"] == first["run_id"] and second["step"] == 15
    steps = [s for s, _ in history(cfg, second["run_id"], "loss")]
    assert steps == list(range(1, 16))  # 1..7 from the first job, 8..15 from the resumed one
    epochs = dict(history(cfg, second["run_id"], "epoch"))
    assert epochs[11] == 0 and epochs[12] == 1  # the epoch boundary fell where a clean run puts it
    assert load_state(Path(second["checkpoint"]))["position"] == {"epoch": 1, "sample": 4 * 2 * 16}
    assert second["model_version"] is not None


def test_resume_on_another_number_of_workers(shards, tmp_path, ray_session):
    """2 workers -> 1 -> 2: optimizer state, step count and LR schedule carry over."""
    from dsl.runtime.lr_schedule import warmup_cosine

    args = ["optim.max_steps=12", "optim.warmup_steps=2", "scale.checkpoint_every=4", "scale.log_every=1",
            "data.batch_size=8", "scale.name=elastic"]
    assert pretrain(tiny(tmp_path, shards, *args, "scale.stop_at_step=4"))["step"] == 4
    assert pretrain(tiny(tmp_path, shards, *args, "scale.num_workers=1", "scale.stop_at_step=8"))["step"] == 8
    cfg = tiny(tmp_path, shards, *args)
    out = pretrain(cfg)
    assert out["step"] == 12 and out["model_version"] is not None
    assert [s for s, _ in history(cfg, out["run_id"], "loss")] == list(range(1, 13))
    starts = [s for s, _ in history(cfg, out["run_id"], "launch_to_first_step_s")]
    assert starts == [0, 4, 8]
    # the LR after each step is the schedule's, across both changes of world size
    factor = warmup_cosine(cfg.optim)
    for step, lr in history(cfg, out["run_id"], "lr"):
        assert lr == pytest.approx(cfg.optim.lr * factor(step)), step
    # the stream position in samples of the epoch: 4 steps x 2 ranks x 8, then 4 x 1 x 8, then 4 x 2 x 8
    states = {load_state(p)["step"]: load_state(p) for p in (tmp_path / "runs" / "elastic").glob("checkpoint_*/")}
    assert states[12]["world"] == 2 and states[12]["position"] == {"epoch": 0, "sample": 64 + 32 + 64}
    assert states[8]["position"] == {"epoch": 0, "sample": 96}  # (Ray keeps the last two checkpoints)


def _train_workers() -> list[psutil.Process]:
    """Ray Train workers of the Ray this session started (children of its raylet), no other."""
    from dsl.runtime.ray_start import local_temp_dir

    temp = local_temp_dir()
    assert temp, "the session's Ray was not started by dsl.runtime.ray_start.init_ray"

    def ours(p: psutil.Process) -> bool:
        return any(temp in " ".join(a.cmdline()) for a in p.parents())

    return [p for p in psutil.process_iter(["cmdline"])
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and ours(p)]


def _registered_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train's checkpoint manager has recorded a checkpoint in its snapshot."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(snapshot.read_text())
    except (OSError, ValueError):
        return False  # not written yet, or caught mid-write
    return state.get("latest_checkpoint_result") is not None


def test_worker_killed_mid_run_and_run_completes(shards, tmp_path, ray_session):
    cfg = tiny(tmp_path, shards, "optim.max_steps=40", "scale.checkpoint_every=10", "scale.name=failing")
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(out=pretrain(cfg)), daemon=True)
    thread.start()
    runs = tmp_path / "runs" / "failing"
    deadline = time.time() + 300
    # a checkpoint on disk is not yet one Ray Train restores from: its controller registers a
    # report when it polls the workers (every 2 s), and records that in its snapshot file
    while not _registered_checkpoint(runs) and time.time() < deadline:
        time.sleep(0.5)
    victims = _train_workers()
    assert len(victims) == 2, victims
    os.kill(victims[0].pid, signal.SIGKILL)  # a real process kill, not an exception
    thread.join(600)
    assert not thread.is_alive()
    out = box["out"]
    assert out["step"] == 40 and out["model_version"] is not None
    # the worker group started twice: the second time from a checkpoint (a step > 0), not step 0
    starts = [step for step, _ in history(cfg, out["run_id"], "launch_to_first_step_s")]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] in (10, 20, 30), starts
    assert history(cfg, out["run_id"], "loss")[-1][0] == 40


def test_pretrain_on_s3(tmp_path, ray_session, s3_server):
    bucket = make_bucket("dsl-pretrain")
    raw = tmp_path / "raw"
    synthesise(raw, "sen12ms", 96, seed=12, size=64)
    shards = f"{bucket}/shards"
    ingest(IngestConfig(source="sen12ms", input=str(raw), output=shards, shard_size_mb=0.5, progress=False))
    cfg = load_config(TINY, [f"data.shards={shards}", "data.split=null", f"scale.storage_path={bucket}/runs",
                             f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "optim.max_steps=10",
                             "scale.checkpoint_every=5", "scale.log_every=5", "scale.name=on-s3"])
    first = pretrain(cfg.model_copy(update={"scale": cfg.scale.model_copy(update={"stop_at_step": 5})}))
    assert first["step"] == 5 and first["model_version"] is None  # preempted: resumable, nothing registered
    out = pretrain(cfg)  # resumes from the checkpoint on S3
    assert out["step"] == 10 and out["model_version"] == "1" and out["run_id"] == first["run_id"]
    assert [s for s, _ in history(cfg, out["run_id"], "launch_to_first_step_s")] == [0, 5]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    ckpts = fs.glob(f"{bucket}/runs/on-s3/checkpoint_*/model.safetensors")
    assert ckpts
    state = json.loads(fs.cat(ckpts[-1].rsplit("/", 1)[0] + "/state.json"))
    assert state["step"] == 10 and np.isfinite(history(cfg, out["run_id"], "loss")[-1][1])
    # the S3 secret the workers read from their environment is nowhere the job keeps records: the
    # MLflow store (params, tags, metrics), its artifacts (the registered model), the checkpoints
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    kept = {p: p.read_bytes() for p in [tmp_path / "mlflow.db", *(tmp_path / "mlartifacts").rglob("*")] if p.is_file()}
    objects = fs.find(f"{bucket}/runs", detail=True)  # files only ("folders" are zero-byte markers)
    kept.update({key: fs.cat(key) for key, info in objects.items() if info["type"] == "file" and info["size"]})
    assert len(kept) > 10 and any(str(k).endswith("model.safetensors") for k in kept)
    assert [k for k, data in kept.items() if secret in data] == []


@pytest.mark.parametrize("name, overrides", [
    ("bf16", ["deepspeed.precision=bf16"]),
    ("zero3-clip", ["deepspeed.zero_stage=3", "loss.name=clip", "loss.learnable_temperature=true",
                    "loss.temperature=0.07"]),
    ("simclr", ["loss.name=simclr"]),
    ("mma", ["loss.name=mma"]),
])
def test_objectives_and_precisions_run_in_the_training_loop(shards, tmp_path, ray_session, name, overrides):
    cfg = tiny(tmp_path, shards, "optim.max_steps=3", "scale.checkpoint_every=3", "scale.log_every=1",
               "scale.max_failures=0", f"scale.name={name}", *overrides)
    out = pretrain(cfg)
    assert out["step"] == 3 and out["model_version"] == "1"
    loss = [v for _, v in history(cfg, out["run_id"], "loss")]
    assert len(loss) == 3 and np.isfinite(loss).all()
    model, card = load_backbones(f"models:/{cfg.mlflow.registered_model}/1", cfg.mlflow.tracking_uri)
    weights = model.state_dict()
    assert card.loss.name == cfg.loss.name and all(v.numel() and torch.isfinite(v).all() for v in weights.values())
    if name == "simclr":  # one encoder, on S2
        assert {k.split(".")[0] for k in weights} == {"backbone", "head"} and model.modality == "s2"
    if name == "zero3-clip":  # the learnable temperature trains inside the engine's forward
        temperature = [v for _, v in history(cfg, out["run_id"], "temperature")]
        assert len(temperature) == 3 and all(0.01 <= t < 1 for t in temperature)
        assert weights["logit_scale"].shape == (1,)
