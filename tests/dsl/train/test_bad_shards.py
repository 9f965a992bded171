"""Pretraining on a dataset with a damaged shard: counted, bounded, never in the weights.

The issue this answers: one shard in 23 whose S1 were all NaN gave a job that exited 0 with a
NaN loss at every logged step and registered NaN weights as ``@candidate``. Now its samples are
dropped as bad (and good ones stand in); past ``data.max_bad_fraction`` the job stops with one
line and registers nothing; within it the job finishes with finite weights and the count logged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures.shards import SIZE, sample_arrays, tiny_config, write_dataset
from mlflow import MlflowClient

from dsl.contracts.errors import JobFailed
from dsl.contracts.manifest import read_manifest
from dsl.contracts.shard_format import encode_npy
from dsl.data import SampleStream
from dsl.registry import load_backbones
from dsl.train.pretrain import pretrain

pytestmark = pytest.mark.slow  # Ray Train + DeepSpeed jobs

SHARDS, PER_SHARD, NAN_SHARD = 23, 16, 5  # 368 pairs, one shard of 16 (4.3%) all NaN in S1


@pytest.fixture(scope="module")
def nan_shard_dataset(tmp_path_factory):
    def members(idx, m):
        if idx // PER_SHARD != NAN_SHARD:
            return m
        s1 = sample_arrays(idx, SIZE)[0]
        s1[:] = np.nan
        return [(n, encode_npy(s1) if n.endswith(".s1.npy") else d) for n, d in m]

    return write_dataset(tmp_path_factory.mktemp("nan") / "shards", [PER_SHARD] * SHARDS, split="train",
                         members=members)


def settings(tmp_path, shards, *more):
    # 2 ranks x 32 = 64 pairs a step: an epoch is 5 steps; every step logged
    return tiny_config(tmp_path, shards, "optim.max_steps=10", "optim.warmup_steps=0", "scale.log_every=1",
                       "scale.checkpoint_every=5", "scale.max_failures=0", *more)


def test_past_the_limit_the_job_stops_with_one_line_and_registers_nothing(nan_shard_dataset, tmp_path, ray_session):
    cfg = settings(tmp_path, nan_shard_dataset)  # data.max_bad_fraction: 1% of the epoch's 368 = 3.68
    with pytest.raises(JobFailed) as e:
        pretrain(cfg)
    message = str(e.value)
    assert "\n" not in message and "samples read were dropped" in message and "data.max_bad_fraction 0.01" in message
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert client.search_registered_models() == [] or not client.search_model_versions(
        f"name='{cfg.mlflow.registered_model}'")
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert run.info.status == "FAILED"


def test_within_the_limit_the_job_finishes_on_good_samples_only(nan_shard_dataset, tmp_path, ray_session):
    cfg = settings(tmp_path, nan_shard_dataset, "data.max_bad_fraction=0.1")
    out = pretrain(cfg)
    assert out["step"] == 10 and out["model_version"] == "1"
    client = MlflowClient(cfg.mlflow.tracking_uri)
    losses = [m.value for m in client.get_metric_history(out["run_id"], "loss")]
    assert len(losses) == 10 and np.isfinite(losses).all()
    bad = [m.value for m in client.get_metric_history(out["run_id"], "data_bad_samples")]
    # exactly the NaN samples the two epochs' order deals to the two ranks (the dealing alone)
    manifest, nan_ids = read_manifest(cfg.data.shards), range(NAN_SHARD * PER_SHARD, (NAN_SHARD + 1) * PER_SHARD)
    dealt = [ids for rank in (0, 1) for _, _, ids in SampleStream(cfg.data, manifest, rank, 2, epochs=2).batch_ids()]
    assert len(dealt) == 10 * 2
    assert bad[-1] == sum(int(np.isin(ids, nan_ids).sum()) for ids in dealt) > 0 and bad == sorted(bad)
    model, _ = load_backbones(f"models:/{cfg.mlflow.registered_model}@candidate", cfg.mlflow.tracking_uri)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
