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
