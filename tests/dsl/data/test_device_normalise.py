"""Normalising on the device (``data.normalise_on_device``) gives the loader's normalised batch.

The loader ships raw batches (S2 uint16, S1 float16) and the training loop normalises them
where the model runs; here the "device" is the CPU, which runs the same torch code a GPU does.
The shards hold random dB values (not representable in float16, so the S1 rounding shows),
reflectances beyond the clip range, and distinct statistics per band (a band normalised with
another band's statistics shows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures.shards import SIZE, cfg_for, write_dataset

from dsl.contracts.manifest import read_manifest
from dsl.contracts.shard_format import encode_npy
from dsl.data import Normaliser, make_loader


def _random_members(dtype2=np.uint16):
    def members(idx: int, default: list) -> list:
        rng = np.random.default_rng(idx)
        s1 = rng.uniform(-35.0, 5.0, (2, SIZE, SIZE)).astype(np.float32)  # beyond the [-25, 0] clip too
        s2 = rng.integers(0, 12000, (13, SIZE, SIZE)).astype(dtype2)  # beyond 10000 too
        return [(name, encode_npy(s1) if name.endswith("s1.npy") else encode_npy(s2) if name.endswith("s2.npy")
                 else data) for name, data in default]
    return members


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("devnorm"), [7, 5], members=_random_members(), band_stats=True)


BANDS = [(None, None), ([1], [3, 0, 12]), ([1, 0], [5])]


@pytest.mark.parametrize("scheme", ["manifest", "clip"])
@pytest.mark.parametrize(("s1_bands", "s2_bands"), BANDS)
def test_device_normalised_batch_equals_the_loaders(shards, scheme, s1_bands, s2_bands):
    cfg = cfg_for(shards, batch_size=4, normalisation=scheme, s1_bands=s1_bands, s2_bands=s2_bands)
    cpu = list(make_loader(cfg, 0, 1))
    raw = list(make_loader(cfg, 0, 1, raw=True))
    norm = Normaliser.from_manifest(read_manifest(shards), scheme, s1_bands, s2_bands)
    assert len(raw) == len(cpu) == 3
    for r, c in zip(raw, cpu, strict=True):
        assert r["key"] == c["key"]  # same samples, same crops
        assert (r["s1"].dtype, r["s2"].dtype) == (torch.float16, torch.uint16)  # half float32's bytes
        assert r["s1"].shape == c["s1"].shape and r["s2"].shape == c["s2"].shape
        s1, s2 = norm.normalise_batch(r["s1"], r["s2"])
        assert s1.dtype == s2.dtype == torch.float32
        # S2 travels exactly: the same maths on the same values, the same bits
        assert torch.equal(s2, c["s2"])
        # S1 in float16 is rounded by at most 2^-11 of its value before the same maths...
        bound = 2.0**-11 * 35 * norm.s1.scale.max() + 1e-5  # + float32 rounding of the maths
        assert (s1 - c["s1"]).abs().max() <= bound and (s1 != c["s1"]).any()
        # ...and from those rounded values the device path (torch) is the loader's (numpy), bit for bit
        loader_maths = norm.s1.apply_(r["s1"].numpy().astype(np.float32))
        assert torch.equal(s1, torch.from_numpy(loader_maths))


def test_band_subsets_are_selected_by_the_loader(shards):
    """A raw batch holds the selected bands in order: [3, 0] of S2 is bands 3 and 0 of the full one."""
    full = next(iter(make_loader(cfg_for(shards, batch_size=4), 0, 1, raw=True)))
    sub = next(iter(make_loader(cfg_for(shards, batch_size=4, s1_bands=[1], s2_bands=[3, 0]), 0, 1, raw=True)))
    assert torch.equal(sub["s2"], full["s2"][:, [3, 0]]) and torch.equal(sub["s1"], full["s1"][:, [1]])


def test_channels_last_output_has_the_same_values(shards):
    cfg = cfg_for(shards, batch_size=4)
    raw = next(iter(make_loader(cfg, 0, 1, raw=True)))
    norm = Normaliser.from_manifest(read_manifest(shards), "manifest")
    plain = norm.normalise_batch(raw["s1"], raw["s2"])
    nhwc = norm.normalise_batch(raw["s1"], raw["s2"], torch.channels_last)
    for a, b in zip(plain, nhwc, strict=True):
        assert b.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)


def test_raw_batch_of_the_wrong_width_is_refused(shards):
    norm = Normaliser.from_manifest(read_manifest(shards), "manifest", s2_bands=[0, 1])
    with pytest.raises(ValueError, match="raw batch has 13 bands, this transform 2"):
        norm.s2.normalise_tensor(torch.zeros(1, 13, 8, 8, dtype=torch.uint16))


def test_raw_mode_refuses_a_non_uint16_s2(tmp_path):
    shards = write_dataset(tmp_path / "f32", [4], members=_random_members(np.float32))
    cfg = cfg_for(shards, batch_size=2)
    assert next(iter(make_loader(cfg, 0, 1)))["s2"].dtype == torch.float32  # normalised in the loader: fine
    with pytest.raises(ValueError, match=r"s2 float32, but data.normalise_on_device ships .* uint16 S2"):
        next(iter(make_loader(cfg, 0, 1, raw=True)))


def test_raw_batches_from_loader_workers_are_the_same(shards):
    """Worker processes build raw batches in shared memory (uint16 and float16 storage)."""
    cfg = cfg_for(shards, batch_size=4, loader_workers=2)
    raw, cpu = list(make_loader(cfg, 0, 1, raw=True)), list(make_loader(cfg, 0, 1))
    norm = Normaliser.from_manifest(read_manifest(shards), "manifest")
    assert len(raw) == len(cpu) == 3
    for r, c in zip(raw, cpu, strict=True):
        assert (r["s1"].dtype, r["s2"].dtype) == (torch.float16, torch.uint16) and r["key"] == c["key"]
        assert torch.equal(norm.normalise_batch(r["s1"], r["s2"])[1], c["s2"])
