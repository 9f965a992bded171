"""The ``dsl`` command: synth, ingest, pretrain, finetune, evaluate, promote ..."""

from __future__ import annotations

import argparse
import json
import sys

from dsl.config import ConfigError, load_config


def _ingest(args: argparse.Namespace) -> int:
    from ingest.run import IngestError, ingest

    flags = {
        "source": args.source, "input": args.input, "output": args.output, "workers": args.workers,
        "address": args.address, "shard_size_mb": args.shard_size_mb, "max_bad_fraction": args.max_bad_fraction,
        "prefix": args.prefix, "val_fraction": args.val_fraction, "tile_size": args.tile_size,
    }
    # JSON values are valid YAML, so paths and URLs stay strings through the override parser
    overrides = [f"ingest.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    if args.no_progress:
        overrides.append("ingest.progress=false")
    cfg = load_config(args.config, overrides + args.overrides).ingest
    if not cfg.input:
        raise ConfigError("ingest.input is required (--input PATH_OR_URL)")
    try:
        manifest = ingest(cfg)
    except (IngestError, FileNotFoundError, ValueError) as e:
        print(f"dsl ingest: error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {manifest['samples']} pairs in {len(manifest['shards'])} shards "
        f"({manifest['samples_by_split']}), {manifest['bad']} quarantined, to {cfg.output}"
    )
    return 0


def _synth(args: argparse.Namespace) -> int:
    from ingest.synth import synthesise

    n = synthesise(args.out, args.layout, args.locations, args.seed, args.size)
    print(f"wrote {n} synthetic {args.layout} locations to {args.out}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from dsl.train.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    out = pretrain(cfg)
    print(json.dumps({k: out[k] for k in ("run_id", "job", "step", "model_version", "checkpoint") if k in out}, indent=1, default=str))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from cluster import jobs

    sid = jobs.submit(args.address, _dsl_args(args.command_line), submission_id=args.id, ship_code=not args.no_ship_code)
    print(f"submitted {sid} to {args.address}")
    if not args.wait:
        return 0
    final = jobs.wait(args.address, sid)
    print(jobs.logs(args.address, sid)[-4000:])
    print(f"{sid}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def _schedule(args: argparse.Namespace) -> int:
    from cluster.schedule import run_schedule

    run_schedule(args.address, args.name, _dsl_args(args.command_line), _seconds(args.every),
                 max_runs=args.max_runs, ship_code=not args.no_ship_code)
    return 0


def _dsl_args(rest: list[str]) -> list[str]:
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if not rest:
        raise ConfigError("give the dsl command to run after --, e.g. -- pretrain --config configs/pretrain/paper.yaml")
    return rest


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise ConfigError(f"--every {text!r} is not a duration like 30s, 15m, 6h or 1d") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic SEN12MS/DFC2020 GeoTIFF tree")
    s.add_argument("--out", required=True)
    s.add_argument("--layout", choices=["sen12ms", "dfc2020"], default="sen12ms")
    s.add_argument("--locations", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=256, help="patch size in pixels")
    s.set_defaults(func=_synth)

    i = sub.add_parser("ingest", help="raw pairs -> WebDataset shards + manifest.json")
    i.add_argument("--config", default=None, help="YAML with an ingest: section")
    i.add_argument("--source", choices=["sen12ms", "dfc2020", "bigearthnet", "zarr", "manifest"])
    i.add_argument("--input", help="path or URL of the input tree / zarr group / manifest file")
    i.add_argument("--output", help="local folder, file:// or s3:// URL for the shards")
    i.add_argument("--workers", type=int, help="Ray tasks at once")
    i.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    i.add_argument("--shard-size-mb", type=float)
    i.add_argument("--max-bad-fraction", type=float)
    i.add_argument("--prefix")
    i.add_argument("--val-fraction", type=float, help="hold out this fraction of locations as split 'val'")
    i.add_argument("--tile-size", type=int)
    i.add_argument("--no-progress", action="store_true")
    i.add_argument("overrides", nargs="*", help="ingest.key=value overrides")
    i.set_defaults(func=_ingest)

    t = sub.add_parser("pretrain", help="Dual-SimCLR pretraining on Ray Train + DeepSpeed")
    t.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.set_defaults(func=_pretrain)

    j = sub.add_parser("submit", help="run a dsl command on a Ray cluster (Jobs API)")
    j.add_argument("--address", required=True, help="the cluster's dashboard URL, e.g. http://head:8265")
    j.add_argument("--id", help="submission id (idempotency key)")
    j.add_argument("--no-ship-code", action="store_true", help="the cluster already has DSL installed")
    j.add_argument("--wait", action="store_true", help="block until the job ends; exit 1 unless it succeeded")
    j.add_argument("command_line", nargs=argparse.REMAINDER, help="-- <dsl command and its arguments>")
    j.set_defaults(func=_submit)

    c = sub.add_parser("schedule", help="submit a dsl command to a Ray cluster on a fixed schedule")
    c.add_argument("--address", required=True)
    c.add_argument("--name", required=True, help="schedule name: submission ids are <name>-<slot>")
    c.add_argument("--every", required=True, help="interval: 30s, 15m, 6h, 1d")
    c.add_argument("--max-runs", type=int, help="stop after this many submissions")
    c.add_argument("--no-ship-code", action="store_true")
    c.add_argument("command_line", nargs=argparse.REMAINDER, help="-- <dsl command and its arguments>")
    c.set_defaults(func=_schedule)

    from dsl.finetune.cli import add_parsers as finetune_parsers
    from dsl.registry.cli import add_parsers as registry_parsers

    finetune_parsers(sub)  # finetune, evaluate
    registry_parsers(sub)  # promote, rollback, export
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"dsl {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
