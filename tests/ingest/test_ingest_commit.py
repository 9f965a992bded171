"""The commit protocol, bad-input handling and statistics of ``ingest.run``, without Ray.

The real plan, reader, writer, sidecars and manifest run; only the scheduler is swapped:
partitions run one after the other in this process (as ``tests/dsl/data``'s ``ingested``
fixture does), so every test here takes a second or two.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

import ingest.run as run
from dsl.contracts.config import IngestConfig
from dsl.contracts.shard_format import S1_BANDS, S2_L1C_BANDS
from ingest.sources import get_source
from ingest.stats import STRIDE
from ingest.synth import synthesise
from ingest.writer import ShardWriter

SIZE = 32
PER_SHARD_MB = 0.15  # 4 items of 32 px per partition (36,864 estimated bytes each)


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    """Partitions run serially in this process instead of as Ray tasks."""
    monkeypatch.setattr(run, "_run_tasks", lambda cfg, todo, *_: sum(run.write_partition(cfg, p)["seconds"] for p in todo))


def config(raw: Path, out: Path, **kw) -> IngestConfig:
    base = {"source": "sen12ms", "input": str(raw), "output": str(out), "shard_size_mb": PER_SHARD_MB,
            "progress": False}
    return IngestConfig(**{**base, **kw})


def plan(cfg: IngestConfig) -> list[run.Partition]:
    """The partitions the ingest will write (the same pure function it uses)."""
    source = get_source(cfg.source, cfg.tile_size)
    items, _ = source.list(cfg.input)
    per_shard = run.items_per_shard(source, items, cfg.shard_size_mb)
    return run.plan_partitions(items, per_shard, cfg.val_fraction, cfg.prefix)


def sidecars(out: Path) -> dict[str, dict]:
    return {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in (out / "_parts").glob("*.tar.json")}


def quarantine(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_sidecars_name_committed_shards(out: Path) -> None:
    """Every sidecar's shard is in place, with the bytes and sha256 the sidecar records."""
    for partition, side in sidecars(out).items():
        assert side["partition"] == partition
        if side["shard"] is None:  # a partition of bad inputs only: no shard, by design
            assert not side["keys"] and not (out / partition).exists()
            continue
        shard = out / side["shard"]["name"]
        assert shard.exists(), f"sidecar of {partition} commits {shard}, which is not there"
        assert sha256(shard) == side["shard"]["sha256"], partition
        assert shard.stat().st_size == side["shard"]["bytes"], partition
        with tarfile.open(shard) as tar:
            keys = sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
        assert keys == sorted(side["keys"]) and side["shard"]["samples"] == len(keys), partition


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    synthesise(root, "sen12ms", 12, seed=4, size=SIZE)
    return root


# ---------------------------------------------------------------- commit marker after the shard


def test_every_sidecar_names_a_shard_with_its_sha256(raw, tmp_path):
    out = tmp_path / "out"
    m = run.ingest(config(raw, out))
    assert m.samples == 12 and len(m.shards) == len(sidecars(out)) == 3
    assert_sidecars_name_committed_shards(out)
    assert {s.name: s.sha256 for s in m.shards} == {s["shard"]["name"]: s["shard"]["sha256"]
                                                    for s in sidecars(out).values()}


