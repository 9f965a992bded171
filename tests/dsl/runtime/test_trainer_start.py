"""Which Ray a training job uses, and the tracking store it needs when that Ray has many nodes."""

from __future__ import annotations

import pytest
from fixtures.services import REPO

from dsl.contracts.config import load_config
from dsl.contracts.errors import UserError
from dsl.runtime.trainer import local_cpus, require_shared_tracking

TINY = REPO / "configs" / "pretrain" / "tiny.yaml"


def test_local_cpus_only_for_a_ray_of_our_own(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(TINY, ["scale.num_workers=3"])
    assert local_cpus(cfg) == 3
    assert local_cpus(load_config(TINY, ["scale.address=10.0.0.1:6379"])) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what Ray sets inside a Ray job
    assert local_cpus(cfg) is None


@pytest.mark.parametrize("uri, nodes, refused", [
    ("sqlite:////runs/mlflow.db", 2, True),
    ("file:///runs/mlruns", 3, True),
    ("mlruns", 2, True),
    ("sqlite:////runs/mlflow.db", 1, False),  # one node: the driver's disk is everybody's
    ("http://tracking:5000", 2, False),
    ("https://tracking.example.com", 8, False),
    ("postgresql://user@db/mlflow", 2, False),
    ("databricks", 2, False),
])
def test_tracking_on_one_nodes_disk_is_refused_on_many_nodes(uri, nodes, refused):
    if not refused:
        require_shared_tracking(uri, nodes)
        return
    with pytest.raises(UserError) as e:
        require_shared_tracking(uri, nodes)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"mlflow.tracking_uri={uri}") and "mlflow server" in message
