"""Bad input never stops the run, is never silent, and never costs a valid sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from dsl.cli import main as cli
from dsl.contracts.config import IngestConfig
from ingest.run import IngestError, ingest
from ingest.synth import synthesise

N = 14


def tif(root: Path, sensor: str, i: int) -> Path:
    scene = i // 8 + 1
    season = next(p.name for p in root.iterdir() if (p / f"{sensor}_{scene}").exists())
    return root / season / f"{sensor}_{scene}" / f"{season}_{sensor}_{scene}_p{i}.tif"


def rewrite(path: Path, fn) -> None:
    with rasterio.open(path) as ds:
        profile, data = ds.profile, ds.read()
    data, profile = fn(data, profile)
    profile.update(count=data.shape[0], dtype=data.dtype)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


@pytest.fixture()
def bad_tree(tmp_path):
    root = tmp_path / "raw"
    synthesise(root, "sen12ms", N, seed=3, size=32)
    tif(root, "s2", 0).write_bytes(b"this is not a tiff")
    s1 = tif(root, "s1", 1)
    s1.write_bytes(s1.read_bytes()[: s1.stat().st_size // 2])
    tif(root, "s2", 2).unlink()
    rewrite(tif(root, "s2", 3), lambda d, p: (d[:12], p))
    rewrite(tif(root, "s2", 4), lambda d, p: (d, {**p, "transform": p["transform"] @ Affine.translation(5, 0)}))
    rewrite(tif(root, "s2", 5), lambda d, p: (np.zeros_like(d), p))
    rewrite(tif(root, "s1", 6), lambda d, p: (np.where(np.arange(d.size).reshape(d.shape) == 7, np.nan, d).astype(d.dtype), p))
    return root


EXPECTED = {
    0: "unreadable or truncated",
    1: "unreadable or truncated",
    2: "missing partner",
    3: "wrong band count",
    4: "grid mismatch",
    5: "all-nodata",
    6: "NaN/inf",
}


def test_each_defect_is_quarantined_and_valid_pairs_kept(bad_tree, tmp_path, ray_session):
    out = tmp_path / "shards"
    m = ingest(IngestConfig(source="sen12ms", input=str(bad_tree), output=str(out), shard_size_mb=0.02,
                            max_bad_fraction=0.6, progress=False))
    report = {q["key"]: q for q in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())}
    assert m.bad == len(EXPECTED) == len(report)
    for i, reason in EXPECTED.items():
        (q,) = [q for k, q in report.items() if k.endswith(f"_p{i}")]
        assert reason in q["reason"], q
        assert q["file"].endswith(".tif")  # names the file
    assert report[next(k for k in report if k.endswith("_p0"))]["file"].endswith(tif(bad_tree, "s2", 0).name)
    assert report[next(k for k in report if k.endswith("_p6"))]["file"].endswith(tif(bad_tree, "s1", 6).name)
    assert m.samples == N - len(EXPECTED)
    parts = [json.loads(p.read_text()) for p in (out / "_parts").glob("*.tar.json")]
    kept = {k for p in parts for k in p["keys"]}
    assert {int(k.rsplit("_p", 1)[1]) for k in kept} == set(range(len(EXPECTED), N))


def test_too_many_bad_fails_clearly_and_keeps_valid_shards(bad_tree, tmp_path, ray_session, capsys):
    out = tmp_path / "shards"
    cfg = IngestConfig(source="sen12ms", input=str(bad_tree), output=str(out), shard_size_mb=0.02,
                       max_bad_fraction=0.1, progress=False)
    with pytest.raises(IngestError, match=r"7 of 14 inputs are bad .*max-bad-fraction.*quarantine.jsonl"):
        ingest(cfg)
    assert not (out / "manifest.json").exists()  # not committed as a complete dataset...
    shards = sorted(out.glob("*.tar"))
    assert shards  # ...but every valid sample is written
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    # the CLI turns it into a failing exit with the message
    rc = cli(["ingest", "--source", "sen12ms", "--input", str(bad_tree), "--output", str(out),
              "--shard-size-mb", "0.02", "--max-bad-fraction", "0.1", "--no-progress"])
    assert rc == 1 and "max-bad-fraction" in capsys.readouterr().err
    # a rerun with a higher threshold completes without redoing a shard
    m = ingest(cfg.model_copy(update={"max_bad_fraction": 0.6}))
    assert m.samples == N - len(EXPECTED)
    assert {p: p.stat().st_mtime_ns for p in shards} == mtimes


def test_missing_input_and_bad_flags_are_clear(tmp_path, capsys):
    rc = cli(["ingest", "--source", "sen12ms", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err  # bad input
    rc = cli(["ingest", "--source", "sen12ms", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
              "--max-bad-fraction", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "ingest.max_bad_fraction" in err
