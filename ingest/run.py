"""The ingest job: plan partitions, run them as Ray tasks, commit the manifest last.

Exactly once: the plan (each split's items in a seeded hash order, cut into fixed partitions) is
a pure function of the input and the options, and is pinned in ``_parts/plan.json``. Partition p
writes exactly one shard per split (on object stores under a hashed prefix) and then its sidecar
``_parts/<shard>.json``; the sidecar is the partition's commit marker. A rerun skips partitions
whose sidecar exists and redoes the rest, overwriting any half-written shard, so a killed run
resumed ends with the same samples as a clean run.

Partitions are cut by each item's own estimated bytes where the source estimates an item
without reading it (:meth:`Source.item_bytes`), else into a fixed number of items sized from
the first readable header. Planning, the plan id and the resume check are linear in the items
(``benchmarks/bench_plan.py``); the sidecars are read back by a pool of threads, one GET each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dsl.contracts.config import Config, ConfigError, IngestConfig
from dsl.contracts.errors import JobFailed
from dsl.contracts.manifest import Manifest
from dsl.contracts.provenance import code_version
from dsl.contracts.shard_format import (
    FORMAT_VERSION,
    MANIFEST,
    S1_BANDS,
    hashed_shard_path,
    shard_name,
)
from dsl.contracts.shard_index import scan_offsets, write_digests, write_index
from dsl.contracts.storage import check_url, filesystem, is_local, join
from ingest.raster import BadInput
from ingest.records import Skipped
from ingest.sources import BadRecord, PairItem, get_source
from ingest.stats import BandStats
from ingest.tiling import tile_pair
from ingest.writer import ShardWriter, sample_members, write_text_atomic

PARTS = "_parts"
SIDECAR_READERS = 32  # sidecars read at once when merging: each is one small GET on object stores


class IngestError(JobFailed):
    """The run cannot complete as asked (changed input, too many bad inputs ...)."""


@dataclass(frozen=True)
class Partition:
    """A fixed slice of the plan: the items that go into one shard of one split.

    Attributes:
        split: The split the items were assigned to, or None without splits.
        index: The shard's number within its split.
        items: The items, in the plan's scatter order (the order they are written in).
        hashed: The shard goes under a hashed prefix (:func:`hashed_shard_path`).
    """

    split: str | None
    index: int
    items: tuple[PairItem, ...]

    @property
    def shard(self) -> str:
        """The shard's file name; its sidecar is ``_parts/<shard>.json``.

        Sidecars stay flat even when the shard has a hashed prefix: one listing of ``_parts``
        finds every committed partition.
        """
        return shard_name(self._prefix, self.split, self.index)

    @property
    def path(self) -> str:
        """The shard's path under the output root (the manifest's ``ShardEntry.name``)."""
        return hashed_shard_path(self.shard) if self.hashed else self.shard

    _prefix: str = "pairs"
    hashed: bool = False


def assign_split(item: PairItem, val_fraction: float) -> str | None:
    """Deterministic by location: a location's hash decides, so no location is ever split."""
    if val_fraction <= 0:
        return item.split
    return _location_split(item.location, val_fraction)


