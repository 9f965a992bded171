"""dsl.data: manifest reading, normalisation on real patches, and the streaming pair loader.

Most shards here come from :mod:`fixtures.shards` (arrays that encode where they come from, so
batches can be checked value by value).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.services import realdata
from fixtures.shards import (
    SIZE,
    all_batches,
    band_stat,
    cfg_for,
    keys_of,
    sample_arrays,
    write_dataset,
)

from dsl.contracts.manifest import Manifest, read_manifest, shard_urls
from dsl.contracts.shard_format import MANIFEST, S1_BANDS, S2_L1C_BANDS
from dsl.data import (
    BandTransform,
    Normaliser,
    batches_per_epoch,
    make_loader,
)
from dsl.data import pairs as pairs_mod
from dsl.data.ranged import RangeReader
from ingest.stats import BandStats


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, str]:
    """Shared tiny datasets, written once."""
    base = tmp_path_factory.mktemp("data")
    return {
        "three": write_dataset(base / "three", [13, 9, 5]),
        "one": write_dataset(base / "one", [24]),
        "resume": write_dataset(base / "resume", [10, 7, 6]),
        "labels": write_dataset(base / "labels", [6, 5], labels=True),
    }


# ---------------------------------------------------------------- manifest


def test_missing_manifest_names_url(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no manifest.json at {tmp_path}/manifest.json: the ingest did not finish"):
        read_manifest(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ingest did not finish"):
        make_loader(cfg_for(str(tmp_path)), 0, 1)


def test_invalid_manifest(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{tmp_path}/manifest.json: not valid JSON"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST).write_text(json.dumps({"shards": [], "bands": {}}))
    with pytest.raises(ValueError, match="missing key 'stats'"):
        read_manifest(str(tmp_path))


def test_shard_urls_by_split(tmp_path):
    write_dataset(tmp_path / "d", [2])
    m = read_manifest(str(tmp_path / "d"))
    m.shards = [{"name": "a.tar", "split": "train", "samples": 1}, {"name": "b.tar", "split": "val", "samples": 1}]
    assert shard_urls(m, "s3://bucket/ds/") == ["s3://bucket/ds/a.tar", "s3://bucket/ds/b.tar"]
    assert shard_urls(m, "s3://bucket/ds", "val") == ["s3://bucket/ds/b.tar"]
    with pytest.raises(ValueError, match=r"no shards of split 'test'.*available splits: 'train', 'val'"):
        shard_urls(m, "s3://bucket/ds", "test")


# ---------------------------------------------------------------- normalisation (real patch)


def _real_pair() -> tuple[np.ndarray, np.ndarray]:
    import rasterio  # a hard dependency: a missing one fails, never skips

    s1_path = realdata("sen12ms-cr", "ROIs1868_summer_s1_19_p30.tif")  # skips (fails on CI) if absent
    s2_path = realdata("sen12ms-cr", "ROIs1868_summer_s2_cloudy_19_p30.tif")
    with rasterio.open(s1_path) as r1, rasterio.open(s2_path) as r2:
        return r1.read(), r2.read()


def _manifest_for(s1: np.ndarray, s2: np.ndarray, exact: bool = True) -> Manifest:
    """Band statistics of the patch: exact (numpy) or as the ingest computes them (sampled)."""
    if exact:
        stats = {
            sensor: {n: {"mean": float(b.mean(dtype=np.float64)), "std": float(b.std(dtype=np.float64))}
                     for n, b in zip(names, x, strict=True)}
            for sensor, names, x in (("s1", S1_BANDS, s1), ("s2", S2_L1C_BANDS, s2))
        }
    else:
        st1, st2 = BandStats(2, integer=False), BandStats(13, integer=True)
        st1.update(s1)
        st2.update(s2)
        stats = {"s1": st1.summary(list(S1_BANDS)), "s2": st2.summary(list(S2_L1C_BANDS))}
    return Manifest(format_version=1, shards=[], bands={"s1": list(S1_BANDS), "s2": list(S2_L1C_BANDS)},
                    stats=stats)


def test_clip_scheme_on_real_patch():
    s1, s2 = _real_pair()
    assert s1.min() < -25  # the patch does exercise the clip
    norm = Normaliser.from_manifest(_manifest_for(s1, s2), "clip", s2_bands=[3, 2, 1])
    y1, y2 = norm(s1, s2)
    assert y1.dtype == y2.dtype == np.float32
    assert y1.shape == (2, 256, 256) and y2.shape == (3, 256, 256)
    assert 0 <= y1.min() and y1.max() <= 1 and 0 <= y2.min() and y2.max() <= 1
    np.testing.assert_allclose(y1, (np.clip(s1.astype(np.float64), -25, 0) + 25) / 25, atol=1e-6)
    np.testing.assert_allclose(y2, np.clip(s2[[3, 2, 1]].astype(np.float64), 0, 10000) / 10000, atol=1e-6)


def test_manifest_scheme_on_real_patch():
    s1, s2 = _real_pair()
    norm = Normaliser.from_manifest(_manifest_for(s1, s2), "manifest")
    y1, y2 = norm(s1, s2)
    for y in (y1, y2):
        assert y.dtype == np.float32
        np.testing.assert_allclose(y.mean(axis=(1, 2), dtype=np.float64), 0, atol=1e-4)
        np.testing.assert_allclose(y.std(axis=(1, 2), dtype=np.float64), 1, atol=1e-4)
    # a strided crop view, as the loader passes it, gives the same values as the full patch
    np.testing.assert_allclose(norm.s2(s2[:, 10:74, 20:84]), y2[:, 10:74, 20:84], atol=1e-5)
    # with the ingest's own (1-in-16 sampled) statistics: close, not exact
    for y in Normaliser.from_manifest(_manifest_for(s1, s2, exact=False), "manifest")(s1, s2):
        np.testing.assert_allclose(y.mean(axis=(1, 2), dtype=np.float64), 0, atol=0.05)
        np.testing.assert_allclose(y.std(axis=(1, 2), dtype=np.float64), 1, atol=0.05)


def test_band_selection_errors():
    m = Manifest(format_version=1, shards=[], bands={"s1": list(S1_BANDS), "s2": list(S2_L1C_BANDS)},
                 stats={"s1": {}, "s2": {}})
    with pytest.raises(ValueError, match="data.s2_bands: band index 13 out of range for the 13 bands"):
        Normaliser.from_manifest(m, "clip", s2_bands=[0, 13])
    with pytest.raises(ValueError, match=r"stats.s1 has no statistics for bands \['VV', 'VH'\]"):
        Normaliser.from_manifest(m, "manifest")


# ---------------------------------------------------------------- equal batches per rank


def test_three_shards_two_ranks_equal_batches(data):
    for spe in (None, 60):  # one pass (27 samples) and several passes per epoch
        cfg = cfg_for(data["three"], samples_per_epoch=spe)
        n = batches_per_epoch(cfg, 2)
        assert n == (spe or 27) // 6
        ranks = [all_batches(cfg, r, 2) for r in (0, 1)]
        for r, batches in enumerate(ranks):
            assert len(batches) == len(make_loader(cfg, r, 2)) == n
            assert all(len(b["key"]) == 3 and b["s1"].shape == (3, 2, 16, 16) for b in batches)
            assert all(b["s2"].shape == (3, 13, 16, 16) for b in batches)
        times = Counter(keys_of(ranks[0]) + keys_of(ranks[1]))
        if spe is None:
            assert not set(keys_of(ranks[0])) & set(keys_of(ranks[1])), "ranks share samples"
            assert len(times) == 24 and max(times.values()) == 1  # 27 // 6 global batches, none twice
        else:  # 60 samples of 27: the shards laid out 2 2/9 times, so every sample 2 or 3 times
            assert len(times) == 27 and set(times.values()) == {2, 3} and sum(times.values()) == 60


def test_one_shard_two_ranks_two_workers(data):
    # 1 shard of 24, 2 ranks x 2 workers: each rank takes its half of every global batch
    cfg = cfg_for(data["one"], loader_workers=2)
    ranks = [all_batches(cfg, r, 2) for r in (0, 1)]
    assert [len(b) for b in ranks] == [4, 4] == [batches_per_epoch(cfg, 2)] * 2
    k0, k1 = keys_of(ranks[0]), keys_of(ranks[1])
    assert len(set(k0)) == len(k0) == 12 and len(set(k1)) == len(k1) == 12  # one pass: no repeats
    assert not set(k0) & set(k1)
    assert set(k0) | set(k1) == {f"loc{i:04d}" for i in range(24)}


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_shards_every_rank_yields_the_global_count(tmp_path, workers):
    """Whatever the shard sizes, every rank yields the global count of full batches.

    Samples are dealt, not shards: one 29-sample shard and two tiny ones still give each rank its
    slice of every global batch (dealing whole shards would give one rank 29 samples, the other
    5, and the longer one would hang in its next collective).
    """
    root = write_dataset(tmp_path / "uneven", [29, 3, 2])
    cfg = cfg_for(root, loader_workers=workers)
    n = batches_per_epoch(cfg, 2)
    assert n == 34 // 6 == 5
    big = {f"loc{i:04d}" for i in range(29)}
    for epoch in (0, 1, 2):
        seen = []
        for rank in (0, 1):
            loader = make_loader(cfg, rank, 2, epoch=epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == n, (epoch, rank)
            assert all(len(b["key"]) == 3 for b in batches)
            keys = keys_of(batches)
            assert len(big & set(keys)) >= 15 - 5  # both ranks read the big shard, at most 5 others
            seen += keys
        assert len(seen) == len(set(seen)) == 30  # 5 global batches of 6, no sample twice


def test_too_few_samples_is_an_error_more_workers_than_batches_is_not(tmp_path):
    cfg = cfg_for(write_dataset(tmp_path / "d", [2]), loader_workers=2)
    with pytest.raises(ValueError, match="data.batch_size 3 x 2 ranks exceeds the 2 samples per epoch: not one full"):
        make_loader(cfg, 0, 2)
    with pytest.raises(ValueError, match="not one full batch"):
        make_loader(cfg_for(str(tmp_path / "d"), batch_size=4), 0, 1)
    # one batch per rank for two workers each: the second worker builds nothing, nothing fails
    cfg = cfg.model_copy(update={"batch_size": 1})
    ranks = [all_batches(cfg, r, 2) for r in (0, 1)]
    assert [len(b) for b in ranks] == [1, 1] and sorted(keys_of(ranks[0]) + keys_of(ranks[1])) == ["loc0000", "loc0001"]


# ---------------------------------------------------------------- cropping


def _windows(batch: dict) -> list[tuple[int, int]]:
    """Check each pair's S1/S2 windows are one contiguous, co-located window; return origins."""
    out = []
    c = batch["s1"].shape[-1]
    for s1, s2 in zip(batch["s1"].numpy(), batch["s2"].numpy(), strict=True):
        y0, x0 = int(s1[0, 0, 0]), int(s1[1, 0, 0])
        yy, xx = np.mgrid[y0 : y0 + c, x0 : x0 + c]
        np.testing.assert_array_equal(s1[0], yy)
        np.testing.assert_array_equal(s1[1], xx)
        np.testing.assert_array_equal(s2[0], yy * SIZE + xx)  # S2 saw the very same window
        out.append((y0, x0))
    return out


