"""STAC listing for ``ingest.source=stac``: find S2 L2A and S1 items, pair them, build the scenes.

Item sources (``ingest.input``):

- a STAC API (``http(s)://...`` not ending in ``.json``), searched with pystac-client: S2 over
  the area (``bbox`` and/or ``intersects``) and ``datetime``; then S1 over the bounding box of
  the S2 footprints found and their time span widened by ``pair_days`` on both sides (with an
  open or no ``datetime`` a widened config interval would be unbounded). The cloud-cover limit
  goes to the server when it declares the query extension (``eo:cloud_cover lte``) or else the
  filter extension (CQL2 ``<=``); an API declaring neither gets no cloud parameter (rustac's
  memory backend answers an unknown ``query`` with no items at all, not with all of them).
- a stac-geoparquet item table (``*.parquet``), read with rustac;
- a static catalogue (``catalog.json``/``collection.json``, or a folder holding one), walked
  with pystac.

Every item, whatever its source, then passes the same local filter (collection, area,
datetime, cloud cover), so a server that ignores a parameter cannot let scenes through and the
three sources give the same scenes for the same items. ``max_items`` caps the S2 items that
pass it.

Per S2 item (a failing check makes it a :class:`BadRecord`, never a traceback):

- ``s2_assets``: the bands in the shard's order (``S2_L2A_BANDS``), each through
  ``ingest.stac.s2_assets`` (band -> asset key); ``scl`` through ``scl_asset`` (None if absent).
- the 10 m grid: ``proj:transform``/``proj:shape`` of the first 10 m band asset (B2, B3, B4, B8)
  that has them (Planetary Computer and Earth Search put them on assets), else the item's; the
  pixel must be 10 m, unrotated. CRS from ``proj:epsg``/``proj:code`` (asset, then item).
- ``grid``: ``s2:mgrs_tile``, else ``mgrs:utm_zone`` + ``mgrs:latitude_band`` +
  ``mgrs:grid_square``, else ``epsg<code>_x<origin x>_y<origin y>`` (S2 tiles keep their origin).
- ``s2_offset`` (DN added to every band), first rule that applies:

  1. ``earthsearch:boa_offset_applied`` true: the provider already removed the offset -> 0;
  2. the band assets' ``raster:bands[0]`` give ``offset`` and ``scale``: offset / scale
     (Earth Search: -0.1 / 0.0001 = -1000), the statement closest to the files' numbers;
  3. the processing baseline (``s2:processing_baseline``, ``processing:version`` or
     ``sentinel:processing_baseline``), compared as numbers: >= 04.00 -> -1000, else 0;
  4. none of these: refused (a wrong guess shifts every reflectance by 0.1).

Per S1 item: ``s1_assets`` through ``ingest.stac.s1_assets``; ``s1_units`` from
``ingest.stac.s1_units[<S1 collection>]``, and a collection missing there is a user error before
any search (linear power read as dB passes every type check). Pairing: :mod:`ingest.stac.pairing`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import shapely
from shapely.geometry import box, mapping, shape

from dsl.contracts.config import StacConfig
from dsl.contracts.errors import JobFailed, UserError
from dsl.contracts.shard_format import S1_BANDS, S2_L2A_BANDS
from ingest.records import BadRecord
from ingest.stac.pairing import item_geometries, item_time, pair_items, parse_time
from ingest.stac.scene import Scene

TEN_M_BANDS = ("B2", "B3", "B4", "B8")
BASELINE_KEYS = ("s2:processing_baseline", "processing:version", "sentinel:processing_baseline")
L2A_OFFSET = -1000.0
PAGE_SIZE = 250
_CLEAN = re.compile(r"[^A-Za-z0-9_\-]")
_EXTRA_S2 = ("eo:cloud_cover", "platform", "s2:mgrs_tile", "s2:processing_baseline",
             "earthsearch:boa_offset_applied")
_EXTRA_S1 = ("platform", "sat:orbit_state", "sat:relative_orbit", "sar:instrument_mode",
             "sar:polarizations")


class _Refused(ValueError):
    """An item is unusable; the message is its quarantine reason."""


def clean_id(raw: str) -> str:
    """``raw`` with every character outside [A-Za-z0-9_-] replaced by ``_`` (a key part)."""
    return _CLEAN.sub("_", raw)


def input_kind(input_url: str) -> str:
    """``api``, ``geoparquet`` or ``catalog``: how ``ingest.input`` is read.

    Raises:
        UserError: Neither of the three.
    """
    low = input_url.lower().rstrip("/")
    if low.endswith((".parquet", ".geoparquet")):
        return "geoparquet"
    if low.startswith(("http://", "https://")):
        return "catalog" if low.endswith(".json") else "api"
    p = Path(input_url)
    if p.suffix.lower() == ".json" and p.is_file():
        return "catalog"
    if p.is_dir() and any((p / n).is_file() for n in ("catalog.json", "collection.json")):
        return "catalog"
    raise UserError(f"ingest.input: {input_url} is not a STAC API URL (http(s)://...), a "
                    "stac-geoparquet table (*.parquet) or a static catalogue (catalog.json/collection.json)")


def parse_interval(text: str | None) -> tuple[datetime | None, datetime | None]:
    """``ingest.stac.datetime`` as inclusive UTC bounds (None: open).

    A date or a partial date (``2020``, ``2020-06``, ``2020-06-01``) covers its whole period, as
    STAC APIs read it; ``..`` or an empty side is open.

    Raises:
        UserError: Not a timestamp or an interval of two, or start after end.
    """
    if text is None or not text.strip():
        return None, None
    parts = text.strip().split("/")
    if len(parts) > 2:
        raise UserError(f"ingest.stac.datetime: {text!r} is not an RFC 3339 date or interval")
    try:
        if len(parts) == 1:
            start, end = _period(parts[0])
        else:
            start = None if parts[0] in ("", "..") else _period(parts[0])[0]
            end = None if parts[1] in ("", "..") else _period(parts[1])[1]
    except ValueError:
        raise UserError(f"ingest.stac.datetime: {text!r} is not an RFC 3339 date or interval "
                        "(e.g. 2020-06-01/2020-08-31)") from None
    if start is not None and end is not None and start > end:
        raise UserError(f"ingest.stac.datetime: {text!r} starts after it ends")
    return start, end


def _period(text: str) -> tuple[datetime, datetime]:
    """First and last instant of a year, month, day or a single timestamp."""
    t = text.strip()
    if re.fullmatch(r"\d{4}", t):
        y = int(t)
        return datetime(y, 1, 1, tzinfo=UTC), datetime(y + 1, 1, 1, tzinfo=UTC) - timedelta(microseconds=1)
    if re.fullmatch(r"\d{4}-\d{2}", t):
        y, m = map(int, t.split("-"))
        nxt = datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=UTC)
        return datetime(y, m, 1, tzinfo=UTC), nxt - timedelta(microseconds=1)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", t):
        d = datetime.fromisoformat(t).replace(tzinfo=UTC)
        return d, d + timedelta(days=1) - timedelta(microseconds=1)
    dt = parse_time(t)
    return dt, dt


def _rfc3339(dt: datetime | None) -> str:
    return ".." if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def load_area(cfg: StacConfig) -> shapely.Geometry | None:
    """The search area: ``bbox`` and ``intersects`` (both must hold), or None for everywhere.

    Raises:
        UserError: ``intersects`` is not readable GeoJSON, or the two do not meet.
    """
    area = None
    if cfg.bbox is not None:
        x0, y0, x1, y1 = cfg.bbox
        if y0 > y1 or not (-90 <= y0 <= 90 and -90 <= y1 <= 90):
            raise UserError(f"ingest.stac.bbox: {list(cfg.bbox)} is not min_lon, min_lat, max_lon, max_lat")
        # min_lon > max_lon: the box crosses the antimeridian (as the STAC spec allows)
        area = box(x0, y0, x1, y1) if x0 <= x1 else shapely.union(box(x0, y0, 180, y1), box(-180, y0, x1, y1))
    if cfg.intersects:
        geom = _read_geojson(cfg.intersects)
        area = geom if area is None else shapely.intersection(area, geom)
        if area.is_empty:
            raise UserError("ingest.stac.intersects: the geometry does not meet ingest.stac.bbox")
    return area


def _read_geojson(value: str) -> shapely.Geometry:
    src = value.strip()
    try:
        if not src.startswith("{"):
            if src.lower().startswith(("http://", "https://")):
                import requests  # noqa: PLC0415 - only for a geometry given by URL

                resp = requests.get(src, timeout=60)
                resp.raise_for_status()
                src = resp.text
            else:
                src = Path(src).read_text()
        doc = json.loads(src)
        if doc.get("type") == "FeatureCollection":
            geom = shapely.union_all([shape(f["geometry"]) for f in doc["features"]])
        else:
            geom = shape(doc["geometry"] if doc.get("type") == "Feature" else doc)
        geom = geom if geom.is_valid else shapely.make_valid(geom)
    except Exception as e:  # any unreadable geometry is the same user error
        raise UserError(f"ingest.stac.intersects: not a readable GeoJSON geometry ({_one_line(e)})") from None
    if geom.is_empty:
        raise UserError("ingest.stac.intersects: the geometry is empty")
    return geom


def check_config(cfg: StacConfig) -> None:
    """Refuse an ``ingest.stac`` section that cannot give correct scenes, before any search.

    Raises:
        UserError: Band maps incomplete, or the S1 collection's units not given.
    """
    missing = [b for b in S2_L2A_BANDS if b not in cfg.s2_assets]
    unknown = sorted(set(cfg.s2_assets) - set(S2_L2A_BANDS))
    if missing or unknown:
        raise UserError(f"ingest.stac.s2_assets: map exactly the bands {', '.join(S2_L2A_BANDS)} to asset "
                        f"keys (missing: {missing or 'none'}; unknown: {unknown or 'none'})")
    if sorted(cfg.s1_assets) != sorted(S1_BANDS):
        raise UserError(f"ingest.stac.s1_assets: map exactly {', '.join(S1_BANDS)} to asset keys, "
                        f"got {sorted(cfg.s1_assets)}")
    if cfg.s1_collection not in cfg.s1_units:
        raise UserError(f"ingest.stac.s1_units: no units for S1 collection {cfg.s1_collection!r}; set "
                        f"ingest.stac.s1_units.{cfg.s1_collection} to linear or db (not guessed)")


def search_params(collection: str, area: shapely.Geometry | None, bbox: tuple | None,
                  start: datetime | None, end: datetime | None, max_cloud: float | None,
                  conforms: set[str]) -> dict:
    """pystac-client ``Client.search`` arguments for one collection.

    Args:
        collection: The collection id.
        area: A geometry to send as ``intersects`` (wins over ``bbox``).
        bbox: A lon/lat box, when there is no geometry.
        start: Inclusive start, or None.
        end: Inclusive end, or None.
        max_cloud: The cloud-cover limit, or None for none.
        conforms: ``"query"``/``"filter"`` when the API declares those extensions.

    Returns:
        Keyword arguments for ``Client.search``.
    """
    params: dict = {"collections": [collection], "limit": PAGE_SIZE}
    if area is not None:
        params["intersects"] = mapping(area)
    elif bbox is not None:
        params["bbox"] = list(bbox)
    if start is not None or end is not None:
        params["datetime"] = f"{_rfc3339(start)}/{_rfc3339(end)}"
    if max_cloud is not None:
        if "query" in conforms:
            params["query"] = {"eo:cloud_cover": {"lte": max_cloud}}
        elif "filter" in conforms:
            params["filter"] = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, max_cloud]}
            params["filter_lang"] = "cql2-json"
    return params


def _matches(item: dict, collection: str, area: shapely.Geometry | None, start: datetime | None,
             end: datetime | None, max_cloud: float | None) -> bool:
    """The local filter every item passes, whatever its source (see the module docstring).

    An item whose datetime or geometry cannot be read passes (when its collection matches), so
    that the S2/S1 checks quarantine it with its reason instead of it vanishing silently.
    """
    if item.get("collection") != collection:
        return False
    props = item.get("properties") or {}
    if max_cloud is not None:
        cc = props.get("eo:cloud_cover")
        if not isinstance(cc, int | float) or isinstance(cc, bool) or cc > max_cloud:
            return False
    try:
        t = item_time(item)
    except ValueError:
        return True
    if (start is not None and t < start.timestamp()) or (end is not None and t > end.timestamp()):
        return False
    if area is not None:
        geoms, errors = item_geometries([item])
        if not errors[0] and not shapely.intersects(area, geoms[0]):
            return False
    return True


class _Source:
    """Where items come from; ``items`` yields one collection's items that pass the local filter."""

    def items(self, collection: str, area: shapely.Geometry | None, bbox: tuple | None,
              start: datetime | None, end: datetime | None, max_cloud: float | None) -> Iterator[dict]:
        raise NotImplementedError


