"""SEN12MS (and DFC2020, which shares its layout).

Tree: ``<season>/<sensor>_<scene>/<season>_<sensor>_<scene>_p<patch>.tif`` with sensor in
s1, s2, lc (and dfc for DFC2020); pairs are matched by (season, scene, patch).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

from dsl.contracts.shard_format import S2_L1C_BANDS, dfc_remap, dfc_targets
from dsl.contracts.storage import filesystem
from ingest.listing import find_files
from ingest.raster import BadInput, raster_shape, read_raster
from ingest.sources.base import BadRecord, Pair, PairItem, Source, check_key, make_pair

NAME_RE = re.compile(r"^(?P<season>ROIs\d+_[A-Za-z]+)_(?P<sensor>s1|s2|lc|dfc)_(?P<scene>\d+)_p(?P<patch>\d+)\.tif$")


def _season_date(season: str) -> str | None:
    return season.split("_", 1)[1] if "_" in season else None


class SEN12MS(Source):
    """SEN12MS pairs: S1 and S2 L1C patches matched by (season, scene, patch).

    A scene is one region, so it is the location: its patches neighbour each other.
    """

    name = "sen12ms"
    required = ("s1", "s2")
    s2_bands = S2_L1C_BANDS

    def location(self, season: str, scene: str, key: str) -> str:
        """Return the place a patch shows, which a train/val split keeps together: its scene."""
        return f"{season}_{scene}"  # a scene is one region: its patches neighbour each other

    def split_of(self, season: str) -> str | None:
        """Return the split the dataset itself gives a season folder: none for SEN12MS."""
        return None

    def list(self, input_url: str) -> tuple[list[PairItem], list[BadRecord]]:
        """Group the input's tifs by (season, scene, patch); a group missing a required file is bad.

        Raises:
            FileNotFoundError: ``input_url`` does not exist.
        """
        fs, root = filesystem(input_url)
        if not fs.exists(root):
            raise FileNotFoundError(f"input {input_url} does not exist")
        proto = input_url.split("://", 1)[0] + "://" if "://" in input_url else ""
        groups: dict[tuple[str, str, str], dict[str, str]] = defaultdict(dict)
        for path in find_files(root, fs):  # concurrent listings on object stores
            m = NAME_RE.match(path.rsplit("/", 1)[-1])
            if m:
                groups[(m["season"], m["scene"], m["patch"])][m["sensor"]] = proto + path
        items, bad = [], []
        for (season, scene, patch), files in sorted(groups.items()):
            key = check_key(f"{season}_{scene}_p{patch}")
            missing = [r for r in self.required if r not in files]
            if missing:
                # name a partner that is there, S1 first: never the land cover (lc_ sorts first)
                present = next((files[r] for r in self.required if r in files), next(iter(files.values())))
                bad.append(BadRecord(key, present, f"missing partner: no {', '.join(missing)} file for this patch"))
                continue
            items.append(
                PairItem(
                    key=key,
                    location=self.location(season, scene, key),
                    files=tuple(sorted(files.items())),
                    split=self.split_of(season),
                )
            )
        return items, bad

    def estimate_bytes(self, item: PairItem) -> int:
        """Estimate from the S1 and S2 headers: float32 S1 plus uint16 S2 bands."""
        b1, h, w, _ = raster_shape(item.file("s1"))
        b2, _, _, _ = raster_shape(item.file("s2"))
        return h * w * (4 * b1 + 2 * b2) + 2048

    def read(self, item: PairItem) -> Iterator[Pair]:
        """Read the S1/S2 patch pair; the land-cover file is only referenced in the metadata."""
        s1 = read_raster(item.file("s1"))
        s2 = read_raster(item.file("s2"))
        season = item.key.rsplit("_", 2)[0]
        meta = {"source": self.name, "season": season, "date": _season_date(season)}
        pair = make_pair(item.key, item.location, s1, s2, self.s2_bands, meta)
        if item.file("lc"):  # not stored (labels are ignored for pretraining); only referenced
            pair.meta["lc_file"] = item.file("lc")
        yield pair


class DFC2020(SEN12MS):
    """DFC2020: SEN12MS layout under ROIs0000_validation / ROIs0000_test with a dfc_0 mask."""

    name = "dfc2020"
    required = ("s1", "s2", "dfc")

    def location(self, season: str, scene: str, key: str) -> str:
        """Return the patch key itself: every DFC2020 patch is its own location."""
        return key  # every DFC2020 patch comes from its own place (scene is always 0)

    def split_of(self, season: str) -> str | None:
        """Return the folder's split, ``validation`` or ``test``, from its season name."""
        return season.split("_", 1)[1] if "_" in season else None  # validation / test

    def read(self, item: PairItem) -> Iterator[Pair]:
        """Read the pair and its DFC mask, remapped, with single- and multi-label targets.

        Raises:
            BadInput: The mask is not one band or not on the pair's grid.
        """
        (pair,) = super().read(item)
        dfc = read_raster(item.file("dfc"))
        if dfc.data.shape[0] != 1:
            raise BadInput(dfc.path, f"wrong band count: DFC mask has 1 band, found {dfc.data.shape[0]}")
        grid = (pair.meta["crs"], tuple(round(v, 9) for v in pair.meta["transform"]), pair.s1.shape[1:])
        if dfc.grid != grid:
            raise BadInput(dfc.path, f"grid mismatch with partner {pair.meta['s1_file']}: mask grid {dfc.grid} vs {grid}")
        mask = dfc_remap(dfc.data[0])
        single, multi = dfc_targets(mask)
        pair.dfc = mask
        pair.extra = {"cls": single, "multi": multi}
        pair.meta.update({"dfc_file": dfc.path, "label": single, "multilabel": multi.tolist()})
        yield pair
