"""``dsl promote``, ``dsl rollback`` and ``dsl export``: registry commands for ``dsl.cli``.

``dsl.cli`` calls :func:`add_parsers` on its subparsers; ``python -m dsl.registry.cli`` runs the
same three commands on their own.
"""

from __future__ import annotations

import argparse
import json
import sys

from dsl.config import ConfigError, load_config


def _print(out: dict) -> None:
    print(json.dumps(out, indent=1, default=str))


def _promote(args: argparse.Namespace) -> int:
    from dsl.registry.lock import LockTimeout
    from dsl.registry.promote import PromotionError, promote

    cfg = load_config(args.config, args.overrides)
    try:
        _print(promote(cfg.promote, cfg.mlflow.registered_model, cfg.mlflow.tracking_uri))
    except (PromotionError, LockTimeout) as e:
        print(f"dsl promote: error: {e}", file=sys.stderr)
        return 1
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from dsl.registry.lock import LockTimeout
    from dsl.registry.promote import PromotionError, rollback

    cfg = load_config(args.config, args.overrides)
    try:
        _print(rollback(cfg.promote, cfg.mlflow.registered_model, cfg.mlflow.tracking_uri))
    except (PromotionError, LockTimeout) as e:
        print(f"dsl rollback: error: {e}", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    from dsl.registry.export import export_backbone

    tracking_uri = args.tracking_uri or load_config(args.config).mlflow.tracking_uri
    try:
        meta = export_backbone(args.model, args.modality, args.out, tracking_uri)
    except ValueError as e:
        print(f"dsl export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {meta['arch']} ({meta['modality']}, in_chans={meta['in_chans']}, norm={meta['norm']}) "
          f"to {args.out}")
    return 0


def add_parsers(sub) -> None:
    """Register ``promote``, ``rollback`` and ``export`` on an argparse subparsers object."""
    p = sub.add_parser("promote", help="move the champion alias to the candidate if it passes the gate")
    p.add_argument("--config", default=None, help="YAML with promote: and mlflow: sections "
                   "(configs/promote/gate.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. promote.margin=0.01")
    p.set_defaults(func=_promote)

    r = sub.add_parser("rollback", help="give the champion alias back to its previous holder")
    r.add_argument("--config", default=None, help="YAML with promote: and mlflow: sections")
    r.add_argument("overrides", nargs="*", help="section.key=value overrides")
    r.set_defaults(func=_rollback)

    e = sub.add_parser("export", help="write a registered backbone as a timm state dict (safetensors)")
    e.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a folder")
    e.add_argument("--modality", required=True, choices=["s1", "s2"])
    e.add_argument("--out", required=True, help="FILE.safetensors; FILE.json is written beside it")
    e.add_argument("--tracking-uri", default=None, help="default: mlflow.tracking_uri of --config")
    e.add_argument("--config", default=None, help="YAML with an mlflow: section")
    e.set_defaults(func=_export)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsl", description=__doc__)
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"dsl {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