class _ApiSource(_Source):
    def __init__(self, url: str, cfg: StacConfig):
        from pystac_client import Client, ConformanceClasses  # noqa: PLC0415 - only for an API input
        from pystac_client.stac_api_io import StacApiIO  # noqa: PLC0415
        from urllib3.util.retry import Retry  # noqa: PLC0415

        self.url = url
        retry = Retry(total=cfg.retries, backoff_factor=cfg.retry_backoff_s,
                      status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None)
        try:
            self.client = Client.open(url, stac_io=StacApiIO(max_retries=retry, timeout=120))
        except Exception as e:  # connection, HTTP or JSON errors all mean: no STAC API there
            raise UserError(f"ingest.input: cannot open the STAC API {url}: {_one_line(e)}") from None
        if not self.client.conforms_to(ConformanceClasses.ITEM_SEARCH):
            raise UserError(f"ingest.input: {url} is a STAC catalogue without item search; "
                            "give a STAC API with /search, a stac-geoparquet table or a static catalogue")
        self.conforms = {name for name, cls in (("query", ConformanceClasses.QUERY),
                                                 ("filter", ConformanceClasses.FILTER))
                         if self.client.conforms_to(cls)}

    def items(self, collection, area, bbox, start, end, max_cloud):
        params = search_params(collection, area, bbox, start, end, max_cloud, self.conforms)
        try:
            for item in self.client.search(**params).items_as_dicts():
                if _matches(item, collection, area if area is not None else _bbox_area(bbox), start, end,
                            max_cloud):
                    yield item
        except (UserError, JobFailed):
            raise
        except Exception as e:  # after the retries: the search cannot be completed
            raise JobFailed(f"STAC search of {collection} at {self.url} failed: {_one_line(e)}") from None


