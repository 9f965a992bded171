"""The test harness itself: CI strictness about real data, and the session's leftover check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fixtures import services
from fixtures.leftovers import MARK, Leftovers


def outcome(fn, *args) -> BaseException | None:
    """What ``fn`` raised, skip and fail included (a skip escaping a test would pass as skipped)."""
    try:
        fn(*args)
    except BaseException as e:  # pytest's outcomes are BaseExceptions
        return e
    return None


def test_missing_realdata_skips_locally_and_fails_on_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(services, "REALDATA", tmp_path / "realdata")
    want = f"real data not available at {tmp_path}/realdata/sen12ms"
    monkeypatch.delenv("CI", raising=False)
    local = outcome(services.realdata, "sen12ms")
    assert type(local) is pytest.skip.Exception and want in str(local), repr(local)
    monkeypatch.setenv("CI", "true")
    ci = outcome(services.realdata, "sen12ms")
    assert type(ci) is pytest.fail.Exception and f"CI=true: {want}" in str(ci), repr(ci)
    (tmp_path / "realdata" / "sen12ms").mkdir(parents=True)  # present: returned, on CI too
    assert services.realdata("sen12ms") == tmp_path / "realdata" / "sen12ms"


def test_leftover_check_reports_folders_and_processes(tmp_path):
    outer = os.environ.get(MARK)
    (tmp_path / "dslray-before").mkdir()  # there before the session started: not ours
    tracker = Leftovers.start(roots=[tmp_path])
    proc = None
    try:
        new_ray = Path(tempfile.mkdtemp(prefix="dslray-", dir=tmp_path))
        new_model = Path(tempfile.mkdtemp(prefix="dsl-model-", dir=tmp_path))
        unrelated = tmp_path / "other-folder"
        unrelated.mkdir()
        # a child of the session (inherits the mark) that outlives it
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        found = tracker.finish(wait_s=0.5)
        assert sorted(found) == sorted([
            f"process {proc.pid} still running: {sys.executable} -c import sys; sys.stdin.read()",
            f"folder {new_model} left behind",
            f"folder {new_ray} left behind",
        ]), found
        assert proc.wait(10) is not None  # and it was stopped
        # a process that exits in time, and folders removed, leave nothing to report
        shutil.rmtree(new_ray)
        shutil.rmtree(new_model)
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        proc.stdin.close()  # it exits on EOF
        assert tracker.finish(wait_s=30) == []
        proc.wait(10)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if outer is not None:  # the session's own mark, for every process started after this test
            os.environ[MARK] = outer
        else:
            os.environ.pop(MARK, None)


def test_folder_in_use_by_someone_elses_process_is_not_ours(tmp_path):
    outer = os.environ.get(MARK)
    tracker = Leftovers.start(roots=[tmp_path])
    theirs = Path(tempfile.mkdtemp(prefix="dslray-", dir=tmp_path))
    env = {k: v for k, v in os.environ.items() if k != MARK}  # another person's run: unmarked
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", f"--temp-dir={theirs}"],
                            stdin=subprocess.PIPE, env=env)
    try:
        assert tracker.finish(wait_s=0.5) == []
    finally:
        proc.stdin.close()
        proc.wait(10)
        shutil.rmtree(theirs)
        if outer is not None:
            os.environ[MARK] = outer
        else:
            os.environ.pop(MARK, None)
    assert tracker.finish(wait_s=0.5) == []
