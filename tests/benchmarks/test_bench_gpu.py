"""benchmarks/bench_gpu.py runs; without CUDA as the smoke test it says it is.

It starts DeepSpeed on a single-rank process group in a subprocess (its own process group,
its own DS_ACCELERATOR), hence slow. The GPU figures come from running it on a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from fixtures.services import REPO

pytestmark = pytest.mark.slow  # DeepSpeed in a subprocess: ~40 s on a loaded 2-core machine


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode; on a GPU run the benchmark itself")
def test_bench_gpu_smoke_mode_on_cpu():
    args = ["--steps", "2", "--warmup", "1", "--log-every", "1", "--threads", "1"]
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one JSON object, nothing else
    assert result["smoke"] is True and "smoke test" in result["note"] and result["device"] == "cpu"
    assert result["backbone"] == "test_resnet" and result["crop"] == 32
    assert result["command"] == "python benchmarks/bench_gpu.py " + " ".join(args)
    assert result["loop_pairs_per_s"] > 0 and result["bare_pairs_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["loop_pairs_per_s"] / result["bare_pairs_per_s"], rel=0.01)
    # the loop's metrics went through the device window and were logged
    logged = result["loop_last_logged"]
    assert set(logged) >= {"loss", "retrieval_s1_to_s2", "retrieval_s2_to_s1", "lr"}
    assert math.isfinite(logged["loss"]) and math.isfinite(result["bare_last_loss"])
    assert "meets_ratio" not in result  # no verdict from a smoke run
