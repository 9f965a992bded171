"""The real training loop (Ray Train + DeepSpeed on CPU) with the loader's raw batches
normalised in the loop (``data.normalise_on_device``) trains as with loader normalisation.

Same seed, same weights, same batches: the logged losses agree up to S1's float16 rounding, and
the checkpoint's stream position (under the default one-batch device read-ahead) is the batches
trained on. A loop that fed raw values to the model, or normalised other bands than the loader
selected, would log another loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.shards import ingested_shards, tiny_config
from mlflow import MlflowClient

from dsl.runtime.checkpoint import load_state
from dsl.train.pretrain import pretrain

pytestmark = pytest.mark.slow  # Ray Train + DeepSpeed jobs


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session):
    return ingested_shards(tmp_path_factory.mktemp("loop-device"), "sen12ms", 96, seed=5)


def test_normalising_in_the_loop_trains_as_normalising_in_the_loader(shards, tmp_path, ray_session):
    args = ["data.split=null", "data.batch_size=16", "data.s2_bands=[7,3,2,1]", "optim.max_steps=3",
            "scale.log_every=1", "scale.checkpoint_every=3", "scale.max_failures=0"]
    runs = {}
    for on_device in (False, True):
        cfg = tiny_config(tmp_path, shards, *args, f"scale.name=device-{on_device}",
                          f"data.normalise_on_device={str(on_device).lower()}")
        out = pretrain(cfg)
        assert out["step"] == 3
        # 3 batches of 2 ranks x 16: the epoch's 96 samples, so the position is the next epoch's start
        assert load_state(Path(out["checkpoint"]))["position"] == {"epoch": 1, "sample": 0}
        client = MlflowClient(cfg.mlflow.tracking_uri)
        runs[on_device] = {key: [m.value for m in client.get_metric_history(out["run_id"], key)]
                           for key in ("loss", "retrieval_s1_to_s2", "epoch", "data_skipped_samples")}
        assert runs[on_device]["epoch"] == [0, 0, 0] and runs[on_device]["data_skipped_samples"] == [0, 0, 0]
    assert len(runs[True]["loss"]) == 3
    # step 1 (same weights): the same loss; the rounding then moves later steps a little
    assert runs[True]["loss"][0] == pytest.approx(runs[False]["loss"][0], rel=1e-4)
    assert runs[True]["loss"] == pytest.approx(runs[False]["loss"], rel=1e-2)
    assert runs[True]["retrieval_s1_to_s2"] == pytest.approx(runs[False]["retrieval_s1_to_s2"], abs=0.07)
