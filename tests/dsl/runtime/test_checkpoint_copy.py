"""Every worker reads a restored checkpoint from its own local copy (``local_copy``).

Ray's ``Checkpoint.as_directory`` shares one download folder per checkpoint on a node: a later
worker downloads again into it while an earlier one reads, and the last to leave deletes it (the
two-node resume test once failed on a torch file rewritten under its reader). The remote
checkpoint here is a real folder behind a pyarrow SubTreeFileSystem, which Ray treats as remote
(it is not a LocalFileSystem), so its download path is the one exercised.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.fs
import pytest

from dsl.runtime.checkpoint import local_copy

train = pytest.importorskip("ray.train")


def fingerprint(folder: Path) -> dict:
    """Each file's bytes and modification time: a rewrite under a reader changes one of them."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def remote_checkpoint(tmp_path):
    stored = tmp_path / "storage" / "checkpoint_000003"
    stored.mkdir(parents=True)
    (stored / "state.json").write_text('{"step": 3}')
    (stored / "weights.bin").write_bytes(bytes(range(256)) * 64)
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "storage"), pyarrow.fs.LocalFileSystem())
    return train.Checkpoint("checkpoint_000003", filesystem=fs)


def test_two_readers_of_one_checkpoint_never_share_or_disturb_a_folder(remote_checkpoint):
    with local_copy(remote_checkpoint) as first:
        before = fingerprint(first)
        assert set(before) == {"state.json", "weights.bin"}
        # a second worker of the same node restores the same checkpoint while the first reads
        with local_copy(remote_checkpoint) as second:
            assert second != first
            assert fingerprint(second).keys() == before.keys()
        assert not second.exists()  # its own copy removed when it is done
        assert fingerprint(first) == before  # the first reader's files untouched, still there
        assert (first / "state.json").read_text() == '{"step": 3}'
    assert not first.exists()


def test_a_local_checkpoint_is_read_in_place_and_kept(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    with local_copy(train.Checkpoint.from_directory(str(tmp_path))) as d:
        assert d == tmp_path
    assert (tmp_path / "state.json").exists()