class _LocalSource(_Source):
    def __init__(self, items: list[dict]):
        self.all = items

    def items(self, collection, area, bbox, start, end, max_cloud):
        area = area if area is not None else _bbox_area(bbox)
        return (it for it in self.all if _matches(it, collection, area, start, end, max_cloud))


def _bbox_area(bbox: tuple | None) -> shapely.Geometry | None:
    return None if bbox is None else box(*bbox)


def _read_geoparquet(path: str) -> list[dict]:
    import rustac  # noqa: PLC0415 - only for a stac-geoparquet input

    try:
        doc = rustac.read_sync(path)
    except Exception as e:  # rustac raises its own error types for I/O and format problems
        raise UserError(f"ingest.input: cannot read stac-geoparquet {path}: {_one_line(e)}") from None
    return list(doc.get("features", []))


def _read_catalog(path: str) -> list[dict]:
    import pystac  # noqa: PLC0415 - only for a static catalogue input

    p = Path(path)
    if p.is_dir():
        p = next(p / n for n in ("catalog.json", "collection.json") if (p / n).is_file())
    href = str(p) if not path.lower().startswith(("http://", "https://")) else path
    items = []
    try:
        root = pystac.read_file(href)
        if not isinstance(root, pystac.Catalog):
            raise ValueError(f"a {type(root).__name__}, not a catalog or collection")
        for item in root.get_items(recursive=True):
            item.make_asset_hrefs_absolute()
            d = item.to_dict(include_self_link=True, transform_hrefs=False)
            parent = item.get_parent()
            if not d.get("collection") and isinstance(parent, pystac.Collection):
                d["collection"] = parent.id  # a static item may leave its collection implied
            items.append(d)
    except Exception as e:  # pystac raises many types for unreadable or malformed STAC
        raise UserError(f"ingest.input: cannot read the static catalogue {href}: {_one_line(e)}") from None
    return items


