"""Which S1 scene goes with each S2 scene: the pairing policy, as pure functions on STAC item dicts.

Policy (one S1 partner per S2 scene; an S1 scene may partner several S2 scenes):

1. Candidates: S1 items whose footprint (``geometry``) overlaps the S2 footprint with a positive
   area (touching edges share no pixels) and whose acquisition (``properties.datetime``) is at
   most ``pair_days`` days before or after the S2 acquisition.
2. The closest in time wins. Gaps within :data:`TIE_SECONDS` of the smallest count as equal:
   the frames of one S1 orbit pass are seconds apart, so between them time says nothing and the
   frame covering more of the S2 tile is the better partner; distinct passes are >= ~12 h apart.
3. Ties: the larger area of intersection of the footprints (in the footprints' lon/lat degrees;
   only compared between candidates of one S2 scene, so the degrees' latitude scale cancels).
4. Still tied: the smaller S1 id, so the result never depends on the input order.

An S2 scene without a candidate is returned as unpaired (counted by the caller, not an error).

Cost: S2 scenes are grouped by time bucket (``pair_days`` wide); each bucket queries one shapely
STRtree of the S1 scenes of its own and its two neighbouring buckets, so every S1 scene is
indexed at most three times and no S2 x S1 product is ever formed. 20k x 20k scenes pair in
about a second.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import shapely
from shapely.geometry import shape

TIE_SECONDS = 3600.0
DAY_S = 86400.0
_FRACTION = re.compile(r"(\.\d{6})\d+")  # nanosecond fractions: fromisoformat takes 6 digits


@dataclass(frozen=True)
class Pair:
    """One S2 scene and its S1 partner.

    Attributes:
        s2: The S2 item dict.
        s1: The S1 item dict.
        gap_days: |S1 - S2| acquisition time in days.
        overlap: Area of the footprints' intersection (degrees squared).
    """

    s2: dict
    s1: dict
    gap_days: float
    overlap: float


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 / ISO 8601 timestamp to an aware UTC datetime (naive means UTC).

    Raises:
        ValueError: ``text`` is not a timestamp.
    """
    if not isinstance(text, str):
        raise ValueError(f"not a timestamp: {text!r}")
    dt = datetime.fromisoformat(_FRACTION.sub(r"\1", text.strip()))
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def item_time(item: dict) -> float:
    """The item's acquisition as POSIX seconds (``properties.datetime``).

    Raises:
        ValueError: No or an unparseable ``properties.datetime``.
    """
    value = (item.get("properties") or {}).get("datetime")
    if value is None:
        raise ValueError("no properties.datetime")
    return parse_time(value).timestamp()


def item_geometry(item: dict) -> shapely.Geometry:
    """The item's footprint as a valid shapely geometry of positive area.

    Raises:
        ValueError: No geometry, or one that is not an areal GeoJSON geometry.
    """
    geom, error = item_geometries([item])
    if error[0]:
        raise ValueError(error[0])
    return geom[0]


def item_geometries(items: Sequence[dict]) -> tuple[np.ndarray, list[str]]:
    """The items' footprints as shapely geometries, built in bulk.

    Plain polygons (one ring, the STAC footprints' usual form) are built by one vectorised call;
    the rest one by one. Invalid geometries are repaired (``make_valid``), as a self-touching
    footprint still says where the scene is.

    Returns:
        An object array of geometries (None where unusable) and, per item, "" or the reason it
        is unusable (no geometry, malformed, no area).
    """
    geoms = np.full(len(items), None, dtype=object)
    errors = [""] * len(items)
    rings, sizes, simple = [], [], []
    for k, item in enumerate(items):
        geo = item.get("geometry")
        if not isinstance(geo, dict) or not geo:
            errors[k] = "no geometry"
            continue
        coords = geo.get("coordinates")
        if geo.get("type") == "Polygon" and isinstance(coords, list) and len(coords) == 1:
            try:
                ring = np.asarray(coords[0], dtype=np.float64)
            except (TypeError, ValueError):
                ring = None
            if ring is not None and ring.ndim == 2 and ring.shape[0] >= 4 and ring.shape[1] in (2, 3):
                rings.append(ring[:, :2])
                sizes.append(ring.shape[0])
                simple.append(k)
                continue
        try:
            geoms[k] = shape(geo)
        except Exception as e:  # shapely raises several types for malformed GeoJSON
            errors[k] = f"bad geometry: {e}"
    if simple:
        ring_index = np.repeat(np.arange(len(simple)), sizes)
        lines = shapely.linearrings(np.concatenate(rings), indices=ring_index)
        geoms[simple] = shapely.polygons(lines)
    built = np.array([g is not None for g in geoms], dtype=bool)
    if built.any():
        invalid = built.copy()
        invalid[built] = ~shapely.is_valid(geoms[built])
        if invalid.any():
            geoms[invalid] = shapely.make_valid(geoms[invalid])
        area = np.zeros(len(items))
        area[built] = shapely.area(geoms[built])
        for k in np.flatnonzero(built & ~(area > 0)):
            geoms[k], errors[k] = None, "geometry has no area"
    return geoms, errors


