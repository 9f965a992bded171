"""Writing one shard: a plain tar built in a temp file, then committed in one atomic step.

The tar is written by hand (tarfile's own headers, our own data path) so that array bytes go
from numpy straight into the file and the sha256, with no intermediate copies: on the ingest
hot path every copy of a 2 MB pair shows up in pairs/s.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import uuid

import numpy as np

from dsl.contracts.shard_format import encode_json
from dsl.contracts.storage import filesystem
from ingest.sources.base import Pair

BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


def npy_chunks(array: np.ndarray) -> list:
    """An .npy file as [header bytes, zero-copy view of the data] (same bytes as np.save)."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return [header.getvalue(), memoryview(array).cast("B")]


def sample_members(pair: Pair, split: str | None) -> list[tuple[str, list]]:
    """Return a pair's tar members ``(<key>.<ext>, chunks)`` in the shard format.

    The members are s1.npy, s2.npy, for labelled pairs dfc.npy, cls and multi.npy, and last the
    json metadata, which records ``split``.
    """
    meta = dict(pair.meta)
    meta["split"] = split
    members = [("s1.npy", npy_chunks(pair.s1)), ("s2.npy", npy_chunks(pair.s2))]
    if pair.dfc is not None:
        members += [
            ("dfc.npy", npy_chunks(pair.dfc)),
            ("cls", [str(pair.extra["cls"]).encode()]),
            ("multi.npy", npy_chunks(pair.extra["multi"])),
        ]
    members.append(("json", [encode_json(meta)]))
    return [(f"{pair.key}.{ext}", chunks) for ext, chunks in members]


class ShardWriter:
    """Builds a tar for ``url``; ``commit`` publishes it atomically, ``abort`` leaves nothing.

    Local outputs: the temp file sits beside the destination and commit is a rename.
    Object stores: the temp file is local and commit is one PUT (atomic per object).
    """

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = filesystem(url)
        self.local = "file" in self.fs.protocol
        if self.local:
            self.fs.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.tmp_path = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
            self._file = open(self.tmp_path, "wb")
        else:
            fd, self.tmp_path = tempfile.mkstemp(suffix=".tar")
            self._file = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.count = 0
        self.offsets: list[int] = []  # each sample's first header byte: the shard's index

    def _write(self, data) -> None:
        self._sha.update(data)
        self._file.write(data)
        self.bytes += len(data)

    def add(self, members: list[tuple[str, list]]) -> None:
        """Append one sample's members (from :func:`sample_members`) to the tar."""
        self.offsets.append(self.bytes)
        for name, chunks in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = sum(len(c) for c in chunks), 0o444, 0  # mtime 0: same bytes on rerun
            self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
            for c in chunks:
                self._write(c)
            self._write(b"\0" * (-info.size % BLOCK))
        self.count += 1

    def _close(self) -> dict:
        self.offsets.append(self.bytes)  # the last sample's end
        self._write(b"\0" * (2 * BLOCK))  # end-of-archive marker, then pad to a full record
        self._write(b"\0" * (-self.bytes % RECORD))
        self._file.close()
        return {"bytes": self.bytes, "sha256": self._sha.hexdigest(), "samples": self.count, "offsets": self.offsets}

    def commit(self) -> dict:
        """Finish the tar and publish it at ``url``.

        Returns:
            Its bytes, sha256, samples and ``offsets`` (each sample's start, then the last
            one's end: the shard's entry in the index).
        """
        info = self._close()
        try:
            if self.local:
                os.replace(self.tmp_path, self.path)
            else:
                self.fs.put_file(self.tmp_path, self.path)
        finally:
            if os.path.exists(self.tmp_path):
                os.unlink(self.tmp_path)
        return info

    def abort(self) -> None:
        """Close and delete the temp file; nothing is published."""
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self.tmp_path):
            os.unlink(self.tmp_path)


def write_text_atomic(url: str, text: str) -> None:
    """Small files (sidecars, manifest): rename locally, single PUT on object stores."""
    fs, path = filesystem(url)
    if "file" in fs.protocol:
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    else:
        with fs.open(path, "w") as f:
            f.write(text)