def _source(cfg: StacConfig, input_url: str) -> _Source:
    kind = input_kind(input_url)
    if kind == "api":
        return _ApiSource(input_url, cfg)
    return _LocalSource(_read_geoparquet(input_url) if kind == "geoparquet" else _read_catalog(input_url))


def search_scenes(cfg: StacConfig, input_url: str) -> tuple[list[Scene], list[BadRecord], dict]:
    """Search, check and pair: the scenes of one ``dsl ingest --source stac`` run.

    Args:
        cfg: The ``ingest.stac`` section.
        input_url: ``ingest.input``: STAC API URL, stac-geoparquet table or static catalogue.

    Returns:
        The paired scenes (sorted by S2 datetime, then id), the refused items, and counts:
        ``s2_found``, ``s1_found`` (items that passed the filters), ``s2_refused``,
        ``s1_refused``, ``refused`` (their sum), ``duplicates`` (repeated item ids, kept once),
        ``paired``, ``unpaired`` (valid S2 scenes without an S1 partner).

    Raises:
        UserError: A bad ``ingest.stac`` setting or an unreadable ``ingest.input``.
        JobFailed: The STAC API search failed after the retries.
    """
    check_config(cfg)
    area = load_area(cfg)
    start, end = parse_interval(cfg.datetime)
    source = _source(cfg, input_url)
    counts = dict.fromkeys(("s2_found", "s1_found", "s2_refused", "s1_refused", "refused", "duplicates",
                            "paired", "unpaired"), 0)
    bad: list[BadRecord] = []

    max_cloud = cfg.max_cloud_cover if cfg.max_cloud_cover < 100 else None
    s2_raw = _take(source.items(cfg.s2_collection, area, None, start, end, max_cloud), cfg.max_items)
    s2_items, s2_parts = [], []
    for item in _unique(s2_raw, counts):
        counts["s2_found"] += 1
        try:
            s2_parts.append(_s2_part(item, cfg))
            s2_items.append(item)
        except _Refused as e:
            bad.append(_bad(item, str(e)))
            counts["s2_refused"] += 1
    s2_ids = set()  # two raw ids that clean to one key: the later one is refused
    kept_items, kept_parts = [], []
    for item, part in zip(s2_items, s2_parts, strict=True):
        if part["s2_id"] in s2_ids:
            bad.append(_bad(item, f"id cleans to {part['s2_id']!r}, the key of another S2 item"))
            counts["s2_refused"] += 1
            continue
        s2_ids.add(part["s2_id"])
        kept_items.append(item)
        kept_parts.append(part)

    scenes: list[Scene] = []
    if kept_items:
        times = [item_time(it) for it in kept_items]
        geoms, _ = item_geometries(kept_items)
        pad = timedelta(days=cfg.pair_days)
        s1_start = datetime.fromtimestamp(min(times), UTC) - pad
        s1_end = datetime.fromtimestamp(max(times), UTC) + pad
        s1_bbox = tuple(float(v) for v in shapely.total_bounds(geoms))
        units = cfg.s1_units[cfg.s1_collection]
        s1_items, s1_parts = [], {}
        for item in _unique(source.items(cfg.s1_collection, None, s1_bbox, s1_start, s1_end, None), counts):
            counts["s1_found"] += 1
            try:
                s1_parts[id(item)] = _s1_part(item, cfg, units)
                s1_items.append(item)
            except _Refused as e:
                bad.append(_bad(item, str(e)))
                counts["s1_refused"] += 1
        pairs, unpaired = pair_items(kept_items, s1_items, cfg.pair_days)
        counts["unpaired"] = len(unpaired)
        part_of = {id(it): part for it, part in zip(kept_items, kept_parts, strict=True)}
        area_of = {id(it): g.area for it, g in zip(kept_items, geoms, strict=True)}
        for p in pairs:
            s2, s1 = dict(part_of[id(p.s2)]), dict(s1_parts[id(p.s1)])  # an S1 part may serve many
            extra = {**s2.pop("extra"), **s1.pop("extra"),
                     "s1_coverage": round(p.overlap / area_of[id(p.s2)], 6)}
            scenes.append(Scene(**s2, **s1, gap_days=p.gap_days, extra=extra))
    scenes.sort(key=lambda s: (s.s2_datetime, s.s2_id))
    counts["paired"] = len(scenes)
    counts["refused"] = counts["s2_refused"] + counts["s1_refused"]
    return scenes, bad, counts