def pair_items(
    s2_items: Sequence[dict], s1_items: Sequence[dict], pair_days: float
) -> tuple[list[Pair], list[dict]]:
    """Pair each S2 item with an S1 item by the module's policy.

    Args:
        s2_items: S2 item dicts with ``id``, ``geometry`` and ``properties.datetime``.
        s1_items: S1 item dicts, likewise.
        pair_days: Largest acquisition gap in days.

    Returns:
        The pairs (in the order of ``s2_items``) and the S2 items left without a partner.

    Raises:
        ValueError: An item has no usable datetime or geometry (the caller checks them first).
    """
    if pair_days <= 0:
        raise ValueError(f"pair_days must be > 0, got {pair_days}")
    if not s2_items:
        return [], []
    window = pair_days * DAY_S
    t2 = np.array([item_time(it) for it in s2_items], dtype=np.float64)
    g2 = _checked_geometries(s2_items)
    t1 = np.array([item_time(it) for it in s1_items], dtype=np.float64)
    g1 = _checked_geometries(s1_items)
    ids1 = [str(it.get("id", "")) for it in s1_items]
    order1 = np.argsort(t1, kind="stable")
    t1_sorted = t1[order1]

    best: dict[int, tuple[int, float]] = {}  # s2 index -> (s1 index, gap in seconds)
    bucket = np.floor(t2 / window).astype(np.int64)
    for b in np.unique(bucket):
        members = np.nonzero(bucket == b)[0]
        # every S2 time in [b*w, (b+1)*w) reaches S1 times in [(b-1)*w, (b+2)*w]
        lo = np.searchsorted(t1_sorted, (b - 1) * window, side="left")
        hi = np.searchsorted(t1_sorted, (b + 2) * window, side="right")
        if lo >= hi:
            continue
        cand1 = order1[lo:hi]
        tree = shapely.STRtree(g1[cand1])
        q2, q1 = tree.query(g2[members], predicate="intersects")
        if q2.size == 0:
            continue
        i2, i1 = members[q2], cand1[q1]
        gaps = np.abs(t1[i1] - t2[i2])
        # within the window, and sharing interior (intersecting but not only touching)
        keep = gaps <= window
        keep[keep] = ~shapely.touches(g2[i2[keep]], g1[i1[keep]])
        if keep.any():
            _choose(best, i2[keep], i1[keep], gaps[keep], g2, g1, ids1)

    chosen = sorted(best)
    partner = np.array([best[k][0] for k in chosen], dtype=np.int64)
    areas = shapely.area(shapely.intersection(g2[chosen], g1[partner])) if chosen else []
    pairs, unpaired = [], []
    area_of = dict(zip(chosen, areas, strict=True))
    for k, item in enumerate(s2_items):
        if k in best:
            j, gap = best[k]
            pairs.append(Pair(s2=item, s1=s1_items[j], gap_days=gap / DAY_S, overlap=float(area_of[k])))
        else:
            unpaired.append(item)
    return pairs, unpaired


def _checked_geometries(items: Sequence[dict]) -> np.ndarray:
    geoms, errors = item_geometries(items)
    for item, error in zip(items, errors, strict=True):
        if error:
            raise ValueError(f"item {item.get('id')!r}: {error}")
    return geoms


def _choose(best: dict, i2: np.ndarray, i1: np.ndarray, gaps: np.ndarray, g2: np.ndarray,
            g1: np.ndarray, ids1: list[str]) -> None:
    """Keep, per S2 index, the candidate the policy prefers (see the module docstring).

    Overlap areas are computed only for S2 scenes with tied candidates, the rare case.
    """
    order = np.lexsort((gaps, i2))  # by S2 index, then gap
    i2, i1, gaps = i2[order], i1[order], gaps[order]
    starts = np.flatnonzero(np.r_[True, i2[1:] != i2[:-1]])
    ends = np.r_[starts[1:], i2.size]
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        k = int(i2[s])
        if e - s == 1 or gaps[s + 1] > gaps[s] + TIE_SECONDS:
            best[k] = (int(i1[s]), float(gaps[s]))
            continue
        tied = np.arange(s, e)[gaps[s:e] <= gaps[s] + TIE_SECONDS]
        areas = shapely.area(shapely.intersection(g2[k], g1[i1[tied]]))
        m = min(range(tied.size), key=lambda n: (-areas[n], ids1[i1[tied[n]]]))
        best[k] = (int(i1[tied[m]]), float(gaps[tied[m]]))