def test_random_crop_same_window_for_s1_and_s2(data):
    cfg = cfg_for(data["three"], samples_per_epoch=60)
    origins = [o for b in all_batches(cfg) for o in _windows(b)]
    assert len(set(origins)) > 10, "crops do not move"
    assert all(0 <= y <= SIZE - 16 and 0 <= x <= SIZE - 16 for y, x in origins)
    assert len({y for y, _ in origins}) > 5 and len({x for _, x in origins}) > 5


def test_eval_centre_crop_each_sample_once(data):
    cfg = cfg_for(data["three"], loader_workers=2, batch_size=4)
    seen = []
    for rank in (0, 1):
        loader = make_loader(cfg, rank, 2, train=False)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert any(len(b["key"]) < 4 for b in batches)  # last partial batches are kept
        assert {o for b in batches for o in _windows(b)} == {(8, 8)}
        seen += keys_of(batches)
    assert sorted(seen) == [f"loc{i:04d}" for i in range(27)]


def test_crop_happens_before_conversion(data, monkeypatch):
    calls = []
    original = BandTransform.__call__

    def spy(self, x, out=None):
        calls.append((x.dtype, x.shape))
        return original(self, x, out)

    monkeypatch.setattr(BandTransform, "__call__", spy)
    all_batches(cfg_for(data["three"]))
    assert calls and {c for c in calls} == {(np.dtype(np.float32), (2, 16, 16)), (np.dtype(np.uint16), (13, 16, 16))}


