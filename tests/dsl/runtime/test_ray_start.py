"""``init_ray``: a local Ray leaves nothing behind; inside a Ray job it joins that job's cluster."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from fixtures.services import REPO

from cluster import jobs

pytestmark = pytest.mark.slow  # starts Ray twice, in a child process; jobs on a Ray head

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
    # Ray's root is a folder inside the 0700 dslray-* folder init_ray makes
    assert second != out["first"] and Path(second).parent.name.startswith("dslray-")
    assert not Path(second).parent.exists(), "the exit hook did not remove the folder"
    _, alive = psutil.wait_procs(naming(out["first"]) + naming(second), timeout=15)
    assert not alive, [" ".join(p.cmdline()) for p in alive]


# What `dsl submit` runs, reduced to the start: init_ray as a job's driver calls it.
IN_A_JOB = """
import json, os, ray
from dsl.runtime.ray_start import init_ray, local_temp_dir
init_ray({args})
env = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get("AWS_DSL_JOB_ENV")).remote())
print("RESULT", json.dumps({{"own_ray": local_temp_dir() is not None, "cpus": ray.cluster_resources().get("CPU"),
                            "task_env": env}}))
"""


@pytest.mark.parametrize("args", ["num_cpus=1", "os.environ['RAY_ADDRESS'], num_cpus=1"], ids=["local", "address"])
def test_inside_a_job_init_ray_joins_its_cluster_and_keeps_its_runtime_env(ray_head, args):
    from ray.job_submission import JobSubmissionClient

    sid = JobSubmissionClient(ray_head).submit_job(
        entrypoint=f"python -c {shlex.quote(IN_A_JOB.format(args=args))}",
        # an AWS_* variable, as in a job submitted with storage settings: declaring it again in
        # ray.init is a conflict Ray refuses ("Failed to merge the Job's runtime env")
        runtime_env={"working_dir": str(REPO), "excludes": jobs.EXCLUDES, "env_vars": {"AWS_DSL_JOB_ENV": "the job's"}})
    status, log = jobs.wait(ray_head, sid, timeout_s=300), jobs.logs(ray_head, sid)
    assert status == "SUCCEEDED", log[-3000:]
    result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    # the head's 2 CPUs, not a second Ray of num_cpus=1; its tasks still see the job's environment
    assert result == {"own_ray": False, "cpus": 2.0, "task_env": "the job's"}
