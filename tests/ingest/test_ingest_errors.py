"""``dsl ingest`` on bad input and broken storage: one stderr line and an exit code, or quarantine.

Storage faults run ``dsl ingest`` as a process against a moto server of the test's own, which
the test kills or pauses (SIGSTOP) by its pid; short timeouts come through fsspec's standard
``FSSPEC_S3`` variable, as a user would set them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.services import free_port, wait_for_http

from dsl.cli import main
from ingest import run
from ingest.raster import BadInput
from ingest.sources import PairItem, get_source

REPO = Path(__file__).resolve().parents[2]


def _one_line(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


# --- bad input --------------------------------------------------------------------------------

def test_s1_and_land_cover_without_s2_is_quarantined_under_the_s1_file(tmp_path):
    scene = tmp_path / "ROIs1000_summer"
    for sensor in ("s1", "lc"):  # lc_ sorts before s1_: the old code named the land cover
        (scene / f"{sensor}_1").mkdir(parents=True)
        (scene / f"{sensor}_1" / f"ROIs1000_summer_{sensor}_1_p7.tif").write_bytes(b"")
    items, bad = get_source("sen12ms").list(str(tmp_path))
    assert items == [] and len(bad) == 1
    assert bad[0].file.endswith("s1_1/ROIs1000_summer_s1_1_p7.tif")
    assert bad[0].reason == "missing partner: no s2 file for this patch"


class CountingSource:
    """Every header unreadable; counts the reads (the probe must stay bounded)."""

    def __init__(self):
        self.reads = 0

    def estimate_bytes(self, item):
        self.reads += 1
        raise BadInput(item.key, "unreadable raster header")


def _items(n: int) -> list[PairItem]:
    return [PairItem(f"k{i:07d}", f"k{i}", (("s1", f"k{i}"), ("s2", f"k{i}"))) for i in range(n)]


def test_an_unreadable_input_stops_no_run_but_an_unreadable_dataset_fails_fast():
    few = CountingSource()
    assert run.items_per_shard(few, _items(run.PROBE_ITEMS), 256) == 1  # quarantined item by item
    many = CountingSource()
    with pytest.raises(run.IngestError, match=f"none of the first {run.PROBE_ITEMS} of 100000 inputs reads"):
        run.items_per_shard(many, _items(100_000), 256)
    assert many.reads == run.PROBE_ITEMS


def _garbage_table(path: Path, rows: int) -> Path:
    with open(path, "w") as f:
        f.write("s1,s2\n")
        for i in range(rows):
            f.write(f"x{i:07d}q,y{i:07d}q\n")
    return path


@pytest.mark.parametrize("content, line", [
    (bytes(range(128, 256)) * 1000, "not a readable CSV pair table ('utf-8' codec can't decode"),
    (b"a,b\n1,2\n" * 1000, "pair table has no 's1' column"),
    (b"s1,s2\n\"unclosed,x\n" + b"y,z\n" * 10, "not a readable CSV pair table (Error tokenizing"),
])
def test_a_garbage_pair_table_is_one_line(tmp_path, monkeypatch, capsys, content, line):
    monkeypatch.chdir(tmp_path)
    Path("t.csv").write_bytes(content)
    code = main(["ingest", "--source", "table", "--input", "t.csv", "--output", "out", "--no-progress"])
    err = _one_line(capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"dsl ingest: error: t.csv: {line}"), err
    assert not Path("out").exists()


@pytest.mark.parametrize("rows", [1_000, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_a_table_of_garbage_rows_fails_before_any_worker(tmp_path, monkeypatch, capsys, rows):
    monkeypatch.chdir(tmp_path)
    _garbage_table(tmp_path / "t.csv", rows)
    t0 = time.monotonic()
    code = main(["ingest", "--source", "table", "--input", "t.csv", "--output", "out", "--no-progress"])
    err = _one_line(capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"dsl ingest: error: none of the first {run.PROBE_ITEMS} of {rows} inputs reads "
                             "(the first: x"), err
    assert time.monotonic() - t0 < 180  # measured 40 s for 1e6 rows on a loaded 2-core machine
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- storage faults ---------------------------------------------------------------------------

class OwnMoto:
    """A moto S3 server of this test alone, so it can be killed or paused by its pid."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for_http(self.url + "/moto-api/", 60, "moto_server", self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused server must run to exit
            self.proc.terminate()
        self.proc.wait(20)


@pytest.fixture
def own_moto():
    moto = OwnMoto()
    try:
        yield moto
    finally:
        moto.stop()


def _dsl_ingest(tmp_path: Path, endpoint: str, timeout_s: float) -> tuple[int, list[str], float]:
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3": json.dumps({"config_kwargs": {"connect_timeout": 1, "read_timeout": 1,
                                                      "retries": {"total_max_attempts": 2, "mode": "standard"}}})}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "dsl.cli", "ingest", "--input", str(tmp_path / "in"),
                        "--output", "s3://bucket/out", "--workers", "1", "--no-progress"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout_s)
    return p.returncode, p.stderr.strip().splitlines(), time.monotonic() - t0


def _synth(tmp_path: Path) -> None:
    assert main(["synth", "--out", str(tmp_path / "in"), "--locations", "2", "--size", "16"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "paused"])
def test_unreachable_s3_endpoint_is_one_line_in_bounded_time(tmp_path, own_moto, fault):
    _synth(tmp_path)
    os.kill(own_moto.proc.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    code, err, seconds = _dsl_ingest(tmp_path, own_moto.url, timeout_s=120)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"dsl ingest: error: storage endpoint {own_moto.url} unreachable after retries"), err
    assert "Traceback" not in err[0]
    assert seconds < 60, seconds  # 2 s3fs tries x 2 attempts x 1 s timeouts + start-up; paused: was for ever
