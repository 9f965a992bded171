"""How ``dsl`` reports errors: one stderr line and an exit code, also for errors Ray wraps."""

from __future__ import annotations

import pytest

import dsl.cli as cli
from dsl.contracts.config import DataConfig
from dsl.contracts.errors import JobFailed
from dsl.contracts.manifest import Manifest
from dsl.data.checks import check_crop


def _ray_wrapped(cause: BaseException) -> BaseException:
    """What ``ray.get`` raises for a task that raised ``cause`` (no Ray started)."""
    from ray.exceptions import RayTaskError

    text = "Traceback (most recent call last):\n" + "  remote frame\n" * 150 + f"{type(cause).__name__}: {cause}"
    return RayTaskError("write_partition", text, cause).as_instanceof_cause()


def _run(monkeypatch, capsys, error: BaseException) -> tuple[int, list[str]]:
    def fail(cfg, args):
        raise error

    monkeypatch.setattr(cli, "resolve", lambda target: fail)
    code = cli.main(["ingest", "--input", "in", "--no-progress"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("cause, code, line", [
    (FileNotFoundError("input in does not exist"), 2, "dsl ingest: error: input in does not exist"),
    (ValueError("t.csv: not a readable CSV pair table"), 2, "dsl ingest: error: t.csv: not a readable CSV pair table"),
    (JobFailed("3 of 4 inputs are bad"), 1, "dsl ingest: error: 3 of 4 inputs are bad"),
])
def test_ray_task_errors_are_their_cause_in_one_line(monkeypatch, capsys, cause, code, line):
    wrapped = _ray_wrapped(cause)
    assert isinstance(wrapped, type(cause)) and str(wrapped).count("\n") > 100  # what used to be printed
    got, err = _run(monkeypatch, capsys, wrapped)
    assert (got, err) == (code, [line])


def test_unreachable_endpoint_in_a_task_is_one_line_naming_it(monkeypatch, capsys):
    from botocore.exceptions import EndpointConnectionError

    cause = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket/out/_parts/plan.json")
    got, err = _run(monkeypatch, capsys, _ray_wrapped(cause))
    assert got == 2 and len(err) == 1, err
    assert err[0].startswith("dsl ingest: error: storage endpoint http://127.0.0.1:9 unreachable after retries")


def test_a_bug_still_shows_its_traceback(monkeypatch, capsys):
    with pytest.raises(KeyError):
        _run(monkeypatch, capsys, _ray_wrapped(KeyError("bug")))


def _manifest(**extra) -> Manifest:
    return Manifest.model_validate({"format_version": 1, "shards": [], "bands": {"s1": ["VV", "VH"]},
                                    "stats": {}, **extra})


@pytest.mark.parametrize("extra, crop, error", [
    ({"options": {"tile_size": 64}}, 128, "data.crop_size 128 is larger than the patches of s: the dataset was cut "
                                          "into tiles of 64x64 (ingest.tile_size); use data.crop_size <= 64"),
    ({"options": {"tile_size": 256}, "patch_min": [32, 48]}, 40, "the smallest stored patch is 32x48"),
    ({"options": {"tile_size": 64}}, 64, None),
    ({"options": {"tile_size": 256}, "patch_min": [32, 48]}, 32, None),
    ({}, 1024, None),  # a manifest that knows no size: the loader's own per-sample check stays
])
def test_crop_larger_than_the_stored_patch(extra, crop, error):
    cfg = DataConfig(shards="s", crop_size=crop)
    if error is None:
        check_crop(cfg, _manifest(**extra))
        return
    with pytest.raises(ValueError, match="data.crop_size") as e:
        check_crop(cfg, _manifest(**extra))
    assert error in str(e.value) and "\n" not in str(e.value)
