"""``dsl finetune``: the driver.

Pins the backbone version, selects the label fraction, creates the MLflow runs (with lineage
tags) and runs the cells on the Ray TorchTrainer + DeepSpeed engine that pretraining uses.

MLflow contract of a fine-tuning run (read by ``dsl promote`` and ``dsl evaluate``):

- tags ``dsl.kind`` = ``finetune``, ``dsl.method`` (dual, s1, s2, early_fusion, late_fusion),
  ``dsl.method_name`` (the evaluation grid's label), ``dsl.mode``, ``dsl.task``,
  ``dsl.label_fraction`` (``str(float)``), ``dsl.seed``, ``dsl.backbone_uri`` (as given, or
  ``scratch``) and, for registered backbones, ``dsl.backbone_name``, ``dsl.backbone_version``
  (aliases resolved when the run starts) and ``dsl.backbone_run_id`` (the pretraining run);
  ``dsl.train_samples`` (labels used), ``dsl.manifest_url``/``dsl.manifest_sha256`` of the
  labelled shards; ``mlflow.parentRunId`` inside an evaluation;
- metrics ``test_average_accuracy``, ``test_overall_accuracy``, ``test_macro_f1``,
  ``test_micro_f1``, ``test_f1_<class>``, ``test_samples``, ``train_loss`` per epoch,
  ``train_samples``, ``train_steps``, ``train_seconds``;
- artifacts ``selection.json`` (the selected keys) and ``test/per_class.{md,csv}``,
  ``test/metrics.json``; status FINISHED once tested.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dsl.contracts.config import Config, FinetuneConfig, dump_config
from dsl.contracts.manifest import Manifest, manifest_sha256, read_manifest
from dsl.contracts.provenance import code_version
from dsl.contracts.shard_format import MANIFEST
from dsl.contracts.storage import join
from dsl.data.checks import check_crop
from dsl.runtime.trainer import resolve_paths, start_ray


@dataclass
class Cell:
    """One fine-tuning run: a labelled method line (``name``) and its full settings."""

    name: str
    ft: FinetuneConfig


def resolve_backbone(uri: str, tracking_uri: str) -> dict:
    """Pin a backbone: ``{"uri", "pinned", "name", "version", "run_id"}``.

    ``models:/<name>@<alias>`` becomes ``models:/<name>/<version>`` now, so every worker (and
    the lineage tags) see the version the alias pointed to when the run started.

    Raises:
        ValueError: No such registered model, alias or version (names ``finetune.backbone``).
    """
    if not uri.startswith("models:/"):
        path = Path(uri)
        if not path.is_dir():
            raise ValueError(f"finetune.backbone: {uri!r} is neither models:/<name>@<alias>, "
                             "models:/<name>/<version> nor a folder")
        return {"uri": uri, "pinned": str(path.resolve()), "name": "", "version": "", "run_id": ""}
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    rest = uri.removeprefix("models:/")
    client = MlflowClient(tracking_uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = rest.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except (MlflowException, ValueError) as e:
        raise ValueError(f"finetune.backbone: cannot resolve {uri!r} in {tracking_uri}: {e}") from None
    return {"uri": uri, "pinned": f"models:/{name}/{mv.version}", "name": name, "version": str(mv.version),
            "run_id": mv.run_id or ""}


def _tags(cell: Cell, backbone: dict | None, cfg: Config, job: str, sha: str, parent: str | None,
          n_train: int) -> dict:
    ft = cell.ft
    tags = {
        "dsl.kind": "finetune", "dsl.job": job, "dsl.method": ft.method, "dsl.method_name": cell.name,
        "dsl.mode": ft.mode, "dsl.task": ft.task, "dsl.label_fraction": str(float(ft.label_fraction)),
        "dsl.seed": str(ft.seed), "dsl.backbone_uri": ft.backbone, "dsl.train_samples": str(n_train),
        "dsl.manifest_url": join(cfg.data.shards, MANIFEST), "dsl.manifest_sha256": sha,
        "dsl.code_version": code_version(),
        "mlflow.runName": f"{cell.name}-{ft.task}-f{ft.label_fraction:g}-s{ft.seed}",
    }
    if backbone is not None and backbone["name"]:
        tags.update({"dsl.backbone_name": backbone["name"], "dsl.backbone_version": backbone["version"],
                     "dsl.backbone_run_id": backbone["run_id"]})
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


def _check_backbones(cfg: Config, cells: list[Cell], manifest: Manifest) -> dict[str, dict]:
    """Pin every registered backbone and check it fits the shards.

    The check runs here on the driver: a worker's error would be retried
    ``scale.max_failures`` times.
    """
    from dsl.finetune.loop import backbone_inputs
    from dsl.registry import fetched, read_version

    backbones: dict[str, dict] = {}
    for c in cells:
        if c.ft.method != "dual" or c.ft.backbone in backbones:
            continue
        b = backbones[c.ft.backbone] = resolve_backbone(c.ft.backbone, cfg.mlflow.tracking_uri)
        # every check short of building the model (card, weights header, shapes), on the copy
        # fetched for it, which is removed on every path
        with fetched(b["pinned"], cfg.mlflow.tracking_uri) as folder:
            _, card = read_version(folder, b["pinned"])
        backbone_inputs(cfg, manifest, card)
    return backbones


def _create_run(client, exp_id: str, cfg: Config, cell: Cell, tags: dict, selection: dict) -> str:
    """The cell's MLflow run with its config as params and the selected keys as an artifact."""
    from dsl.runtime.tracking import log_config

    run_id = client.create_run(exp_id, tags=tags).info.run_id
    log_config(client, run_id, cfg.model_copy(update={"finetune": cell.ft}))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "selection.json").write_text(json.dumps(selection))
        client.log_artifact(run_id, str(Path(tmp) / "selection.json"))
    return run_id


