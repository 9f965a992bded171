"""The training stream over S3 with faults: a fault-injecting proxy in front of moto's server.

The job's own configuration (s3fs and botocore with their default retries, DSL's range reader on
top) reads a dataset through a proxy that answers a fraction of requests with 503s, resets,
truncated and short bodies: the epoch still holds every sample once, byte for byte; a shard whose
every request fails is skipped, its samples replaced and counted, and the job goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest
from fixtures.faulty_proxy import FaultyProxy
from fixtures.services import make_bucket
from fixtures.shards import cfg_for, write_dataset

from dsl.contracts.manifest import read_manifest
from dsl.data import make_loader

pytestmark = pytest.mark.slow
SIZES = [9, 14, 4, 11, 8, 12]  # 58 samples


@pytest.fixture
def behind_proxy(s3_server, tmp_path, monkeypatch) -> Iterator[tuple[FaultyProxy, str, str]]:
    """(proxy, the dataset's s3:// URL, the same dataset's local folder), the job's S3 client
    pointed at the proxy."""
    import s3fs

    local = write_dataset(tmp_path / "ds", SIZES)
    bucket = make_bucket("dsl-stream-faults")
    direct = s3fs.S3FileSystem(skip_instance_cache=True)
    direct.put(local + "/", f"{bucket}/ds/", recursive=True)
    with FaultyProxy(s3_server, seed=7) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps instances: one made for moto would stay
        yield proxy, f"{bucket}/ds", local
        s3fs.S3FileSystem.clear_instance_cache()
    direct.rm(f"{bucket}/ds", recursive=True)


def test_an_epoch_through_a_faulty_store_reads_every_sample_exactly(behind_proxy):
    proxy, url, local = behind_proxy
    proxy.faults = {"503": 0.1, "reset": 0.08, "truncate": 0.08, "short": 0.06}
    faulty = list(make_loader(cfg_for(url, batch_size=4, read_backoff_s=0.01, read_max_backoff_s=0.05), 0, 2))
    clean = list(make_loader(cfg_for(local, batch_size=4), 0, 2))
    assert [b["key"] for b in faulty] == [b["key"] for b in clean] and len(clean) == 58 // 8
    assert all(np.array_equal(a["s2"], b["s2"]) and np.array_equal(a["s1"], b["s1"])
               for a, b in zip(faulty, clean, strict=True))
    assert sum(b["skipped"] for b in faulty) == 0
    assert sum(proxy.kinds.values()) >= 3, proxy.kinds  # faults did happen


def test_a_shard_that_always_fails_is_skipped_and_counted(behind_proxy, caplog):
    proxy, url, local = behind_proxy
    bad = read_manifest(url).shards[1]  # samples loc0009 .. loc0022
    path = f"/{url.removeprefix('s3://')}/{bad.name}"
    proxy.fail_paths = {path}
    cfg = cfg_for(url, batch_size=4, read_retries=1, read_backoff_s=0.01, read_max_backoff_s=0.02)
    with caplog.at_level(logging.WARNING, logger="dsl.data.pairs"):
        batches = list(make_loader(cfg, 0, 1))
    lost = {f"loc{i:04d}" for i in range(9, 9 + 14)}
    # what the epoch would have read: its samples of the bad shard are the ones replaced
    planned = [k for b in make_loader(cfg_for(local, batch_size=4), 0, 1) for k in b["key"]]
    keys = [k for b in batches for k in b["key"]]
    assert len(batches) == 58 // 4 and all(len(set(b["key"])) == 4 for b in batches)  # equal, no repeats
    assert not lost & set(keys)
    assert sum(b["skipped"] for b in batches) == len(lost & set(planned)) > 0
    assert bad.name in caplog.text
    # given up once for the job (s3fs's own retries x DSL's), not once per sample
    assert proxy.requests[path] <= 2 * 6
