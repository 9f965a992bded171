"""The ``dsl`` command: one table of subcommands, one way to load config and to fail.

Every subcommand is declared once in :data:`COMMANDS`: its help, the config sections it reads,
its flags (most of them shorthands for a config key) and the function that runs it, named as
``"module:function"`` and imported only when that command runs. So ``dsl --help`` imports
neither torch nor Ray, and this face is the only place that reaches both sides of the project
(``ingest`` and ``cluster`` on one side, the training jobs on the other) without either side
importing the other.

Shared by every command:

- config: ``--config FILE`` (YAML, any subset of the tree), then the flags, then positional
  ``section.key=value`` overrides, validated as one tree (:mod:`dsl.contracts.config`); an
  override of a section the command does not read is an error;
- exits: 0 done; 2 bad input (a config key, a path, a file's content: one line naming it, no
  traceback); 1 the job ran and failed (:class:`~dsl.contracts.errors.JobFailed`). Set
  ``DSL_TRACEBACK=1`` to see the traceback of a reported error too.

A command function has the signature ``run(cfg: Config, args: argparse.Namespace) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsl.contracts.config import Config, ConfigError, load_config
from dsl.contracts.errors import JobFailed

PIPELINE = ("data", "model", "loss", "optim", "deepspeed", "scale", "mlflow")
FINETUNE = ("data", "model", "deepspeed", "scale", "mlflow", "finetune")


@dataclass(frozen=True)
class Flag:
    """One command-line flag.

    Args:
        names: As argparse takes them (``"--input"``, or a positional name).
        key: The config key it sets (``"ingest.input"``); None: passed to the command as-is.
        options: argparse keyword arguments (type, choices, action, default, required ...).
    """

    names: tuple[str, ...]
    help: str = ""
    key: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """One ``dsl`` subcommand.

    Args:
        name: ``dsl <name>``.
        help: One line for ``dsl --help``.
        run: ``"module:function"`` that runs it, imported when it runs.
        sections: Config sections it reads; () for a command without config.
        config: ``required``, ``optional`` or a default file; ignored without sections.
        flags: Its flags.
    """

    name: str
    help: str
    run: str
    sections: tuple[str, ...] = ()
    config: str = "optional"
    flags: tuple[Flag, ...] = ()


def _f(*names: str, key: str | None = None, help: str = "", **options: Any) -> Flag:
    return Flag(tuple(names), help, key, options)


_REMAINDER = _f("command_line", nargs=argparse.REMAINDER, help="-- <dsl command and its arguments>")

COMMANDS: tuple[Command, ...] = (
    Command("synth", "write a synthetic SEN12MS/DFC2020 GeoTIFF tree", "ingest.synth:command", flags=(
        _f("--out", required=True),
        _f("--layout", choices=["sen12ms", "dfc2020"], default="sen12ms"),
        _f("--locations", type=int, default=64),
        _f("--seed", type=int, default=0),
        _f("--size", type=int, default=256, help="patch size in pixels"),
    )),
    Command("ingest", "raw pairs -> WebDataset shards + manifest.json", "ingest.run:command", ("ingest",), flags=(
        _f("--source", key="ingest.source", choices=["sen12ms", "dfc2020", "bigearthnet", "zarr", "table",
                                                    "manifest", "stac"]),
        _f("--input", key="ingest.input", help="path or URL of the input tree / zarr group / pair table; "
           "stac: a STAC API URL, a stac-geoparquet table or a static catalogue"),
        _f("--output", key="ingest.output", help="local folder, file:// or s3:// URL for the shards"),
        _f("--workers", key="ingest.workers", type=int, help="Ray tasks at once"),
        _f("--address", key="ingest.address", help="Ray cluster address (default: a local Ray)"),
        _f("--shard-size-mb", key="ingest.shard_size_mb", type=float),
        _f("--max-bad-fraction", key="ingest.max_bad_fraction", type=float),
        _f("--prefix", key="ingest.prefix"),
        _f("--val-fraction", key="ingest.val_fraction", type=float,
           help="hold out this fraction of locations as split 'val'"),
        _f("--tile-size", key="ingest.tile_size", type=int),
        _f("--no-progress", key="ingest.progress", action="store_false", default=None),
    )),
    Command("pretrain", "Dual-SimCLR pretraining on Ray Train + DeepSpeed", "dsl.train.pretrain:command",
            PIPELINE, "required"),
    Command("finetune", "fine-tune a registered backbone (or a scratch baseline) on a label fraction, test "
            "it, log to MLflow", "dsl.finetune.runner:command", FINETUNE, "required"),
    Command("evaluate", "methods x label fractions x seeds: results table and label-fraction plot",
            "dsl.evaluate.grid:command", (*FINETUNE, "evaluate"), "required"),
    Command("promote", "move the champion alias to the candidate if it passes the gate",
            "dsl.registry.promote:promote_command", ("promote", "mlflow")),
    Command("rollback", "give the champion alias back to its previous holder",
            "dsl.registry.promote:rollback_command", ("promote", "mlflow")),
    Command("export", "write a registered backbone as a timm state dict (safetensors)",
            "dsl.registry.export:command", ("mlflow",), flags=(
                _f("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a folder"),
                _f("--modality", required=True, choices=["s1", "s2"]),
                _f("--out", required=True, help="FILE.safetensors; FILE.json is written beside it"),
                _f("--tracking-uri", key="mlflow.tracking_uri", help="default: mlflow.tracking_uri of --config"),
            )),
    Command("submit", "run a dsl command on a Ray cluster (Jobs API)", "cluster.jobs:command", flags=(
        _f("--address", required=True, help="the cluster's dashboard URL, e.g. http://head:8265"),
        _f("--id", help="submission id (idempotency key)"),
        _f("--no-ship-code", action="store_true", help="the cluster already has DSL installed"),
        _f("--wait", action="store_true", help="stream its logs until it ends; exit 0 succeeded, 1 failed, 130 stopped"),
        _REMAINDER,
    )),
    Command("jobs", "the Ray cluster's jobs: list them, show one's status or logs, stop one",
            "cluster.jobs:jobs_command", flags=(
                _f("action", choices=["list", "status", "logs", "stop"]),
                _f("id", nargs="?", help="submission id (status, logs, stop)"),
                _f("--address", required=True, help="the cluster's dashboard URL, e.g. http://head:8265"),
                _f("--follow", action="store_true",
                   help="logs: stream them until the job ends; exit 0 succeeded, 1 failed, 130 stopped"),
            )),
    Command("schedule", "submit a dsl command to a Ray cluster on a fixed schedule", "cluster.schedule:command",
            flags=(
                _f("--address", required=True),
                _f("--name", required=True, help="schedule name: submission ids are <name>-<slot>"),
                _f("--every", required=True, help="interval: 30s, 15m, 6h, 1d"),
                _f("--max-runs", type=int, help="stop after this many submissions"),
                _f("--no-ship-code", action="store_true"),
                _REMAINDER,
            )),
    Command("pipeline", "run a pipeline's stages for one slot, each stage once (recorded in MLflow)",
            "dsl.pipeline:command", flags=(
                _f("action", choices=["run"]),
                _f("name", help="configs/pipelines/<name>.yaml, or the path of a pipeline file"),
                _f("--slot", help="slot id (default: today's UTC date); submit it as --id pipeline-<name>-<slot>"),
                _f("--tracking-uri", help="MLflow store of the slot records (default: the file's tracking_uri)"),
            )),
    Command("cluster", "render KubeRay and `ray up` cluster definitions from the cluster config section",
            "cluster.render:command", ("cluster",), flags=(
                _f("action", choices=["render"], help="what to do: render a definition"),
                _f("--kind", required=True, choices=["raycluster", "rayjob", "raycronjob", "launcher"],
                   help="raycluster, rayjob, raycronjob (KubeRay) or launcher (`ray up` config)"),
                _f("--out", help="write the YAML here instead of stdout"),
            )),
    Command("demo", "the whole pipeline on embedded defaults (what `make demo` runs)", "dsl.demo:command", flags=(
        _f("--work", default="work", help="folder for data, shards, runs and the MLflow store"),
        _f("--locations", type=int, default=2048, help="synthetic unlabelled locations"),
        _f("--labelled", type=int, default=800, help="synthetic labelled DFC2020-layout locations"),
    )),
)
BY_NAME = {c.name: c for c in COMMANDS}


def resolve(target: str) -> Callable:
    """The function a ``"module:function"`` target names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    """``dsl``'s argument parser, built from :data:`COMMANDS`."""
    p = argparse.ArgumentParser(prog="dsl", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        reads = f"Config sections: {', '.join(c.sections)}." if c.sections else ""
        s = sub.add_parser(c.name, help=c.help, description=f"{c.help}. {reads}".strip())
        if c.sections:
            s.add_argument("--config", required=c.config == "required",
                           default=None if c.config in ("required", "optional") else c.config,
                           help=f"YAML with {', '.join(c.sections)} sections")
        for f in c.flags:
            s.add_argument(*f.names, help=f.help, **({"dest": _dest(f)} if f.key and f.names[0].startswith("-")
                                                      else {}), **f.options)
        if c.sections:
            s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


def _dest(flag: Flag) -> str:
    return "flag:" + flag.key


def _overrides(command: Command, args: argparse.Namespace) -> list[str]:
    """The flags' config keys, then the positional overrides, as ``key=value`` strings."""
    out = []
    for f in command.flags:
        value = getattr(args, _dest(f), None) if f.key else None
        if value is not None:
            # JSON values are valid YAML, so paths and URLs stay strings through the override parser
            out.append(f"{f.key}={json.dumps(value)}")
    for text in args.overrides:
        section = text.split("=", 1)[0].split(".", 1)[0]
        if "=" in text and section not in command.sections:
            raise ConfigError(f"override '{text}': dsl {command.name} does not read section '{section}' "
                              f"(it reads {', '.join(command.sections)})")
        out.append(text)
    return out


def load(command: Command, args: argparse.Namespace) -> Config:
    """The config tree ``command`` runs with (defaults when it reads no sections)."""
    if not command.sections:
        return Config()
    return load_config(args.config, _overrides(command, args))


def _fail(name: str, kind: str, e: BaseException, code: int) -> int:
    print(f"dsl {name}: {kind}: {e}", file=sys.stderr)
    if os.environ.get("DSL_TRACEBACK"):
        traceback.print_exception(e)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run ``dsl <argv>``; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    extra = _late_positionals(BY_NAME[args.command], args, extra)
    # argparse hands out a run of positionals at once: in `cluster render --kind K a.b=1`, "render"
    # and an empty overrides list match together and a.b=1 is left over; it is an override
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    command = BY_NAME[args.command]
    try:
        cfg = load(command, args)
        return int(resolve(command.run)(cfg, args) or 0)
    except Exception as e:
        cause = _cause(e)
        if isinstance(cause, ConfigError):
            return _fail(command.name, "config error", cause, 2)
        if isinstance(cause, (JobFailed, TimeoutError)):
            return _fail(command.name, "error", cause, 1)
        if isinstance(cause, (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError)):
            return _fail(command.name, "error", cause, 2)
        raise  # not an input or a job failure: a bug, whose traceback is wanted


def _late_positionals(command: Command, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """Give an optional positional left empty the first word left over; the rest of ``extra``.

    argparse matches positionals in runs between options, so in ``dsl jobs status --address A
    ID`` the optional ``id`` is matched (empty) together with ``status`` and ``ID`` is left over.
    """
    for f in command.flags:
        if f.names[0].startswith("-") or f.options.get("nargs") != "?" or getattr(args, f.names[0]) is not None:
            continue
        word = next((e for e in extra if not e.startswith("-") and "=" not in e), None)
        if word is not None:
            setattr(args, f.names[0], word)
            extra = [*extra]
            extra.remove(word)
    return extra


def _cause(e: BaseException) -> BaseException:
    """The error to report: a Ray task's own error, an unreachable store as one line.

    Ray re-raises a task's error as ``RayTaskError(<its type>)``, an instance of both whose
    text is the remote traceback; its ``cause`` is the task's error itself. Checked by name,
    so the CLI never imports Ray.
    """
    seen = 0
    while type(e).__name__.startswith("RayTaskError") and getattr(e, "cause", None) is not None and seen < 10:
        e, seen = e.cause, seen + 1
    from dsl.contracts.storage import storage_error  # fsspec only: no s3fs, no Ray

    return storage_error(e) or e


if __name__ == "__main__":
    sys.exit(main())
