"""Ingest from and to S3 through a real HTTP endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import s3fs
import webdataset as wds
from fixtures.services import make_bucket

from dsl.cli import main as cli
from dsl.contracts.shard_format import register_webdataset_decoders
from dsl.contracts.storage import register_webdataset_handlers
from ingest.synth import synthesise

pytestmark = pytest.mark.slow  # ingests on a local Ray against moto S3


def test_s3_to_s3_and_back_with_stock_webdataset(tmp_path, ray_session, capsys):
    raw = tmp_path / "raw"
    synthesise(raw, "dfc2020", 12, seed=1, size=32)
    bucket = make_bucket("dsl-ingest")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(raw), f"{bucket}/raw", recursive=True)

    out = f"{bucket}/shards/dfc"
    rc = cli(["ingest", "--source", "dfc2020", "--input", f"{bucket}/raw", "--output", out,
              "--workers", "2", "--shard-size-mb", "0.05", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads(fs.cat(f"{out}/manifest.json"))
    assert manifest["samples"] == 12 and set(manifest["samples_by_split"]) == {"validation", "test"}
    for shard in manifest["shards"]:
        info = fs.info(f"{out}/{shard['name']}")
        assert info["size"] == shard["bytes"]

    register_webdataset_handlers()
    register_webdataset_decoders()  # .blosc members
    urls = [f"{out}/{s['name']}" for s in manifest["shards"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        assert sample["s1.blosc"].dtype == np.float32 and sample["s1.blosc"].shape == (2, 32, 32)
        assert sample["s2.blosc"].dtype == np.uint16 and sample["s2.blosc"].shape == (13, 32, 32)
        assert sample["dfc.npy"].shape == (32, 32) and sample["multi.npy"].shape == (8,)
        assert sample["json"]["split"] in ("validation", "test") and 0 <= sample["cls"] <= 255
        seen += 1
    assert seen == 12
