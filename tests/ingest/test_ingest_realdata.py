"""Real Sentinel GeoTIFFs through ingest: shard values equal rasterio's reads bit for bit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio
import webdataset as wds
from fixtures.services import realdata
from rasterio.enums import Resampling

from dsl.contracts.config import IngestConfig
from dsl.contracts.shard_format import S2_L1C_BANDS, S2_L2A_BANDS, decode_npy
from ingest.run import ingest
from ingest.sources.bigearthnet import S2_FILE_BANDS
from ingest.stats import STRIDE

pytestmark = pytest.mark.slow  # ingests on a local Ray


def read_shards(out: str, manifest) -> dict[str, dict]:
    """Every sample of a dataset, via stock webdataset (no decoders: raw bytes)."""
    urls = [f"{out}/{s.name}" for s in manifest.shards]
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        samples[s["__key__"]] = s
    return samples


@pytest.fixture(scope="module")
def sen12ms_tree(tmp_path_factory):
    """The SEN12MS tree rebuilt from the real files (one real pair, plus two orphans)."""
    root = tmp_path_factory.mktemp("sen12ms")
    cr = realdata("sen12ms-cr")
    copies = {
        cr / "ROIs1868_summer_s1_19_p30.tif": "ROIs1868_summer/s1_19/ROIs1868_summer_s1_19_p30.tif",
        # the cloudy S2 shares the S1's grid (README); SEN12MS names it s2
        cr / "ROIs1868_summer_s2_cloudy_19_p30.tif": "ROIs1868_summer/s2_19/ROIs1868_summer_s2_19_p30.tif",
        # S1 + land cover without S2, and an S2 without S1: missing partners
        realdata("sen12ms", "ROIs1158_spring_s1_1_p30.tif"): "ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.tif",
        realdata("sen12ms", "ROIs1158_spring_lc_1_p30.tif"): "ROIs1158_spring/lc_1/ROIs1158_spring_lc_1_p30.tif",
        cr / "ROIs2017_winter_s2_102_p926.tif": "ROIs2017_winter/s2_102/ROIs2017_winter_s2_102_p926.tif",
    }
    for src, dst in copies.items():
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / dst)
    return root


def test_sen12ms_real_pair_bit_for_bit(sen12ms_tree, tmp_path, ray_session):
    out = str(tmp_path / "shards")
    m = ingest(IngestConfig(source="sen12ms", input=str(sen12ms_tree), output=out, max_bad_fraction=1.0, progress=False,
                            encoding="plain"))  # bit for bit; the compact members: test_sample_encoding.py
    assert m.samples == 1 and m.bad == 2
    samples = read_shards(out, m)
    s = samples["ROIs1868_summer_19_p30"]
    s1, s2 = decode_npy(s["s1.npy"]), decode_npy(s["s2.npy"])
    with rasterio.open(sen12ms_tree / "ROIs1868_summer/s1_19/ROIs1868_summer_s1_19_p30.tif") as ds:
        want_s1, crs, transform = ds.read(), ds.crs.to_string(), list(ds.transform)[:6]
    with rasterio.open(sen12ms_tree / "ROIs1868_summer/s2_19/ROIs1868_summer_s2_19_p30.tif") as ds:
        want_s2 = ds.read()
    assert s1.dtype == np.float32 and s1.shape == (2, 256, 256)
    assert s2.dtype == np.uint16 and s2.shape == (13, 256, 256)
    assert s1.tobytes() == want_s1.tobytes() and s2.tobytes() == want_s2.tobytes()
    meta = json.loads(s["json"])
    assert meta["crs"] == crs == "EPSG:32631" and meta["transform"] == pytest.approx(transform)
    assert meta["s2_bands"] == list(S2_L1C_BANDS) and meta["s1_bands"] == ["VV", "VH"]
    assert meta["source"] == "sen12ms" and meta["date"] == "summer"

    quarantined = [json.loads(line) for line in open(f"{out}/quarantine.jsonl")]
    assert {q["key"] for q in quarantined} == {"ROIs1158_spring_1_p30", "ROIs2017_winter_102_p926"}
    assert all("missing partner" in q["reason"] for q in quarantined)

    # statistics: min/max exact over all pixels; moments exact over the fixed 1-in-16 pixel
    # sample; percentiles within 0.5% (S2, exact below 200) or 0.025 dB (S1) of the sample's
    # (ingest/stats.py: a few KB of histogram per partition), and close to the full patch's
    st = m.stats.model_dump()
    for b, name in enumerate(S2_L1C_BANDS):
        full = want_s2[b].astype(np.float64)
        band = full[::STRIDE, ::STRIDE]
        assert st["s2"][name]["mean"] == pytest.approx(band.mean(), rel=1e-9)
        assert st["s2"][name]["std"] == pytest.approx(band.std(), rel=1e-9)
        assert st["s2"][name]["mean"] == pytest.approx(full.mean(), rel=0.02)
        assert st["s2"][name]["min"] == full.min() and st["s2"][name]["max"] == full.max()
        # percentiles use the inverted-CDF definition
        for q in (1, 99):
            exact = np.percentile(band, q, method="inverted_cdf")
            assert st["s2"][name][f"p{q}"] == (exact if exact < 200 else pytest.approx(exact, rel=0.005))
    for b, name in enumerate(["VV", "VH"]):
        full = want_s1[b].astype(np.float64)
        band = full[::STRIDE, ::STRIDE]
        assert st["s1"][name]["mean"] == pytest.approx(band.mean(), rel=1e-6)
        assert st["s1"][name]["std"] == pytest.approx(band.std(), rel=1e-6)
        assert st["s1"][name]["p1"] == pytest.approx(np.percentile(band, 1, method="inverted_cdf"), abs=0.025)
        assert st["s1"][name]["min"] == pytest.approx(full.min()) and st["s1"][name]["max"] == pytest.approx(full.max())


def test_bigearthnet_real_pairs(tmp_path, ray_session):
    root = realdata("bigearthnet-mm")
    out = str(tmp_path / "ben")
    m = ingest(IngestConfig(source="bigearthnet", input=str(root), output=out, progress=False, encoding="plain"))
    assert m.samples == 6 and m.bad == 0
    assert m.bands.s2 == list(S2_L2A_BANDS)
    samples = read_shards(out, m)
    for key, s in samples.items():
        meta = json.loads(s["json"])
        s1_dir = root / "BigEarthNet-S1-Example" / key
        s2_dir = root / "BigEarthNet-S2-Example" / meta["s2_patch"]
        with rasterio.open(s1_dir / f"{key}_VV.tif") as vv, rasterio.open(s1_dir / f"{key}_VH.tif") as vh:
            want_s1 = np.concatenate([vv.read(), vh.read()])
            crs = vv.crs.to_string()
        bands = []
        for b in S2_FILE_BANDS:
            with rasterio.open(s2_dir / f"{meta['s2_patch']}_{b}.tif") as ds:
                bands.append(ds.read(out_shape=(1, 120, 120), resampling=Resampling.bilinear))
        want_s2 = np.concatenate(bands)
        s1, s2 = decode_npy(s["s1.npy"]), decode_npy(s["s2.npy"])
        assert s1.shape == (2, 120, 120) and s2.shape == (12, 120, 120)
        assert s1.tobytes() == want_s1.astype(np.float32).tobytes()
        assert s2.tobytes() == want_s2.tobytes()
        assert meta["crs"] == crs and meta["labels"]
        # 10 m bands are not resampled at all
        with rasterio.open(s2_dir / f"{meta['s2_patch']}_B04.tif") as ds:
            assert np.array_equal(s2[3], ds.read(1))
