"""Exactly once: an ingest killed mid-run and started again equals a clean run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dsl.contracts.config import IngestConfig
from ingest.run import IngestError, ingest
from ingest.synth import synthesise

pytestmark = pytest.mark.slow  # dsl ingest processes, each with its own Ray

DSL = str(Path(sys.executable).with_name("dsl"))


def ingest_cmd(raw: Path, out: Path) -> list[str]:
    return [DSL, "ingest", "--source", "sen12ms", "--input", str(raw), "--output", str(out),
            "--workers", "1", "--shard-size-mb", "0.01", "--val-fraction", "0.25", "--no-progress"]


def committed(out: Path) -> dict[str, str]:
    """shard name -> sha256 from the manifest."""
    m = json.loads((out / "manifest.json").read_text())
    return {s["name"]: s["sha256"] for s in m["shards"]}


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # exited meanwhile
        return ""


def all_keys(out: Path) -> list[str]:
    return sorted(k for p in (out / "_parts").glob("*.tar.json") for k in json.loads(p.read_text())["keys"])


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synthesise(root, "sen12ms", 120, seed=5, size=48)
    return root


def test_killed_ingest_resumes_exactly_once(raw, tmp_path, ray_session):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # Its own process group, so the kill takes the driver and the Ray it started, nothing else.
    proc = subprocess.Popen(ingest_cmd(raw, killed), start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = killed / "_parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.tar.json"))) < 10:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    # the Ray folder the killed driver made (SIGKILL leaves its exit hook no chance to remove it)
    ray_dirs = {d for c in psutil.Process(proc.pid).children(recursive=True)
                for d in re.findall(r"/tmp/dslray-\w+", cmdline(c))}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ray_dirs, "the killed ingest's Ray was not found"
    for d in ray_dirs:
        shutil.rmtree(d, ignore_errors=True)
    done_before = {p.name[: -len(".json")] for p in parts.glob("*.tar.json")}
    assert not (killed / "manifest.json").exists(), "run finished before the kill: make the input larger"
    assert 10 <= len(done_before) < 120
    mtimes = {n: (killed / n).stat().st_mtime_ns for n in done_before if (killed / n).exists()}

    assert subprocess.run(ingest_cmd(raw, killed), env=env, capture_output=True).returncode == 0
    ingest(IngestConfig(source="sen12ms", input=str(raw), output=str(clean), workers=2, shard_size_mb=0.01,
                        val_fraction=0.25, progress=False))
    assert committed(killed) == committed(clean)  # same shards, byte for byte
    keys = all_keys(killed)
    assert keys == all_keys(clean) and len(keys) == len(set(keys)) == 120
    assert {n: (killed / n).stat().st_mtime_ns for n in mtimes} == mtimes  # finished shards not redone
    assert not list(killed.glob("*.tmp-*"))
    # nothing of the killed process group survives
    ps = subprocess.run(["ps", "-eo", "pgid="], capture_output=True, text=True).stdout.split()
    assert str(proc.pid) not in ps


def test_changed_input_is_refused(raw, tmp_path, ray_session):
    out = tmp_path / "o"
    cfg = IngestConfig(source="sen12ms", input=str(raw), output=str(out), shard_size_mb=0.5, progress=False)
    first = ingest(cfg)
    assert ingest(cfg).plan_id == first.plan_id  # rerun of a finished ingest: a no-op
    with pytest.raises(IngestError, match="different input or options"):
        ingest(cfg.model_copy(update={"val_fraction": 0.5}))
