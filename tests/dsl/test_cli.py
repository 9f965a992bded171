"""The command table: every command declared once, shared config loading and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dsl.cli import BY_NAME, COMMANDS, build_parser, load, main, resolve


def test_every_command_resolves_and_has_help():
    names = [c.name for c in COMMANDS]
    assert set(names) == {"synth", "ingest", "pretrain", "finetune", "evaluate", "promote", "rollback", "export",
                          "submit", "jobs", "schedule", "pipeline", "cluster", "demo"}
    for c in COMMANDS:
        assert callable(resolve(c.run)), c.name
        assert c.name in build_parser().format_help()


def test_help_imports_neither_torch_nor_ray():
    code = "import sys; from dsl.cli import build_parser; build_parser().format_help(); " \
           "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'deepspeed', 'rasterio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_flags_are_config_keys_and_overrides_follow_them():
    args = build_parser().parse_args(["ingest", "--input", "s3://b/raw", "--workers", "3", "--no-progress",
                                      "ingest.workers=4"])
    cfg = load(BY_NAME["ingest"], args)
    assert cfg.ingest.input == "s3://b/raw" and cfg.ingest.workers == 4 and cfg.ingest.progress is False


def _dsl(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsl.cli", *argv], capture_output=True, text=True)


def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad_key = _dsl("ingest", "--input", str(tmp_path), "ingest.wokers=2")
    assert bad_key.returncode == 2 and "did you mean 'workers'" in bad_key.stderr
    wrong_section = _dsl("promote", "data.batch_size=3")
    assert wrong_section.returncode == 2
    assert "dsl promote does not read section 'data' (it reads promote, mlflow)" in wrong_section.stderr
    missing = _dsl("ingest", "--source", "sen12ms", "--input", str(tmp_path / "nope"), "--no-progress")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    for p in (bad_key, wrong_section, missing):
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_schedule_rejects_zero_and_nan_intervals():
    for every in ("0s", "nans", "-1m", "xh"):
        p = _dsl("schedule", "--address", "http://127.0.0.1:9", "--name", "n", f"--every={every}", "--", "synth")
        assert p.returncode == 2 and "is not a positive duration" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("name", ["pretrain", "finetune", "evaluate"])
def test_training_commands_require_a_config(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name])
    assert e.value.code == 2 and "--config" in capsys.readouterr().err


def test_a_refused_permission_is_one_line_not_a_traceback(monkeypatch, capsys):
    import ingest.run

    def refused(cfg, args):
        raise PermissionError("listing s3://bucket/raw/ROIs0000_test failed: PermissionError: Access Denied")

    monkeypatch.setattr(ingest.run, "command", refused)
    assert main(["ingest", "--input", "s3://bucket/raw", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "dsl ingest: error: listing s3://bucket/raw/ROIs0000_test failed: PermissionError: Access Denied"]


@pytest.mark.parametrize("argv", [
    ["jobs", "status", "--address", "http://127.0.0.1:9", "pretrain-7"],
    ["jobs", "status", "pretrain-7", "--address", "http://127.0.0.1:9"],
    ["jobs", "--address", "http://127.0.0.1:9", "status", "pretrain-7"],
])
def test_a_submission_id_may_follow_the_options(argv, monkeypatch):
    import cluster.jobs

    seen = {}
    monkeypatch.setattr(cluster.jobs, "jobs_command", lambda cfg, args: seen.setdefault("id", args.id) and 0)
    assert main(argv) == 0 and seen == {"id": "pretrain-7"}


def test_a_second_word_after_the_id_is_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["jobs", "status", "--address", "http://127.0.0.1:9", "pretrain-7", "extra"])
    assert e.value.code == 2 and "unrecognized arguments: extra" in capsys.readouterr().err
