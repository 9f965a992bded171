"""The shard format shared by the writer (ingest/) and the readers (dsl/data).

A shard is a plain POSIX tar (``<prefix>[-<split>]-NNNNNN.tar``) readable by ``tar`` and by stock
``webdataset.WebDataset(url).decode()``. Each sample is a group of members sharing a key:

- ``<key>.s1.npy``: float32 [2, H, W], Sentinel-1 VV, VH backscatter in dB.
- ``<key>.s2.npy``: uint16 [C, H, W], Sentinel-2 reflectance x 10000 (C=13 for L1C, 12 for L2A).
- ``<key>.json``: metadata (source, ids, location, CRS, geotransform, band names, date, labels).
- labelled sources: ``<key>.dfc.npy`` uint8 [H, W] (8 classes + 255 ignore), ``<key>.cls``
  (single-label target as decimal text) and ``<key>.multi.npy`` uint8 [8] (multi-hot).

``manifest.json`` at the root is written last and is the commit marker of a dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any

import numpy as np

# 1: the first format. 2: adds the byte-offset index (index.npy, manifest.index). Readers take
# every version up to this one.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")  # no dots: webdataset splits extensions at the first

S1_BANDS = ("VV", "VH")
S2_L1C_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_L2A_BANDS = tuple(b for b in S2_L1C_BANDS if b != "B10")

IGNORE = 255
DFC_CLASSES = ("Forest", "Shrubland", "Grassland", "Wetlands", "Croplands", "Urban", "Barren", "Water")
# DFC2020 raw codes 1..10: Savanna (3) and Snow/Ice (8) are dropped as in the seed paper.
_DFC_LUT = np.full(256, IGNORE, dtype=np.uint8)
for _raw, _new in {1: 0, 2: 1, 4: 2, 5: 3, 6: 4, 7: 5, 9: 6, 10: 7}.items():
    _DFC_LUT[_raw] = _new
MULTI_LABEL_MIN_FRACTION = 0.10


def shard_name(prefix: str, split: str | None, index: int) -> str:
    """Return the tar name of shard ``index``: ``<prefix>[-<split>]-NNNNNN.tar``."""
    return f"{prefix}-{split}-{index:06d}.tar" if split else f"{prefix}-{index:06d}.tar"


def encode_npy(array: np.ndarray) -> bytes:
    """Serialise an array as C-contiguous .npy bytes, without pickle."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, name: str = "<npy>") -> np.ndarray:
    """Decode an .npy member; object arrays (which would need pickle) are refused."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{name}: not a plain numeric .npy ({e})") from None


def encode_json(obj: Any) -> bytes:
    """Serialise metadata as compact JSON with sorted keys, so equal data gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def dfc_remap(raw: np.ndarray) -> np.ndarray:
    """Raw DFC2020 codes -> 0..7, Savanna/Snow-Ice/unknown -> 255."""
    return _DFC_LUT[raw.astype(np.uint8)]


def dfc_targets(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """Single-label (majority class among valid pixels) and multi-label (>= 10%) targets.

    The ignore value never wins: a mask without valid pixels gets single label 255 and no class.
    """
    counts = np.bincount(mask[mask != IGNORE].ravel(), minlength=len(DFC_CLASSES))[: len(DFC_CLASSES)]
    total = counts.sum()
    if total == 0:
        return IGNORE, np.zeros(len(DFC_CLASSES), dtype=np.uint8)
    multi = (counts / total >= MULTI_LABEL_MIN_FRACTION).astype(np.uint8)
    return int(counts.argmax()), multi


def sha256_file(fileobj, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a binary file object, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    for block in iter(lambda: fileobj.read(chunk), b""):
        h.update(block)
    return h.hexdigest()