def test_band_selection_in_loader(data):
    batch = next(iter(make_loader(cfg_for(data["three"], s1_bands=[1], s2_bands=[1, 0]), 0, 1)))
    assert batch["s1"].shape == (3, 1, 16, 16) and batch["s2"].shape == (3, 2, 16, 16)
    idx = [int(k[3:]) for k in batch["key"]]
    np.testing.assert_array_equal(batch["s2"][:, 0, 0, 0].numpy(), idx)  # S2 band 1 holds the index


@pytest.mark.parametrize("s1_bands, s2_bands", [([1], [3, 1]), (None, None), ([1, 0], [12, 0, 5])])
def test_selected_bands_use_their_own_statistics(tmp_path, s1_bands, s2_bands):
    """Band b is normalised with mean/std of band b (10 b, b + 1 here), whatever is selected."""
    root = write_dataset(tmp_path / "stats", [6], band_stats=True)
    cfg = cfg_for(root, s1_bands=s1_bands, s2_bands=s2_bands, batch_size=6)
    (batch,) = all_batches(cfg, train=False)  # centre crop: the window starts at (8, 8)
    sel1, sel2 = s1_bands or list(range(2)), s2_bands or list(range(13))
    assert batch["s1"].shape == (6, len(sel1), 16, 16) and batch["s2"].shape == (6, len(sel2), 16, 16)
    for i, key in enumerate(batch["key"]):
        s1, s2, _, _ = sample_arrays(int(key[3:]), SIZE)
        for sensor, raw, sel in (("s1", s1, sel1), ("s2", s2, sel2)):
            for c, b in enumerate(sel):
                want = (raw[b, 8:24, 8:24].astype(np.float64) - band_stat(b)["mean"]) / band_stat(b)["std"]
                np.testing.assert_allclose(batch[sensor][i, c].numpy(), want, rtol=1e-6, atol=1e-4,
                                           err_msg=f"{key} {sensor} band {b} (output channel {c})")


