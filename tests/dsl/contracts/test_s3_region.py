"""Ray Train's S3 filesystem takes the region the standard way, never one of ours."""

from __future__ import annotations

import pytest

from dsl.contracts.storage import ray_storage


@pytest.mark.parametrize("env, region", [
    ({"AWS_REGION": "eu-west-2"}, "eu-west-2"),
    ({"AWS_DEFAULT_REGION": "ap-south-1"}, "ap-south-1"),
    ({"AWS_REGION": "eu-west-2", "AWS_DEFAULT_REGION": "eu-west-1"}, "eu-west-1"),  # as botocore orders them
])
def test_region_comes_from_the_environment(monkeypatch, env, region):
    for key in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path, fs = ray_storage("s3://bucket/runs")
    assert path == "bucket/runs" and fs.region == region