def _take(items: Iterable[dict], limit: int | None) -> Iterator[dict]:
    """The first ``limit`` items (all with None), without asking the source for more."""
    for n, item in enumerate(items):
        if limit is not None and n >= limit:
            return
        yield item


def _unique(items: Iterable[dict], counts: dict) -> Iterator[dict]:
    """Items with an id seen before are dropped (an API page repeated, a table written twice)."""
    seen = set()
    for item in items:
        key = item.get("id")
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        yield item


def _bad(item: dict, reason: str) -> BadRecord:
    raw = str(item.get("id") or "<no id>")
    return BadRecord(key=raw, file=_self_href(item) or raw, reason=reason)


def _self_href(item: dict) -> str | None:
    for link in item.get("links") or []:
        if isinstance(link, dict) and link.get("rel") == "self" and link.get("href"):
            return str(link["href"])
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _common(item: dict, what: str) -> tuple[str, datetime]:
    """The item's raw id and acquisition time, or refused."""
    raw = item.get("id")
    if not isinstance(raw, str) or not raw:
        raise _Refused(f"{what} item without an id")
    value = (item.get("properties") or {}).get("datetime")
    try:
        when = parse_time(value)
    except (TypeError, ValueError):
        raise _Refused(f"{what} item: no readable properties.datetime ({value!r})") from None
    _, errors = item_geometries([item])
    if errors[0]:
        raise _Refused(f"{what} item: {errors[0]}")
    return raw, when