# ---------------------------------------------------------------- determinism and resume


def test_deterministic_and_epoch_dependent(data):
    cfg = cfg_for(data["resume"], batch_size=2)
    a, b = all_batches(cfg, epoch=1), all_batches(cfg, epoch=1)
    assert keys_of(a) == keys_of(b)
    assert all((x["s1"] == y["s1"]).all() and (x["s2"] == y["s2"]).all() for x, y in zip(a, b, strict=True))
    assert keys_of(all_batches(cfg, epoch=2)) != keys_of(a)


@pytest.mark.parametrize("start", [0, 6, 7, 12, 21, 22, 23])
def test_resume_mid_epoch_equals_full_epoch(data, start):
    """Resumed at any sample (a batch's start or not, the epoch's end): the epoch's next samples."""
    cfg = cfg_for(data["resume"], batch_size=2, loader_workers=2)  # 23 samples -> 11 batches
    full = all_batches(cfg, epoch=3)
    assert len(full) == batches_per_epoch(cfg, 1) == 11
    resumed = all_batches(cfg, epoch=3, start_sample=start)
    assert len(resumed) == len(make_loader(cfg, 0, 1, epoch=3, start_sample=start)) == (23 - start) // 2
    got = keys_of(resumed)
    order = keys_of(full) + keys_of(all_batches(cfg_for(data["resume"], batch_size=1), epoch=3))[22:]
    assert got == order[start : start + len(got)]
    rows = {k: (b["s1"][i], b["s2"][i]) for b in full for i, k in enumerate(b["key"])}
    for b in resumed:  # same crops too: a sample's window does not depend on where the job started
        for i, k in enumerate(b["key"]):
            if k in rows:
                assert torch.equal(rows[k][0], b["s1"][i]) and torch.equal(rows[k][1], b["s2"][i]), k
    assert all(k in rows for k in got[:-1])  # (only an odd start reaches the sample full leaves out)


