"""A local Ray started by ``init_ray`` is private: loopback listeners, token auth, a 0700 folder it removes."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from fixtures.services import REPO

pytestmark = pytest.mark.slow  # starts a local Ray in a child process

MARK = "DSL_TEST_RAY_BIND"  # in the environment of the child and of every process its Ray starts

CHILD = """
import json, os, stat, sys
import ray
from dsl.runtime.ray_start import init_ray, local_temp_dir, shutdown_ray
init_ray(num_cpus=1)
ray.get(ray.remote(lambda: 0).remote())  # a worker: its core-worker server listens too
temp = local_temp_dir()
private = os.path.dirname(temp)
token = os.environ["RAY_AUTH_TOKEN_PATH"]
print(json.dumps({"temp": temp, "private": private, "mode": stat.S_IMODE(os.stat(private).st_mode),
                  "auth": os.environ["RAY_AUTH_MODE"], "token_path": token,
                  "token_mode": stat.S_IMODE(os.stat(token).st_mode), "token": open(token).read()}), flush=True)
sys.stdin.readline()
shutdown_ray()
print(json.dumps({"auth": os.environ.get("RAY_AUTH_MODE"), "token_path": os.environ.get("RAY_AUTH_TOKEN_PATH")}),
      flush=True)
"""

# Each kind of Ray process that serves something, by a word of its name or command line. The
# dashboard head and the autoscaler monitor serve metrics on Ray's fixed ports (44227, 44217):
# expected only when no other process on this machine holds that port already.
SERVERS = {"gcs_server": None, "raylet": None, "DashboardAgent": None, "RuntimeEnvAgent": None,
           "dashboard.py": 44227, "monitor.py": 44217}
JOB_AGENT = 52365  # the dashboard agent's HTTP port, fixed: a second Ray on this machine has none


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or addr).is_loopback


def marked(mark: str) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARK) == mark:
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return procs


def listeners(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(ip, port, process) of every listening TCP socket of ``procs`` and their children."""
    names = {}
    for p in procs:
        for q in [p, *p.children(recursive=True)]:
            try:
                names[q.pid] = " ".join(q.cmdline()) or q.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
    return sorted((c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections(kind="inet")
                  if c.pid in names and c.status == psutil.CONN_LISTEN)


def http_status(port: int, token: str | None = None) -> int | None:
    """The HTTP status a GET of the job agent's jobs route gets on ``port`` (None: not HTTP)."""
    headers = {"Authorization": "Bearer " + token} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/job_agent/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):  # a gRPC port
        return None


def foreign_port_holders(ports: set[int], ours: set[int]) -> set[int]:
    return {c.laddr.port for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in ports and c.pid not in ours}


def test_local_ray_listens_on_loopback_only_with_token_auth_and_leaves_no_folder(tmp_path):
    mark = uuid.uuid4().hex
    home = tmp_path / "home"
    home.mkdir()
    # RAY_AUTH_MODE=disabled as a user may have it: the local start turns token auth on anyway
    # (and without the token variables a local Ray of this test process may have set: the child's
    # shutdown gives back what it inherited, which is what it is checked against below)
    inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    env = {**inherited, MARK: mark, "HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    started: dict = {}
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env, text=True, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()[-3000:]
        started.update(json.loads(line))
        assert started["mode"] == 0o700 and Path(started["private"]).name.startswith("dslray-"), started
        assert started["temp"].startswith(started["private"] + "/")
        assert started["auth"] == "token" and started["token_mode"] == 0o600 and len(started["token"]) >= 32
        assert Path(started["token_path"]).parent == Path(started["private"])

        taken = foreign_port_holders({*filter(None, SERVERS.values()), JOB_AGENT}, {p.pid for p in marked(mark)})
        expected = {word for word, port in SERVERS.items() if port not in taken}
        deadline = time.time() + 60
        while True:  # Ray's agents and metrics servers come up a little after ray.init returns
            found = listeners(marked(mark))
            serving = {word for word in SERVERS if any(word in name for _, _, name in found)}
            # Ray's HTTP servers refuse a request without the token: the runtime-env agent, and the
            # job agent (what `ray job submit` talks to) when its fixed port was free
            agents = {port: (name.split()[0], http_status(port)) for _, port, name in found
                      if "DashboardAgent" in name or "RuntimeEnvAgent" in name}
            refusing = {port: name for port, (name, status) in agents.items() if status == 401}
            protected = (any("RuntimeEnvAgent" in name for name in refusing.values())
                         and (JOB_AGENT in refusing or JOB_AGENT in taken))
            if (expected <= serving and protected) or time.time() > deadline:
                break
            time.sleep(0.5)
        assert expected <= serving, (expected - serving, found)
        exposed = [(ip, port, name[:100]) for ip, port, name in found if not loopback(ip)]
        assert not exposed, exposed
        assert len(found) >= len(expected) + 2  # the driver's and the worker's gRPC servers too

        assert protected, (taken, agents)
        for port in refusing:
            assert http_status(port, started["token"]) not in (401, None)  # with the token: past the auth check

        out, err = child.communicate("\n", timeout=120)
        assert child.returncode == 0, err[-3000:]
        after = json.loads(out.strip().splitlines()[-1])
        assert after == {"auth": "disabled", "token_path": None}  # the variables given back
        assert not Path(started["private"]).exists()
        assert not (home / ".ray").exists()  # no token, nothing else, in the user's home
        _, alive = psutil.wait_procs(marked(mark), timeout=20)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for p in marked(mark):  # only ours, found by the mark
            p.kill()
        # only a folder init_ray makes (/tmp/dslray-*): the path comes from the child, which may be wrong
        private = Path(started.get("private") or "/nonexistent")
        if private.parent == Path("/tmp") and private.name.startswith("dslray-") and private.is_dir():
            shutil.rmtree(private, ignore_errors=True)


def test_loopback_recognises_mapped_and_routable_addresses():
    assert loopback("127.0.0.1") and loopback("::1") and loopback("::ffff:127.0.0.1")
    assert not loopback("0.0.0.0") and not loopback("::") and not loopback("192.0.2.2")
    assert not loopback("::ffff:192.0.2.2")


def test_a_dsl_command_leaves_no_ray_folder_behind(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    synth = subprocess.run([sys.executable, "-m", "dsl.cli", "synth", "--out", str(raw), "--locations", "4",
                            "--size", "32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr[-3000:]
    ingest = subprocess.Popen([sys.executable, "-m", "dsl.cli", "ingest", "--source", "sen12ms", "--input", str(raw),
                               "--output", str(shards), "--workers", "1", "--no-progress"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Ray names its session folder after the driver's pid: a folder of this command's Ray is ours
    # (other runs on this machine may have their own dslray-* folders at the same time)
    def ours() -> list[Path]:
        return list(Path("/tmp").glob(f"dslray-*/ray/session_*_{ingest.pid}"))

    seen: list[Path] = []
    mode = None
    while ingest.poll() is None and not seen:  # Ray takes seconds to start: its folder is there meanwhile
        seen = ours()
        if seen:
            try:
                mode = seen[0].parents[1].stat().st_mode & 0o777
            except FileNotFoundError:  # already removed: a very quick command
                pass
        time.sleep(0.05)
    out, err = ingest.communicate(timeout=600)
    assert ingest.returncode == 0, err[-3000:]
    assert (shards / "manifest.json").exists()
    assert seen, "the command started no local Ray (nothing to check)"
    private = seen[0].parents[1]
    assert mode in (0o700, None), oct(mode)
    assert not private.exists() and not ours(), "the command left its Ray folder"
