"""Stock webdataset on a hostile shard: the README's safe decode call runs no pickle.

The shard is real tar with a ``.pyd`` member whose unpickling makes a folder, so "did it run"
is a plain check. Stock ``.decode()`` runs it (why the README warns); ``.decode(
webdataset_decoder, post=[])`` decodes every member DSL writes and leaves the rest as bytes.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from dsl.contracts.shard_format import encode_npy, webdataset_decoder

wds = pytest.importorskip("webdataset")


class MakesFolder:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def hostile_shard(tmp_path) -> tuple[str, str]:
    marker = str(tmp_path / "pwned")
    members = {"k.s1.npy": encode_npy(np.ones((2, 4, 4), np.float32)), "k.json": b'{"key": "k"}', "k.cls": b"3\n",
               "k.pyd": pickle.dumps(MakesFolder(marker))}
    url = str(tmp_path / "hostile.tar")
    with tarfile.open(url, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return url, marker


def first(url: str, *handlers, **kw) -> dict:
    return next(iter(wds.WebDataset(url, shardshuffle=False, empty_check=False).decode(*handlers, **kw)))


def test_the_safe_call_decodes_ours_and_unpickles_nothing(tmp_path):
    url, marker = hostile_shard(tmp_path)
    sample = first(url, webdataset_decoder, post=[])
    assert not os.path.exists(marker)
    assert isinstance(sample["pyd"], bytes)  # left as it was
    assert sample["s1.npy"].shape == (2, 4, 4) and sample["json"] == {"key": "k"} and sample["cls"] == 3


def test_stock_decode_runs_the_pickle(tmp_path):
    """What the README warns about: the default handlers unpickle, even with ours in front."""
    url, marker = hostile_shard(tmp_path)
    first(url, webdataset_decoder)
    assert os.path.isdir(marker)