def _href(item: dict, key: str, what: str) -> str:
    asset = (item.get("assets") or {}).get(key)
    href = asset.get("href") if isinstance(asset, dict) else None
    if not isinstance(href, str) or not href:
        raise _Refused(f"{what}: no asset {key!r}")
    return href


def _s2_part(item: dict, cfg: StacConfig) -> dict:
    """The S2 half of a :class:`Scene`'s fields (plus ``extra``), or refused."""
    raw, when = _common(item, "S2")
    props = item.get("properties") or {}
    assets = {b: _href(item, cfg.s2_assets[b], f"S2 band {b}") for b in S2_L2A_BANDS}
    scl_asset = (item.get("assets") or {}).get(cfg.scl_asset)
    scl = scl_asset.get("href") if isinstance(scl_asset, dict) and scl_asset.get("href") else None
    crs, transform, shape_ = _grid(item, cfg)
    offset, rule = s2_offset(item, cfg)
    extra = {"s2_item_id": raw, "s2_collection": item.get("collection"), "s2_offset_rule": rule}
    extra.update({f"s2_{k}" if k == "platform" else k: props[k] for k in _EXTRA_S2 if k in props})
    return {"s2_id": clean_id(raw), "s2_datetime": _iso(when), "s2_assets": assets, "scl": scl,
            "s2_offset": offset, "crs": crs, "transform": transform, "shape": shape_,
            "grid": grid_id(item, crs, transform), "extra": extra}