def run_cells(cfg: Config, cells: list[Cell], job: str | None = None, parent_run_id: str | None = None) -> list[dict]:
    """Fine-tune and test every cell in one Ray Train job; one MLflow run per cell.

    Returns:
        Per cell: ``{"run_id", "name", "method", "mode", "task", "label_fraction", "seed",
        "train_samples", "metrics"}`` (metrics without the ``test_`` prefix).
    """
    from dsl.finetune.labels import class_counts, read_labels, select_fraction
    from dsl.finetune.loop import finetune_loop
    from dsl.finetune.metrics import METRICS
    from dsl.runtime.tracking import client as mlflow_client
    from dsl.runtime.tracking import experiment_id
    from dsl.runtime.trainer import make_trainer

    cfg = resolve_paths(cfg)
    job = job or f"{cfg.scale.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    manifest = read_manifest(cfg.data.shards)
    check_crop(cfg.data, manifest)  # before any worker starts: else every worker fails on its first sample
    sha = manifest_sha256(cfg.data.shards)
    backbones = _check_backbones(cfg, cells, manifest)
    table = read_labels(cfg.data.shards, cfg.data.split, manifest)
    start_ray(cfg)  # joins the cluster this job runs in, if any
    client = mlflow_client(cfg.mlflow.tracking_uri)
    exp_id = experiment_id(client, cfg)
    specs = []
    for c in cells:
        keys = select_fraction(table, c.ft.label_fraction, c.ft.seed)
        b = backbones.get(c.ft.backbone)
        tags = _tags(c, b, cfg, job, sha, parent_run_id, sum(len(k) for k in keys.values()))
        run_id = _create_run(client, exp_id, cfg, c, tags, {"classes": class_counts(table, keys), "keys": keys})
        specs.append({"ft": c.ft.model_dump(mode="json"), "run_id": run_id, "keys": keys,
                      "backbone": b["pinned"] if b else "scratch"})
    trainer = make_trainer(cfg, finetune_loop, {"cfg": dump_config(cfg), "cells": specs}, job, keep_checkpoints=1)
    try:
        trainer.fit()
    except Exception:
        for s in specs:
            if client.get_run(s["run_id"]).info.status != "FINISHED":
                client.set_terminated(s["run_id"], status="FAILED")
        raise
    out = []
    for c, s in zip(cells, specs, strict=True):
        run = client.get_run(s["run_id"])
        out.append({"run_id": s["run_id"], "name": c.name, "method": c.ft.method, "mode": c.ft.mode,
                    "task": c.ft.task, "label_fraction": c.ft.label_fraction, "seed": c.ft.seed,
                    "train_samples": int(run.data.tags["dsl.train_samples"]),
                    "metrics": {m: run.data.metrics[f"test_{m}"] for m in METRICS}})
    return out


def finetune(cfg: Config) -> dict:
    """One fine-tuning run of ``cfg.finetune``; returns its run id and test metrics."""
    return run_cells(cfg, [Cell(cfg.finetune.method, cfg.finetune)])[0]


def command(cfg: Config, args: argparse.Namespace) -> int:
    """``dsl finetune``: one fine-tuning run; prints its run id and test metrics."""
    print(json.dumps(finetune(cfg), indent=1))
    return 0
