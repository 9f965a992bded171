"""A local Ray started by ``init_ray`` leaves nothing behind: not its processes, not its folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from fixtures.services import REPO

pytestmark = pytest.mark.slow  # starts Ray twice, in a child process

JOB = """
import json, os
from dsl.runtime.ray_start import init_ray, local_temp_dir, shutdown_ray
init_ray(num_cpus=1)
first = local_temp_dir()
existed = os.path.isdir(first)
shutdown_ray()  # explicitly
out = {"first": first, "existed": existed, "gone": not os.path.exists(first), "reset": local_temp_dir() is None}
shutdown_ray()  # twice is fine
init_ray(num_cpus=1)
out["second"] = local_temp_dir()
print(json.dumps(out), flush=True)
# and the second one is left to the exit hook, as a CLI job that simply returns does
"""


def naming(folder: str) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter():
        try:
            if folder in " ".join(p.cmdline()):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return procs


def test_shutdown_and_exit_remove_ray_and_its_folder():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", JOB], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["existed"] and out["gone"] and out["reset"], out
    second = out["second"]
    assert second != out["first"] and Path(second).name.startswith("dslray-")
    assert not Path(second).exists(), "the exit hook did not remove the folder"
    _, alive = psutil.wait_procs(naming(out["first"]) + naming(second), timeout=15)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