def test_resume_skips_without_reading_or_decoding(data, monkeypatch):
    calls, reads = [], []
    decode, read = pairs_mod.Batcher._decode, RangeReader.read

    def counting(self, sample, name):
        calls.append(name)
        return decode(self, sample, name)

    def reading(self, url, start, end):
        reads.append((url, start, end))
        return read(self, url, start, end)

    monkeypatch.setattr(pairs_mod.Batcher, "_decode", counting)
    monkeypatch.setattr(RangeReader, "read", reading)
    cfg = cfg_for(data["resume"], batch_size=2)
    batches = all_batches(cfg, start_sample=14)
    assert len(batches) == 4 and len(calls) == 4 * 2 * 2  # only the 4 remaining batches, s1 + s2
    assert len(reads) == len(set(reads)) == 8  # one range read per remaining sample, none skipped
    reads.clear()
    assert keys_of(batches) == keys_of(all_batches(cfg))[14:22] and len(reads) == 22  # (the full epoch)


# ---------------------------------------------------------------- labels and bad data


def test_labels(data):
    for train in (True, False):
        batch = next(iter(make_loader(cfg_for(data["labels"], batch_size=4), 0, 1, labels=True, train=train)))
        assert batch["cls"].dtype == torch.int64 and batch["cls"].shape == (4,)
        assert batch["multi"].dtype == torch.float32 and batch["multi"].shape == (4, 8)
        for key, cls, multi in zip(batch["key"], batch["cls"], batch["multi"], strict=True):
            _, _, want_cls, want_multi = sample_arrays(int(key[3:]), SIZE)
            assert int(cls) == want_cls
            np.testing.assert_array_equal(multi.numpy(), want_multi)


def test_corrupt_member_names_shard_and_key(tmp_path):
    def garble(idx, members):
        if idx == 2:  # loc0002: truncated S2 array
            members[1] = (members[1][0], members[1][1][:200])
        return members

    root = write_dataset(tmp_path / "bad", [4], members=garble)
    with pytest.raises(ValueError, match=rf"{root}/pairs-000000.tar: sample 'loc0002': s2.npy"):
        all_batches(cfg_for(root, batch_size=4), train=False)


def test_training_drops_a_corrupt_sample_counts_and_names_it(tmp_path, caplog):
    def garble(idx, members):
        if idx == 2:  # loc0002: truncated S2 array
            members[1] = (members[1][0], members[1][1][:200])
        return members

    root = write_dataset(tmp_path / "bad", [4], members=garble)
    with caplog.at_level("WARNING", logger="dsl.data.pairs"):
        batches = all_batches(cfg_for(root, batch_size=2))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 4 and "loc0002" not in keys and len(set(keys)) == 3  # a stand-in repeats one
    assert sum(b["bad"] for b in batches) == 1 and sum(b["skipped"] for b in batches) == 0
    assert re.search(rf"dropping a bad sample: {root}/pairs-000000.tar: sample 'loc0002': s2.npy", caplog.text)


