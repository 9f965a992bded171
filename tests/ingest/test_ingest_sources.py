"""Sources and the shard format: tar-readable, labels, zarr and manifest inputs."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import rasterio
import zarr
from affine import Affine

from dsl.contracts.config import IngestConfig
from dsl.contracts.shard_format import (
    IGNORE,
    decode_array,
    dfc_remap,
    dfc_targets,
    webdataset_decoder,
)
from ingest.run import ingest
from ingest.synth import synthesise


def test_tar_readable_and_no_pickle(tmp_path, ray_session):
    raw, out = tmp_path / "raw", tmp_path / "out"
    synthesise(raw, "sen12ms", 4, seed=2, size=32)
    m = ingest(IngestConfig(source="sen12ms", input=str(raw), output=str(out), progress=False))
    shard = out / m.shards[0].name
    names = subprocess.run(["tar", "tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
    assert len(names) == 3 * 4 and all(n.rsplit(".", 2)[0].count(".") == 0 for n in names)
    assert {n.split(".", 1)[1] for n in names} == {"s1.blosc", "s2.blosc", "json"}
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "xf", str(shard), "-C", str(dest)], check=True)
    arr = decode_array(names[0].split(".", 1)[1], (dest / names[0]).read_bytes(), names[0])
    assert arr.dtype in (np.float32, np.uint16)
    for member in m.shards:
        import hashlib

        assert hashlib.sha256((out / member.name).read_bytes()).hexdigest() == member.sha256


def test_dfc2020_targets_by_hand():
    raw = np.array([[1, 1, 1, 3], [3, 3, 3, 3], [10, 10, 8, 8], [0, 9, 9, 0]], dtype=np.uint8)
    mask = dfc_remap(raw)
    # Savanna (3), Snow/Ice (8) and unknown (0) are ignored even where they are the majority
    assert (mask == IGNORE).sum() == 9
    single, multi = dfc_targets(mask)
    assert single == 0  # Forest: 3 of 7 valid pixels (Savanna had 5 pixels but never wins)
    assert multi.tolist() == [1, 0, 0, 0, 0, 0, 1, 1]  # forest 3/7, barren 2/7, water 2/7 >= 10%
    assert dfc_targets(np.full((4, 4), IGNORE, np.uint8))[0] == IGNORE
    edge = np.array([0] * 9 + [7] * 1, dtype=np.uint8)  # water exactly 10%
    assert dfc_targets(edge)[1][7] == 1


def test_dfc2020_source_keeps_mask_and_targets(tmp_path, ray_session):
    raw, out = tmp_path / "raw", tmp_path / "out"
    synthesise(raw, "dfc2020", 6, seed=4, size=32)
    m = ingest(IngestConfig(source="dfc2020", input=str(raw), output=str(out), progress=False))
    assert m.samples_by_split == {"test": 3, "validation": 3}
    import webdataset as wds

    for s in wds.WebDataset([str(out / x.name) for x in m.shards], shardshuffle=False, empty_check=False).decode():
        meta = s["json"]
        with rasterio.open(meta["dfc_file"]) as ds:
            want = dfc_remap(ds.read(1))
        assert np.array_equal(s["dfc.npy"], want)
        single, multi = dfc_targets(want)
        assert s["cls"] == single == meta["label"] and s["multi.npy"].tolist() == multi.tolist()


def test_zarr_source(tmp_path, ray_session):
    store = str(tmp_path / "cube.zarr")
    g = zarr.open_group(store, mode="w")
    rng = np.random.default_rng(0)
    s1 = rng.normal(-15, 4, size=(5, 2, 16, 16)).astype(np.float32)
    s2 = rng.integers(1, 5000, size=(5, 12, 16, 16), dtype=np.uint16)
    s1[3, 0, 0, 0] = np.inf  # one bad row
    g.create_array("s1", data=s1)
    g.create_array("s2", data=s2)
    g.attrs.update({"crs": "EPSG:32633", "date": "2021-06-01"})
    out = tmp_path / "out"
    m = ingest(IngestConfig(source="zarr", input=store, output=str(out), max_bad_fraction=0.5, progress=False))
    assert m.samples == 4 and m.bad == 1 and len(m.bands.s2) == 12
    (q,) = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert q["key"] == "zarr_00000003" and "NaN/inf" in q["reason"] and "s1[3]" in q["file"]
    import webdataset as wds

    got = {s["__key__"]: s for s in wds.WebDataset(str(out / m.shards[0].name), shardshuffle=False)
           .decode(webdataset_decoder)}
    assert np.array_equal(got["zarr_00000002"]["s2.blosc"], s2[2])


def _write(path, data, transform, crs="EPSG:32632"):
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform) as dst:
        dst.write(data)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_source_tiles_large_rasters(tmp_path, ray_session, fmt):
    rng = np.random.default_rng(1)
    t = Affine(10, 0, 500000, 0, -10, 4000000)
    s1 = rng.normal(-12, 3, size=(2, 64, 64)).astype(np.float32)
    s2 = rng.integers(1, 9000, size=(13, 64, 64), dtype=np.uint16)
    _write(tmp_path / "a_s1.tif", s1, t)
    _write(tmp_path / "a_s2.tif", s2, t)
    _write(tmp_path / "b_s1.tif", s1[:, :32, :32], t)
    _write(tmp_path / "b_s2.tif", s2[:, :32, :32], t, crs="EPSG:32633")  # CRS differs: bad
    table = pd.DataFrame({"s1": [str(tmp_path / "a_s1.tif"), str(tmp_path / "b_s1.tif")],
                          "s2": [str(tmp_path / "a_s2.tif"), str(tmp_path / "b_s2.tif")],
                          "id": ["scene.a", "scene_b"]})
    path = tmp_path / f"pairs.{fmt}"
    table.to_csv(path, index=False) if fmt == "csv" else table.to_parquet(path)
    out = tmp_path / "out"
    m = ingest(IngestConfig(source="manifest", input=str(path), output=str(out), tile_size=32,
                            max_bad_fraction=0.5, progress=False))
    assert m.samples == 4 and m.bad == 1
    import webdataset as wds

    got = {s["__key__"]: s for s in wds.WebDataset(str(out / m.shards[0].name), shardshuffle=False)
           .decode(webdataset_decoder)}
    assert sorted(got) == ["scene_a_r0_c0", "scene_a_r0_c1", "scene_a_r1_c0", "scene_a_r1_c1"]
    assert np.array_equal(got["scene_a_r1_c0"]["s2.blosc"], s2[:, 32:, :32])
    assert got["scene_a_r1_c0"]["json"]["transform"][2] == 500000 and got["scene_a_r1_c0"]["json"]["transform"][5] == 4000000 - 320
    (q,) = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert q["key"] == "scene_b" and "grid mismatch" in q["reason"]