def test_failed_shard_commit_leaves_no_sidecar(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = config(raw, out)
    parts = plan(cfg)
    assert len(parts) == 3
    victim = parts[1].shard
    original = ShardWriter.commit

    def commit(self):
        if self.url.endswith(victim):  # fails before anything is renamed or uploaded
            raise OSError(f"simulated: no space left while committing {self.url}")
        return original(self)

    monkeypatch.setattr(ShardWriter, "commit", commit)
    with pytest.raises(OSError, match="simulated"):
        run.ingest(cfg)
    assert not (out / "_parts" / f"{victim}.json").exists(), "a sidecar commits a shard that was never written"
    assert not (out / victim).exists() and not list(out.glob("*.tmp-*"))
    assert set(sidecars(out)) == {parts[0].shard}  # the partition before it did commit
    assert not (out / "manifest.json").exists()
    assert_sidecars_name_committed_shards(out)

    monkeypatch.setattr(ShardWriter, "commit", original)  # the rerun redoes exactly what is missing
    done = (out / parts[0].shard).stat().st_mtime_ns
    m = run.ingest(cfg)
    assert m.samples == 12 and set(sidecars(out)) == {p.shard for p in parts}
    assert (out / parts[0].shard).stat().st_mtime_ns == done
    assert_sidecars_name_committed_shards(out)


# ---------------------------------------------------------------- bad inputs


def tif(root: Path, sensor: str, key: str) -> Path:
    """The file of ``sensor`` for the item ``<season>_<scene>_p<patch>``."""
    season, scene, patch = key.rsplit("_", 2)
    return root / season / f"{sensor}_{scene}" / f"{season}_{sensor}_{scene}_{patch}.tif"


def shift_grid(path: Path) -> None:
    """Move a raster 5 pixels east: a valid file that no longer lies on its partner's grid."""
    with rasterio.open(path) as ds:
        profile, data = ds.profile, ds.read()
    profile["transform"] = profile["transform"] @ Affine.translation(5, 0)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def test_bad_first_item_of_a_partition_costs_nothing_else(tmp_path):
    raw = tmp_path / "raw"
    synthesise(raw, "sen12ms", 16, seed=4, size=SIZE)
    out = tmp_path / "out"
    cfg = config(raw, out, max_bad_fraction=0.5)
    parts = plan(cfg)
    assert [len(p.items) for p in parts] == [4, 4, 4, 4]
    firsts = [p.items[0].key for p in parts]
    # The first item of every partition is bad, each in another way; the file to blame:
    blame = {
        firsts[0]: tif(raw, "s2", firsts[0]),  # S2 is not a tiff at all
        firsts[1]: tif(raw, "s1", firsts[1]),  # S1 is truncated
        firsts[2]: tif(raw, "s1", firsts[2]),  # S2 removed: the S1 left without its partner
        firsts[3]: tif(raw, "s2", firsts[3]),  # S2 off the S1's grid
    }
    blame[firsts[0]].write_bytes(b"this is not a tiff")
    s1 = blame[firsts[1]]
    s1.write_bytes(s1.read_bytes()[: s1.stat().st_size // 2])
    tif(raw, "s2", firsts[2]).unlink()
    shift_grid(blame[firsts[3]])
    m = run.ingest(cfg)

    good = {it.key for p in parts for it in p.items} - set(blame)
    assert m.samples == len(good) == 12 and m.bad == 4
    assert {k for side in sidecars(out).values() for k in side["keys"]} == good  # no good item lost
    lines = {q["key"]: q for q in quarantine(out)}
    assert set(lines) == set(blame)
    for key, q in lines.items():  # the broken file itself, never its good partner
        assert Path(q["file"]).resolve() == blame[key].resolve(), q
    reasons = [lines[k]["reason"] for k in firsts]
    assert "unreadable" in reasons[0] and "unreadable" in reasons[1]
    assert "missing partner: no s2" in reasons[2] and "grid mismatch" in reasons[3]
    assert_sidecars_name_committed_shards(out)


def test_no_readable_item_quarantines_all_and_fails_clearly(tmp_path):
    raw = tmp_path / "raw"
    synthesise(raw, "sen12ms", 3, seed=4, size=SIZE)
    for path in raw.rglob("*_s1_*.tif"):
        path.write_bytes(b"garbage")
    out = tmp_path / "out"
    with pytest.raises(run.IngestError, match=r"3 of 3 inputs are bad"):
        run.ingest(config(raw, out))
    assert sorted(Path(q["file"]).name for q in quarantine(out)) == sorted(p.name for p in raw.rglob("*_s1_*.tif"))


def test_s1_and_lc_without_s2_is_quarantined_under_the_s1_file(tmp_path):
    raw = tmp_path / "raw"
    synthesise(raw, "sen12ms", 3, seed=4, size=SIZE)
    items, _ = get_source("sen12ms").list(str(raw))
    key = items[1].key
    s2, s1, lc = (tif(raw, sensor, key) for sensor in ("s2", "s1", "lc"))
    assert lc.exists()  # the triple: S1, S2 and the land cover, of which S2 goes missing
    s2.unlink()
    items, bad = get_source("sen12ms").list(str(raw))
    assert [b.key for b in bad] == [key] and key not in {it.key for it in items}
    assert Path(bad[0].file).resolve() == s1.resolve(), bad  # the S1 that lost its partner, not the LC
    assert "no s2 file" in bad[0].reason
    # and so in the quarantine report of a full ingest
    out = tmp_path / "out"
    run.ingest(config(raw, out, max_bad_fraction=0.5))
    (q,) = quarantine(out)
    assert q["key"] == key and Path(q["file"]).resolve() == s1.resolve()


# ---------------------------------------------------------------- statistics of the train split


def read_samples(out: Path, shards) -> dict[str, list[np.ndarray]]:
    arrays: dict[str, list[np.ndarray]] = {"s1": [], "s2": []}
    for s in shards:
        with tarfile.open(out / s.name) as tar:
            for member in tar.getmembers():
                sensor = member.name.split(".", 1)[1].removesuffix(".npy")
                if sensor in arrays:
                    arrays[sensor].append(np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False))
    return arrays


def numpy_stats(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """What the manifest promises: exact min/max; mean/std of every STRIDE-th row and column."""
    full = np.stack(arrays).astype(np.float64)  # [N, C, H, W]
    sampled = full[:, :, ::STRIDE, ::STRIDE]
    return {"mean": sampled.mean(axis=(0, 2, 3)), "std": sampled.std(axis=(0, 2, 3)),
            "min": full.min(axis=(0, 2, 3)), "max": full.max(axis=(0, 2, 3)),
            "count": np.full(full.shape[1], sampled[:, 0].size)}


def test_statistics_come_from_the_train_split_only(tmp_path):
    raw = tmp_path / "raw"
    synthesise(raw, "sen12ms", 32, seed=4, size=SIZE)  # 4 scenes = 4 locations
    out = tmp_path / "out"
    # plain members: the statistics are of the float32 input, compared to 1e-4 (compact S1 is within 1/128 dB)
    m = run.ingest(config(raw, out, val_fraction=0.5, encoding="plain"))
    assert m.stats_split == "train"
    train = [s for s in m.shards if s.split == "train"]
    val = [s for s in m.shards if s.split == "val"]
    assert train and val, "both splits must hold samples for this test: change the seed"
    assert m.samples_by_split == {"train": sum(s.samples for s in train), "val": sum(s.samples for s in val)}
    train_arrays, val_arrays = read_samples(out, train), read_samples(out, val)
    for sensor, names in (("s1", S1_BANDS), ("s2", S2_L1C_BANDS)):
        want = numpy_stats(train_arrays[sensor])
        everything = numpy_stats(train_arrays[sensor] + val_arrays[sensor])
        got = {k: np.array([getattr(getattr(m.stats, sensor)[n], k) for n in names]) for k in want}
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-4, err_msg=f"{sensor} {k}")
        assert not np.allclose(got["mean"], everything["mean"], rtol=1e-6, atol=1e-4), sensor
