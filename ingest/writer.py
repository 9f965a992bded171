"""Writing one shard: a plain tar built locally, then committed to the output in one step."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import uuid

from dsl.format import encode_json, encode_npy
from dsl.storage import filesystem
from ingest.sources.base import Pair


def sample_members(pair: Pair, split: str | None) -> list[tuple[str, bytes]]:
    meta = dict(pair.meta)
    meta["split"] = split
    members = [("s1.npy", encode_npy(pair.s1)), ("s2.npy", encode_npy(pair.s2))]
    if pair.dfc is not None:
        members += [
            ("dfc.npy", encode_npy(pair.dfc)),
            ("cls", str(pair.extra["cls"]).encode()),
            ("multi.npy", encode_npy(pair.extra["multi"])),
        ]
    members.append(("json", encode_json(meta)))
    return [(f"{pair.key}.{ext}", data) for ext, data in members]


class _HashingWriter(io.RawIOBase):
    """File wrapper that hashes and counts what tarfile writes (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.bytes

    def write(self, b) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)


class ShardWriter:
    """Builds a tar in a local temp file; ``commit`` moves it to its final URL atomically."""

    def __init__(self, tmp_dir: str | None = None):
        fd, self.tmp_path = tempfile.mkstemp(suffix=".tar", dir=tmp_dir)
        self._file = os.fdopen(fd, "wb")
        self._hasher = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._hasher, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: same bytes on rerun
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> dict:
        self._tar.close()
        self._file.close()
        return {"bytes": self._hasher.bytes, "sha256": self._hasher.sha.hexdigest(), "samples": self.count}

    def commit(self, url: str) -> dict:
        """Close and publish. Local: rename (atomic). Object stores: one PUT (atomic per object)."""
        info = self.close()
        fs, path = filesystem(url)
        try:
            if "file" in fs.protocol:
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                fs.makedirs(os.path.dirname(path), exist_ok=True)
                fs.put_file(self.tmp_path, tmp)
                os.replace(tmp, path)
            else:
                fs.put_file(self.tmp_path, path)
        finally:
            os.unlink(self.tmp_path)
        return info

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
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
