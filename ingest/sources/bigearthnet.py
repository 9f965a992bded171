"""BigEarthNet-MM: S1 folders (VV, VH) paired to S2 L2A folders (one tif per band).

The S1 folder's ``<patch>_labels_metadata.json`` names its partner in
``corresponding_s2_patch``. S2 20 m and 60 m bands are resampled (bilinear) to the 10 m grid.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import fsspec
import numpy as np

from dsl.contracts.shard_format import S2_L2A_BANDS
from dsl.contracts.storage import filesystem
from ingest.listing import find_files
from ingest.raster import BadInput, Raster, raster_shape, read_raster
from ingest.sources.base import BadRecord, Pair, PairItem, Source, check_key, make_pair

# BigEarthNet file suffixes, in S2_L2A_BANDS order (B1 is saved as B01, ...).
S2_FILE_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


class BigEarthNet(Source):
    """BigEarthNet-MM pairs: an S1 patch and its corresponding S2 patch (the location)."""

    name = "bigearthnet"
    s2_bands = S2_L2A_BANDS

    def list(self, input_url: str) -> tuple[list[PairItem], list[BadRecord]]:
        """List one item per S1 patch whose metadata names an S2 patch present under the input.

        Raises:
            FileNotFoundError: ``input_url`` does not exist.
        """
        fs, root = filesystem(input_url)
        if not fs.exists(root):
            raise FileNotFoundError(f"input {input_url} does not exist")
        proto = input_url.split("://", 1)[0] + "://" if "://" in input_url else ""
        folders: dict[str, str] = {}  # patch name -> folder URL
        for path in find_files(root, fs):  # concurrent listings on object stores
            if path.endswith("_labels_metadata.json"):
                folder, name = path.rsplit("/", 1)
                folders[name[: -len("_labels_metadata.json")]] = proto + folder
        items, bad = [], []
        for patch, folder in sorted(folders.items()):
            meta_url = f"{folder}/{patch}_labels_metadata.json"
            if not patch.startswith("S1"):
                continue
            try:
                with fsspec.open(meta_url, "r") as f:
                    s2_patch = json.load(f)["corresponding_s2_patch"]
            except (OSError, ValueError, KeyError) as e:
                bad.append(BadRecord(patch, meta_url, f"unreadable metadata or no corresponding_s2_patch ({e})"))
                continue
            if s2_patch not in folders:
                bad.append(BadRecord(patch, meta_url, f"missing partner: S2 patch {s2_patch} not found under the input"))
                continue
            items.append(
                PairItem(
                    key=check_key(patch),
                    location=s2_patch,
                    files=(("s1", f"{folder}/{patch}"), ("s2", f"{folders[s2_patch]}/{s2_patch}")),
                )
            )
        return items, bad

    def estimate_bytes(self, item: PairItem) -> int:
        """Estimate from the VV header: float32 S1 x 2 plus uint16 S2 x 12 on the 10 m grid."""
        _, h, w, _ = raster_shape(item.file("s1") + "_VV.tif")
        return h * w * (4 * 2 + 2 * len(self.s2_bands)) + 4096

    def read(self, item: PairItem) -> Iterator[Pair]:
        """Stack VV/VH and the 12 S2 band files (resampled to the S1 grid) into one pair."""
        s1_stem, s2_stem = item.file("s1"), item.file("s2")
        vv, vh = read_raster(s1_stem + "_VV.tif"), read_raster(s1_stem + "_VH.tif")
        for band in (vv, vh):
            if band.data.shape[0] != 1:
                raise BadInput(band.path, f"wrong band count: expected 1, found {band.data.shape[0]}")
        if vh.grid != vv.grid:
            raise BadInput(vh.path, f"grid mismatch with {vv.path}")
        s1 = Raster(vv.path, np.concatenate([vv.data, vh.data]), vv.crs, vv.transform, vv.nodata)
        shape = vv.data.shape[1:]
        bands = [read_raster(f"{s2_stem}_{b}.tif", out_shape=shape) for b in S2_FILE_BANDS]
        for b in bands:
            if b.data.shape[0] != 1:
                raise BadInput(b.path, f"wrong band count: expected 1, found {b.data.shape[0]}")
        s2 = Raster(bands[1].path, np.concatenate([b.data for b in bands]), bands[1].crs, bands[1].transform, bands[1].nodata)
        with fsspec.open(f"{s1_stem}_labels_metadata.json", "r") as f:
            s1_meta = json.load(f)
        with fsspec.open(f"{s2_stem}_labels_metadata.json", "r") as f:
            s2_meta = json.load(f)
        meta = {
            "source": self.name,
            "s1_patch": item.key,
            "s2_patch": item.location,
            "labels": s2_meta.get("labels", s1_meta.get("labels")),
            "date": s2_meta.get("acquisition_date") or s1_meta.get("acquisition_time"),
            "s2_resampling": "bilinear",
        }
        pair = make_pair(item.key, item.location, s1, s2, self.s2_bands, meta)
        pair.meta["s1_file"] = vv.path + " " + vh.path
        yield pair