def _location_split(location: str, val_fraction: float) -> str:
    h = int(hashlib.sha1(location.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def scatter_order(seed: int, key: str) -> str:
    """An item's place in the plan: sha1 of ``"<seed>:<key>"``, uniform and independent of the key."""
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def plan_partitions(items: Sequence[PairItem], per_shard: int | None, val_fraction: float, prefix: str,
                    seed: int = 0, hashed: bool = False, sizes: Sequence[int] | None = None,
                    shard_bytes: int | None = None) -> list[Partition]:
    """Cut each split's items, in seeded hash order, into partitions.

    A partition holds at most ``per_shard`` items or, given ``sizes`` (each item's estimated
    bytes, in ``items``' order), as many items in a row as fit in ``shard_bytes`` (at least one).

    In key order a shard would be one scene or region (keys start with the place), and a reader's
    shuffle buffer, which holds a few shards, would fill batches from a few places; in hash
    order every shard is a sample of the whole split. Items are never cut (all tiles of one
    item go to one shard), and the split stays by location (:func:`assign_split`). The result
    depends only on the items' keys (and sizes) and the options, not on the listing order, so a
    resumed run plans the same partitions (and shard names) as the interrupted one. Linear in
    the items but for one sort.
    """
    if sizes is not None and (len(sizes) != len(items) or not shard_bytes):
        raise ValueError("sizes needs one size per item and shard_bytes")
    # sha1 digests sort as their hex digests do; digest + UTF-8 key sorts as (hex, key) does
    keyed = [hashlib.sha1(f"{seed}:{it.key}".encode()).digest() + it.key.encode() for it in items]
    order = sorted(range(len(items)), key=keyed.__getitem__)
    del keyed
    if val_fraction <= 0:
        splits = [it.split for it in items]
    else:  # one hash per place, not per item
        split_of = {loc: _location_split(loc, val_fraction) for loc in {it.location for it in items}}
        splits = [split_of[it.location] for it in items]
    names = sorted(set(splits), key=lambda s: s or "")
    if len(names) > 1:  # a stable sort by split keeps the hash order within each
        rank = {s: r for r, s in enumerate(names)}
        ranks = [rank[s] for s in splits]
        order.sort(key=ranks.__getitem__)
        del ranks
    sizes_of, parts, at = Counter(splits), [], 0
    for split in names:
        group, at = order[at : at + sizes_of[split]], at + sizes_of[split]
        for index, (start, stop) in enumerate(_cuts(group, per_shard, sizes, shard_bytes)):
            parts.append(Partition(split, index, tuple(map(items.__getitem__, group[start:stop])), prefix, hashed))
    return parts


def _cuts(group: list[int], per_shard: int | None, sizes: Sequence[int] | None,
          shard_bytes: int | None) -> list[tuple[int, int]]:
    """[start, stop) of each partition of ``group`` (item indices in plan order)."""
    if sizes is None:
        return [(i, min(i + per_shard, len(group))) for i in range(0, len(group), per_shard)]
    cuts, start, total = [], 0, 0
    for i, j in enumerate(group):
        if total + sizes[j] > shard_bytes and i > start:  # full: the item opens the next one
            cuts.append((start, i))
            start, total = i, 0
        total += sizes[j]
    if start < len(group):
        cuts.append((start, len(group)))
    return cuts


def hashed_prefixes(cfg: IngestConfig) -> bool:
    """Whether shards go under hashed prefixes: as configured, by default on object stores only."""
    return not is_local(cfg.output) if cfg.hashed_prefixes is None else cfg.hashed_prefixes


def write_partition(cfg: IngestConfig, part: Partition) -> dict:
    """Read, validate and write one partition; returns (and commits) its sidecar."""
    t0 = time.perf_counter()
    source = get_source(cfg.source, cfg.tile_size, cfg)
    writer = ShardWriter(join(cfg.output, part.path))
    s1_stats = BandStats(len(S1_BANDS), integer=False)
    s2_stats, s2_bands, bad, keys = None, None, [], []
    skipped: Counter[str] = Counter()  # patches a source's filters leave out, by reason
    patch_min: list[int] | None = None  # [H, W] of the smallest sample: what a crop may not exceed
    try:
        for item in part.items:
            try:
                # all tiles of an item or none of them; a source that reads an item's patches
                # one by one (stac) reports each one that is not a pair as its own outcome
                outcomes = [t for p in source.read(item)
                            for t in ([p] if isinstance(p, (Skipped, BadRecord)) else tile_pair(p, cfg.tile_size))]
            except BadInput as e:
                bad.append(BadRecord(item.key, e.file, e.reason))
                continue
            except Skipped as e:
                skipped[e.reason] += 1
                continue
            for pair in outcomes:
                if isinstance(pair, Skipped):
                    skipped[pair.reason] += 1
                    continue
                if isinstance(pair, BadRecord):
                    bad.append(pair)
                    continue
                bands = pair.meta["s2_bands"]
                if s2_bands is None:
                    s2_bands, s2_stats = bands, BandStats(len(bands), integer=True)
                elif bands != s2_bands:
                    bad.append(BadRecord(pair.key, pair.meta["s2_file"], f"band set {bands} differs from {s2_bands}"))
                    continue
                writer.add(sample_members(pair, part.split, cfg.encoding))
                h, w = pair.s1.shape[-2:]
                patch_min = [int(h), int(w)] if patch_min is None or min(h, w) < min(patch_min) else patch_min
                s1_stats.update(pair.s1)
                s2_stats.update(pair.s2)
                keys.append(pair.key)
        shard = None
        if writer.count:
            shard = {"name": part.path, "split": part.split, **writer.commit()}
        else:
            writer.abort()
    except BaseException:
        writer.abort()
        raise
    finally:
        if hasattr(source, "close"):  # datasets a source holds open for the partition
            source.close()
    sidecar = {
        "partition": part.shard,
        "shard": shard,
        "keys": keys,
        "bad": [b.as_dict() for b in bad],
        "skipped": dict(sorted(skipped.items())),
        "items": len(part.items),
        "s2_bands": s2_bands,
        "patch_min": patch_min,
        "stats": {"s1": s1_stats.to_json(), "s2": s2_stats.to_json() if s2_stats else None},
    }
    write_text_atomic(join(cfg.output, PARTS, part.shard + ".json"), json.dumps(sidecar))
    return {"shard": part.shard, "samples": len(keys), "bad": len(bad), "skipped": sum(skipped.values()),
            "items": len(part.items), "seconds": time.perf_counter() - t0}


PROBE_ITEMS = 64  # headers tried for the shard size before the input is called unreadable


def items_per_shard(source, items: list[PairItem], shard_size_mb: float) -> int:
    """Items per partition, sized from the first item whose raster headers read.

    A broken file is quarantined by its partition like any other: it must not stop the run
    because it sorts first. The result depends only on the input, so a rerun plans the same.
    When no header reads at all, every item gets its own partition (and its quarantine line).

    Raises:
        IngestError: None of the first :data:`PROBE_ITEMS` items reads (of more than that):
            a wrong input, such as a table of garbage, would otherwise be read item by item
            (a task each) only to be quarantined whole.
    """
    first = None
    for item in items[:PROBE_ITEMS]:
        try:
            return max(1, int(shard_size_mb * 1e6 // source.estimate_bytes(item)))
        except BadInput as e:
            first = first or e
    if len(items) > PROBE_ITEMS:
        raise IngestError(f"none of the first {PROBE_ITEMS} of {len(items)} inputs reads (the first: {first}); "
                          "is --input the right dataset?")
    return 1


def item_sizes(source, items: Sequence[PairItem]) -> list[int] | None:
    """Each item's estimated bytes, where the source knows them without reading (else None).

    All or nothing: one item the source cannot size cheaply sends the whole plan back to
    :func:`items_per_shard`, so the sizing never depends on which items happen to come first.
    """
    sizes = []
    for it in items:
        size = source.item_bytes(it) if hasattr(source, "item_bytes") else None
        if size is None:
            return None
        sizes.append(max(0, int(size)))
    return sizes


def _plan_id(cfg: IngestConfig, items: Sequence[PairItem], per_shard: int | list[int],
             listing: str | None = None) -> str:
    """The plan's identity: options, sizing and every item, in listing order.

    ``per_shard`` is the items per partition, or (partitions cut by bytes) every partition's
    item count in plan order. ``listing`` is the digest of what a source's tasks read besides
    their items (the stac source's scene table); None for sources without one. Each item hashes as ``json.dumps(asdict(item), sort_keys=True)``
    did (the same bytes, written without ``asdict``'s deep copy): plans pinned by earlier runs
    are recognised.
    """
    h = hashlib.sha256()
    opts = {k: getattr(cfg, k) for k in (
        "source", "input", "prefix", "val_fraction", "tile_size", "shuffle_seed", "encoding")}
    opts["hashed_prefixes"] = hashed_prefixes(cfg)  # as resolved: None and True on S3 plan the same
    head = {"opts": opts, "per_shard": per_shard, "format": FORMAT_VERSION}
    if listing is not None:  # absent for the other sources: their pinned plans keep their ids
        head["listing"] = listing
        head["opts"]["stac"] = cfg.stac.model_dump(mode="json")
    h.update(json.dumps(head, sort_keys=True).encode())
    encode = json.JSONEncoder().encode
    chunk = 10_000  # one update per chunk: the hash of the concatenation is the same
    for i in range(0, len(items), chunk):
        # keys in sorted order, fields as asdict gives them (tuples encode as lists)
        h.update("".join(encode({"files": it.files, "index": it.index, "key": it.key, "location": it.location,
                                 "split": it.split}) for it in items[i : i + chunk]).encode())
    return h.hexdigest()


def _read_json(url: str) -> dict | None:
    """The JSON file at ``url``, or None when there is none: one GET, no existence check first."""
    fs, path = filesystem(url)
    try:
        # start=0: a ranged read is one GET (s3fs's whole-object read asks the size first, a HEAD)
        return json.loads(fs.cat_file(path, start=0))
    except FileNotFoundError:
        return None


def committed_sidecars(output: str) -> set[str]:
    """File names in ``<output>/_parts`` (one listing): the committed partitions' sidecars."""
    fs, root = filesystem(output)
    fs.invalidate_cache()  # object-store listings are cached per process; workers wrote since
    try:
        return {e.rsplit("/", 1)[-1] for e in fs.ls(join(root, PARTS), detail=False)}
    except FileNotFoundError:
        return set()


def pending(parts: list[Partition], committed: set[str]) -> tuple[list[Partition], int]:
    """The partitions without a sidecar in ``committed``, and the items of those with one."""
    todo, already = [], 0
    for p in parts:
        if p.shard + ".json" in committed:
            already += len(p.items)
        else:
            todo.append(p)
    return todo, already


def read_sidecars(output: str, parts: list[Partition], threads: int = SIDECAR_READERS):
    """Yield ``(partition, sidecar or None)`` in ``parts``' order, read by a pool of threads."""
    if not parts:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(threads, len(parts))))
    try:
        yield from zip(parts, pool.map(lambda p: _read_json(join(output, PARTS, p.shard + ".json")), parts),
                       strict=True)
    finally:  # a caller that stops early (a missing sidecar) need not wait for the other reads
        pool.shutdown(wait=True, cancel_futures=True)


def _run_tasks(cfg: IngestConfig, todo: list[Partition], total_items: int, already: int, listing_bad: int) -> float:
    """Run the partitions as Ray tasks, at most ``cfg.workers`` at once; returns task-seconds."""
    import ray
    from tqdm import tqdm

    from dsl.runtime.ray_start import init_ray  # the one runtime module ingest uses: Ray start/join

    init_ray(cfg.address, num_cpus=None if cfg.address else cfg.workers)
    task = ray.remote(num_cpus=1, max_retries=2)(write_partition)
    cfg_ref = ray.put(cfg)
    bar = tqdm(total=total_items, initial=already, unit="pair", disable=not cfg.progress, desc="ingest")
    bad, busy = listing_bad, 0.0
    bar.set_postfix(bad=bad)
    in_flight, queue = [], deque(todo)
    while queue or in_flight:
        while queue and len(in_flight) < cfg.workers:  # bounded in flight: memory stays flat
            in_flight.append(task.remote(cfg_ref, queue.popleft()))
        done, in_flight = ray.wait(in_flight, num_returns=1)
        for result in ray.get(done):
            bad += result["bad"]
            busy += result["seconds"]
            bar.update(result["items"])
            bar.set_postfix(bad=bad)
    bar.close()
    return busy


def ingest(cfg: IngestConfig) -> Manifest:
    """Run (or resume) an ingest; returns the manifest.

    Raises:
        IngestError: The input changed since an interrupted run, or too many inputs are bad
            (every valid shard is still committed; rerun with a higher --max-bad-fraction).
    """
    t0 = time.time()
    source = get_source(cfg.source, cfg.tile_size, cfg)
    items, listing_bad = source.list(cfg.input)
    if not items:
        raise IngestError(f"no pairs found under {cfg.input} for source '{cfg.source}' ({len(listing_bad)} bad)")
    sizes = item_sizes(source, items)
    per_shard = items_per_shard(source, items, cfg.shard_size_mb) if sizes is None else None
    parts = plan_partitions(items, per_shard, cfg.val_fraction, cfg.prefix, cfg.shuffle_seed, hashed_prefixes(cfg),
                            sizes=sizes, shard_bytes=int(cfg.shard_size_mb * 1e6))
    plan_id = _plan_id(cfg, items, per_shard if sizes is None else [len(p.items) for p in parts],
                       getattr(source, "listing_digest", lambda: None)())
    plan_url = join(cfg.output, PARTS, "plan.json")
    plan = _read_json(plan_url)
    if plan and plan["plan_id"] != plan_id:
        raise IngestError(
            f"{cfg.output} holds an ingest of a different input or options (plan {plan['plan_id'][:12]} "
            f"vs {plan_id[:12]}); write to a new output or delete it"
        )
    if hasattr(source, "write_listing"):  # what the tasks read besides their items (stac: the scenes)
        source.write_listing(cfg.output)
    if not plan:
        write_text_atomic(plan_url, json.dumps({"plan_id": plan_id, "partitions": [p.shard for p in parts]}))

    todo, already = pending(parts, committed_sidecars(cfg.output))
    task_seconds = 0.0
    if todo:
        task_seconds = _run_tasks(cfg, todo, len(items), already, len(listing_bad))
        filesystem(cfg.output)[0].invalidate_cache()

    # Merge sidecars (the committed truth) into the manifest.
    shards, bad, keys, skipped = [], [b.as_dict() for b in listing_bad], [], Counter()
    s1_stats = BandStats(len(S1_BANDS), integer=False)
    s2_stats, s2_bands, patch_min = None, None, None
    for p, side in read_sidecars(cfg.output, parts):
        if side is None:
            raise IngestError(f"partition {p.shard} has no sidecar after the run; rerun to resume")
        bad += side["bad"]
        keys += side["keys"]
        skipped.update(side.get("skipped", {}))  # sidecars written before skipping: none
        if side["shard"]:
            shards.append(side["shard"])
            s2_bands = s2_bands or side["s2_bands"]
            if side["s2_bands"] != s2_bands:
                raise IngestError(f"{p.shard}: S2 bands {side['s2_bands']} differ from {s2_bands} in other shards")
            low = side.get("patch_min")  # sidecars written before it have none: then unknown
            if low and (patch_min is None or min(low) < min(patch_min)):
                patch_min = low
            if p.split in (None, "train") or cfg.val_fraction == 0:
                try:
                    part_s1, part_s2 = (BandStats.from_json(side["stats"][k]) for k in ("s1", "s2"))
                except (ValueError, KeyError, TypeError) as e:
                    raise IngestError(f"{join(cfg.output, PARTS, p.shard + '.json')}: unreadable statistics ({e}); "
                                      "delete it and rerun to redo its partition") from None
                s1_stats.merge(part_s1)
                s2_stats = part_s2 if s2_stats is None else (s2_stats.merge(part_s2) or s2_stats)
    # The byte-offset index (format 2): the sidecars carry each shard's offsets (a sidecar from
    # before the index: read from the shard's headers), the manifest keeps only the index file's
    # name, size and digest.
    offsets = [s.pop("offsets", None) or scan_offsets(join(cfg.output, s["name"])) for s in shards]
    # Sample digests (what a loader checks each sample's bytes against): from the sidecars; one
    # written before digests existed leaves the dataset without them (its samples unchecked).
    digests = [s.pop("digests", None) for s in shards]
    if len(keys) != len(set(keys)):
        dup = sorted(k for k, n in Counter(keys).items() if n > 1)[:5]
        raise IngestError(f"duplicate sample keys across shards: {dup}")

    bad_lines = "".join(json.dumps(b, sort_keys=True) + "\n" for b in sorted(bad, key=lambda b: (b["key"], b["file"])))
    write_text_atomic(join(cfg.output, "quarantine.jsonl"), bad_lines)
    total = len(keys) + len(bad)
    bad_fraction = len(bad) / total if total else 0.0
    if bad_fraction > cfg.max_bad_fraction:
        raise IngestError(
            f"{len(bad)} of {total} inputs are bad ({bad_fraction:.1%} > --max-bad-fraction "
            f"{cfg.max_bad_fraction:.1%}); see {join(cfg.output, 'quarantine.jsonl')}. The {len(keys)} valid "
            "samples are committed in shards; rerun with a higher --max-bad-fraction to write the manifest"
        )

    index = write_index(cfg.output, offsets) if shards else None  # before the manifest commits it
    sample_digests = write_digests(cfg.output, digests) if shards and all(d is not None for d in digests) else None
    splits = {}
    for s in shards:
        splits.setdefault(s["split"] or "all", 0)
        splits[s["split"] or "all"] += s["samples"]
    manifest = Manifest.model_validate({
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "input": cfg.input,
        "options": cfg.model_dump(mode="json", exclude={"progress", "address", "workers"}),
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "plan_id": plan_id,
        "samples": len(keys),
        "samples_by_split": splits,
        "bad": len(bad),
        "skipped": dict(sorted(skipped.items())),
        "listing": getattr(source, "counts", None) or None,
        "quarantine": "quarantine.jsonl",
        "bands": {"s1": list(S1_BANDS), "s2": s2_bands},
        "stats_split": "train" if cfg.val_fraction > 0 else "all",
        "stats": {
            "s1": s1_stats.summary(list(S1_BANDS)),
            "s2": s2_stats.summary(s2_bands) if s2_stats else {},
        },
        "shards": shards,
        "seconds": round(time.time() - t0, 3),
        "task_seconds": round(task_seconds, 3),  # busy time of this run's partition tasks
        "index": index,
        "digests": sample_digests,
        "patch_min": patch_min,
    })
    write_text_atomic(join(cfg.output, MANIFEST), manifest.to_json())
    return manifest


def command(cfg: Config, args: argparse.Namespace) -> int:
    """``dsl ingest``: run the ingest of ``cfg.ingest`` and print what it wrote."""
    if not cfg.ingest.input:
        raise ConfigError("ingest.input is required (--input PATH_OR_URL)")
    # before anything is listed or written: "s3://" alone would become a local folder "s3:"
    check_url(cfg.ingest.input, "ingest.input")
    check_url(cfg.ingest.output, "ingest.output")
    m = ingest(cfg.ingest)
    print(f"wrote {m.samples} pairs in {len(m.shards)} shards ({m.samples_by_split}), {m.bad} quarantined, "
          f"to {cfg.ingest.output}")
    return 0
