"""Writing one shard: a plain tar built in a temp file, then committed in one atomic step.

The tar is written by hand (tarfile's own headers, our own data path) so that array bytes go
from numpy (plain .npy) or the compressor (compact members) straight into the file and the
sha256, with no intermediate copies: on the ingest hot path every copy shows up in pairs/s.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import uuid

import numpy as np

from dsl.contracts.shard_format import (
    S1_MAX_ERROR_DB,
    S1_STEP_DB,
    decode_blosc,
    encode_blosc,
    encode_json,
)
from dsl.contracts.storage import filesystem
from ingest.records import Pair

BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


def npy_chunks(array: np.ndarray) -> list:
    """An .npy file as [header bytes, zero-copy view of the data] (same bytes as np.save)."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return [header.getvalue(), memoryview(array).cast("B")]


def s1_member(s1: np.ndarray) -> tuple[str, list, float]:
    """A pair's S1 member in the compact encoding, checked against the error bound.

    The array is stored as int16 dB x 64 (``s1.blosc``; why, at ``S1_STEP_DB`` in
    dsl/contracts/shard_format.py). The check decodes the very bytes to be written and compares
    them with the float32 input. A sample that fails it (a value beyond +-511 dB such as a finite
    nodata fill, or NaN, which sources refuse anyway) is stored at full precision as float32
    ``s1.npy`` rather than quarantined: it is valid input, and today's nodata handling stays.

    Returns:
        ``(ext, chunks, max_error)``: the member's extension, its chunks and the largest
        absolute error in dB of what it decodes to (0.0 for the full-precision fallback).
    """
    s1 = np.ascontiguousarray(s1, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN / out of range: caught by the check
        fixed = np.rint(s1 * np.float32(1 / S1_STEP_DB)).clip(-32768, 32767).astype(np.int16)
    chunks = encode_blosc(fixed, scale=S1_STEP_DB)
    error = float(np.max(np.abs(decode_blosc(b"".join(chunks), "s1.blosc") - s1), initial=0.0))
    if not error <= S1_MAX_ERROR_DB:  # `not <=`: a NaN error fails too
        return "s1.npy", npy_chunks(s1), 0.0
    return "s1.blosc", chunks, error


def sample_members(
    pair: Pair, split: str | None, encoding: str = "compact"
) -> list[tuple[str, list]]:
    """Return a pair's tar members ``(<key>.<ext>, chunks)`` in the shard format.

    The members are S1 and S2, for labelled pairs dfc.npy, cls and multi.npy, and last the
    json metadata, which records ``split``.

    Args:
        pair: The pair.
        split: Its split, or None.
        encoding: ``compact`` (format 2: ``s1.blosc`` int16 fixed-point dB, falling back to
            ``s1.npy`` per sample, see :func:`s1_member`; ``s2.blosc`` lossless) or ``plain``
            (``s1.npy`` float32 and ``s2.npy`` uint16, as format 1 wrote them).

    Raises:
        ValueError: Unknown ``encoding``.
    """
    meta = dict(pair.meta)
    meta["split"] = split
    if encoding == "compact":
        s1_ext, s1_chunks, _ = s1_member(pair.s1)
        members = [(s1_ext, s1_chunks), ("s2.blosc", encode_blosc(pair.s2))]
    elif encoding == "plain":
        members = [("s1.npy", npy_chunks(pair.s1)), ("s2.npy", npy_chunks(pair.s2))]
    else:
        raise ValueError(f"unknown encoding {encoding!r}: compact or plain")
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
        self.digests: list[int] = []  # each sample's byte range's sha256 prefix (sample_digest)
        self._sample_sha = None

    def _write(self, data) -> None:
        self._sha.update(data)
        if self._sample_sha is not None:
            self._sample_sha.update(data)
        self._file.write(data)
        self.bytes += len(data)

    def add(self, members: list[tuple[str, list]]) -> None:
        """Append one sample's members (from :func:`sample_members`) to the tar."""
        self.offsets.append(self.bytes)
        self._sample_sha = hashlib.sha256()  # the sample's range: its headers, data and padding
        for name, chunks in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = sum(len(c) for c in chunks), 0o444, 0  # mtime 0: same bytes on rerun
            self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
            for c in chunks:
                self._write(c)
            self._write(b"\0" * (-info.size % BLOCK))
        self.digests.append(int.from_bytes(self._sample_sha.digest()[:8], "little"))  # = sample_digest
        self._sample_sha = None
        self.count += 1

    def _close(self) -> dict:
        self.offsets.append(self.bytes)  # the last sample's end
        self._write(b"\0" * (2 * BLOCK))  # end-of-archive marker, then pad to a full record
        self._write(b"\0" * (-self.bytes % RECORD))
        self._file.close()
        return {"bytes": self.bytes, "sha256": self._sha.hexdigest(), "samples": self.count, "offsets": self.offsets,
                "digests": self.digests}

    def commit(self) -> dict:
        """Finish the tar and publish it at ``url``.

        Returns:
            Its bytes, sha256, samples, ``offsets`` (each sample's start, then the last
            one's end: the shard's entry in the index) and ``digests`` (each sample's).
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