def _s1_part(item: dict, cfg: StacConfig, units: str) -> dict:
    """The S1 half of a :class:`Scene`'s fields (plus ``extra``), or refused."""
    raw, when = _common(item, "S1")
    props = item.get("properties") or {}
    assets = {pol: _href(item, key, f"S1 polarisation {pol}") for pol, key in cfg.s1_assets.items()}
    extra = {"s1_item_id": raw}
    extra.update({f"s1_{k}" if k == "platform" else k: props[k] for k in _EXTRA_S1 if k in props})
    return {"s1_id": raw, "s1_datetime": _iso(when), "s1_assets": assets, "s1_units": units,
            "s1_collection": str(item.get("collection") or cfg.s1_collection), "extra": extra}


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _grid(item: dict, cfg: StacConfig) -> tuple[str, tuple, tuple]:
    """CRS, 10 m transform and shape from the projection extension (asset first, then item)."""
    props = item.get("properties") or {}
    assets = item.get("assets") or {}
    source = None
    for band in TEN_M_BANDS:
        asset = assets.get(cfg.s2_assets[band])
        if isinstance(asset, dict) and "proj:transform" in asset and "proj:shape" in asset:
            source = asset
            break
    if source is None:
        if "proj:transform" not in props or "proj:shape" not in props:
            raise _Refused("S2: no proj:transform/proj:shape on a 10 m band asset (B2, B3, B4, B8) or the item")
        source = props
    try:
        t = [float(v) for v in source["proj:transform"]][:6]
        h, w = (int(v) for v in source["proj:shape"])
    except (TypeError, ValueError):
        raise _Refused("S2: proj:transform/proj:shape are not numbers") from None
    if len(t) != 6 or h <= 0 or w <= 0:
        raise _Refused(f"S2: bad proj:transform {source['proj:transform']} or proj:shape {source['proj:shape']}")
    if abs(abs(t[0]) - 10) > 1e-6 or abs(abs(t[4]) - 10) > 1e-6 or t[1] != 0 or t[3] != 0:
        raise _Refused(f"S2: proj:transform {t} is not an unrotated 10 m grid")
    crs = None
    for where in (source, props):
        if where.get("proj:code"):
            crs = str(where["proj:code"])
        elif where.get("proj:epsg"):
            crs = f"EPSG:{int(where['proj:epsg'])}"
        if crs:
            break
    if crs is None:
        raise _Refused("S2: no proj:epsg or proj:code (the grid's CRS)")
    return crs, tuple(t), (h, w)


def grid_id(item: dict, crs: str, transform: tuple) -> str:
    """The place's date-independent id: the MGRS tile, else EPSG code and grid origin."""
    props = item.get("properties") or {}
    tile = props.get("s2:mgrs_tile")
    if not tile and all(props.get(k) is not None for k in ("mgrs:utm_zone", "mgrs:latitude_band",
                                                            "mgrs:grid_square")):
        tile = f"{int(props['mgrs:utm_zone']):02d}{props['mgrs:latitude_band']}{props['mgrs:grid_square']}"
    if tile:
        return clean_id(str(tile))
    code = re.sub(r"\D", "", crs) or clean_id(crs)
    return clean_id(f"epsg{code}_x{round(transform[2])}_y{round(transform[5])}")


def _baseline(text: object) -> tuple[int, int]:
    m = re.fullmatch(r"N?(\d{1,2})\.(\d{1,2})", str(text).strip()) or re.fullmatch(r"N?(\d{2})(\d{2})",
                                                                                 str(text).strip())
    if not m:
        raise _Refused(f"S2: processing baseline {text!r} is not a version like 04.00")
    return int(m.group(1)), int(m.group(2))


def s2_offset(item: dict, cfg: StacConfig) -> tuple[float, str]:
    """The DN offset to add to the S2 bands and the rule that decided it (module docstring).

    Raises:
        _Refused: No rule applies, or the bands' ``raster:bands`` offsets disagree.
    """
    props = item.get("properties") or {}
    if props.get("earthsearch:boa_offset_applied") is True:
        return 0.0, "earthsearch:boa_offset_applied"
    assets = item.get("assets") or {}
    found = set()
    for band in S2_L2A_BANDS:
        asset = assets.get(cfg.s2_assets[band]) or {}
        rb = asset.get("raster:bands") if isinstance(asset, dict) else None
        first = rb[0] if isinstance(rb, list) and rb and isinstance(rb[0], dict) else {}
        off, scale = first.get("offset"), first.get("scale")
        if isinstance(off, int | float) and isinstance(scale, int | float) and scale:
            found.add(round(off / scale))
    if len(found) > 1:
        raise _Refused(f"S2: the bands' raster:bands offsets differ ({sorted(found)} DN); one offset per scene")
    if found:
        return float(found.pop()) + 0.0, "raster:bands"
    for key in BASELINE_KEYS:
        if props.get(key) is not None:
            return (L2A_OFFSET if _baseline(props[key]) >= (4, 0) else 0.0), key
    raise _Refused("S2: no processing baseline and no raster:bands offset/scale: the L2A offset "
                   "(-1000 DN from baseline 04.00) cannot be told")

