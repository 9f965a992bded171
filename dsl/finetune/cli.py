"""``dsl finetune`` and ``dsl evaluate``; :func:`add_parsers` registers them on ``dsl``'s parser."""

from __future__ import annotations

import argparse
import json
import sys

from dsl.config import load_config


def _finetune(args: argparse.Namespace) -> int:
    from dsl.finetune.runner import finetune

    cfg = load_config(args.config, args.overrides)  # a ConfigError is reported by dsl's main
    try:
        out = finetune(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"dsl finetune: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from dsl.finetune.evaluate import evaluate

    cfg = load_config(args.config, args.overrides)  # a ConfigError is reported by dsl's main
    try:
        out = evaluate(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"dsl evaluate: error: {e}", file=sys.stderr)
        return 1
    print(out["table"])
    print(f"MLflow run {out['run_id']} ({len(out['results'])} fine-tuning runs)")
    for path in out["paths"].values():
        print(path)
    return 0


def add_parsers(subparsers) -> None:
    """Add the ``finetune`` and ``evaluate`` subcommands to ``dsl``'s subparsers."""
    f = subparsers.add_parser("finetune", help="fine-tune a registered backbone (or a scratch baseline) "
                              "on a label fraction, test it, log to MLflow")
    f.add_argument("--config", required=True, help="configs/finetune/<name>.yaml")
    f.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. finetune.label_fraction=0.5")
    f.set_defaults(func=_finetune)
    e = subparsers.add_parser("evaluate", help="methods x label fractions x seeds: results table and "
                              "label-fraction plot")
    e.add_argument("--config", required=True, help="configs/evaluate/<name>.yaml")
    e.add_argument("overrides", nargs="*", help="section.key=value overrides")
    e.set_defaults(func=_evaluate)