def test_pickled_member_is_refused(tmp_path):
    import io

    def pickled(idx, members):
        if idx == 1:
            buf = io.BytesIO()
            np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
            members[0] = (members[0][0], buf.getvalue())
        return members

    root = write_dataset(tmp_path / "pkl", [3], members=pickled)
    with pytest.raises(ValueError, match=r"pairs-000000.tar: sample 'loc0001': s1.npy: not a plain numeric .npy"):
        all_batches(cfg_for(root, batch_size=3), train=False)


def test_truncated_shard_names_url(tmp_path):
    root = write_dataset(tmp_path / "cut", [4])
    shard = Path(root) / "pairs-000000.tar"
    shard.write_bytes(shard.read_bytes()[:60_000])  # cut inside the second sample
    with pytest.raises(ValueError, match=rf"{shard}: byte \d+: member loc0001\.s2\.npy runs past the end of the shard "
                       r"\(truncated\)"):
        all_batches(cfg_for(root, batch_size=2), train=False)


def test_reads_fsspec_url(data):
    """Any fsspec URL goes through gopen's registered handler (memory:// stands in for s3://)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in Path(data["three"]).iterdir():
        fs.pipe(f"/three/{f.name}", f.read_bytes())
    cfg = cfg_for("memory://three", batch_size=4)
    remote = all_batches(cfg, train=False)
    local = all_batches(cfg_for(data["three"], batch_size=4), train=False)
    assert keys_of(remote) == keys_of(local) and len(keys_of(remote)) == 27
    assert all((a["s2"] == b["s2"]).all() for a, b in zip(remote, local, strict=True))
    assert len(all_batches(cfg)) == batches_per_epoch(cfg, 1)


# ---------------------------------------------------------------- real ingest output


@pytest.fixture(scope="session")
def ingested(tmp_path_factory) -> str:
    """A labelled dataset made by the real synth + ingest code (plan, writer, stats, manifest).

    Only the scheduler is swapped: partitions run in this process instead of as Ray tasks, which
    saves the ~10 s Ray start and changes nothing in what is written.
    """
    import ingest.run as run
    from dsl.contracts.config import IngestConfig
    from ingest.synth import synthesise

    base = tmp_path_factory.mktemp("ingested")
    synthesise(str(base / "raw"), "dfc2020", 10, 0, 64)
    cfg = IngestConfig(source="dfc2020", input=str(base / "raw"), output=str(base / "shards"),
                       shard_size_mb=0.4, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        # serial, in-process partitions (no Ray start-up); returns the busy seconds like the real one
        mp.setattr(run, "_run_tasks", lambda cfg, todo, *_: sum(run.write_partition(cfg, p)["seconds"] for p in todo))
        run.ingest(cfg)
    return cfg.output


def test_reads_real_ingest_output(ingested):
    manifest = read_manifest(ingested)
    cfg = cfg_for(ingested, split="validation", batch_size=2, crop_size=32)
    keys = []
    for rank in (0, 1):
        for batch in make_loader(cfg, rank, 2, labels=True, train=False):
            assert batch["s1"].shape[1:] == (2, 32, 32) and batch["s2"].shape[1:] == (13, 32, 32)
            assert ((batch["cls"] >= 0) & ((batch["cls"] < 8) | (batch["cls"] == 255))).all()
            keys += batch["key"]
    assert len(keys) == len(set(keys)) == manifest.samples_by_split["validation"]
    train = all_batches(cfg, labels=True)
    assert len(train) == batches_per_epoch(cfg, 1) and all(np.isfinite(b["s2"].numpy()).all() for b in train)
