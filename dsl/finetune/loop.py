"""The per-worker fine-tuning loop; Ray Train runs one copy on every worker.

One job runs a list of *cells* (one fine-tuning run each: ``dsl finetune`` is a list of one,
``dsl evaluate`` its whole grid), so Ray, the workers and the process group start once. Per
cell: the selected labelled keys of ``data.split`` -> make_loader (this rank's equal share) ->
DeepSpeed engine -> cross-entropy or BCE; then every rank counts its share of the test split
and one all-reduce gives rank 0 the exact confusion counts it turns into metrics and logs to the
cell's MLflow run. After each cell all ranks report the finished cells to Ray's storage, so a
restarted job (a worker lost) skips them.
"""

from __future__ import annotations

import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsl.collectives import all_reduce, mean_across_ranks
from dsl.contracts.config import Config, FinetuneConfig, OptimConfig
from dsl.contracts.manifest import Manifest, read_manifest
from dsl.contracts.model_card import ModelCard
from dsl.data import make_loader
from dsl.data.bad_samples import BadSampleBudget
from dsl.finetune import metrics as M
from dsl.finetune.models import build_finetune_model
from dsl.runtime.checkpoint import load_state, local_copy, save_state
from dsl.runtime.engine import build_engine
from dsl.runtime.tracking import MetricLogger, log_metrics
from dsl.runtime.trainer import setup_worker


def backbone_inputs(cfg: Config, manifest: Manifest, card: ModelCard | None):
    """Return (data config, manifest to normalise with) for a cell.

    A pretrained backbone gets the crop size, bands and normalisation (scheme and statistics)
    of its pretraining; a scratch backbone (``card`` None) the job's own.

    Raises:
        ValueError: The shards' band names differ from those the backbone was pretrained on.
    """
    if card is None:
        return cfg.data, manifest
    for sensor in ("s1", "s2"):
        have, want = getattr(manifest.bands, sensor) or [], getattr(card.band_names, sensor) or []
        if list(have) != list(want):
            raise ValueError(f"{cfg.data.shards}: {sensor} bands {have} differ from the "
                             f"{want} the backbone was pretrained on")
    data = cfg.data.model_copy(update={"crop_size": card.img_size, "normalisation": card.normalisation,
                                       "s1_bands": card.s1_bands, "s2_bands": card.s2_bands})
    return data, manifest.model_copy(update={"stats": card.stats})


def _loss(task: str, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    if task == "single":
        return nn.functional.cross_entropy(logits.float(), batch["cls"].to(logits.device), ignore_index=M.IGNORE)
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["multi"].to(logits.device))


@torch.no_grad()
def test_counts(engine, data, manifest, ft: FinetuneConfig, rank, world, device, dtype, chans) -> np.ndarray:
    """This rank's counts on the test split, summed over ranks: confusion [8, 8] or [8, 4]."""
    engine.eval()
    loader = make_loader(data.model_copy(update={"split": ft.test_split, "samples_per_epoch": None}),
                         rank, world, labels=True, train=False, manifest=manifest)
    shape = (M.N_CLASSES, M.N_CLASSES) if ft.task == "single" else (M.N_CLASSES, 4)
    counts = np.zeros(shape, dtype=np.int64)
    for batch in loader:
        logits = engine(batch["s1"].to(device, dtype), batch["s2"].to(device, dtype)).float().cpu()
        cls = batch["cls"].numpy()
        if ft.task == "single":
            counts += M.confusion(cls, logits.argmax(1).numpy())
        else:  # a sample without valid pixels (cls 255) has no multi-label truth either
            counts += M.multilabel_counts(batch["multi"].numpy(), (logits.sigmoid() >= 0.5).numpy(), cls != M.IGNORE)
    # ZeRO-3 gathers parameters inside forward, a collective: every rank must call it equally often
    n = torch.tensor([len(loader)])
    most = int(all_reduce(n, "max").item()) if engine.zero_optimization_stage() == 3 else 0
    for _ in range(most - int(n.item())):
        c = data.crop_size
        engine(*(torch.zeros(1, k, c, c, device=device, dtype=dtype) for k in chans))
    return all_reduce(torch.from_numpy(counts)).numpy()


def _pretrained(uri: str, tracking_uri: str, cache: dict) -> tuple[nn.Module, ModelCard]:
    """A fresh copy of a registered model (fetched once per worker and job) and its card."""
    from dsl.registry import load_backbones

    if uri not in cache:
        cache[uri] = load_backbones(uri, tracking_uri)
    model, card = cache[uri]
    return copy.deepcopy(model), card


def run_cell(cfg: Config, manifest: dict, cell: dict, rank: int, world: int, device, cache: dict) -> dict:
    """Train and test one cell; returns the test metrics (on every rank)."""
    ft = FinetuneConfig.model_validate(cell["ft"])
    pretrained, card = _pretrained(cell["backbone"], cfg.mlflow.tracking_uri, cache) if ft.method == "dual" else (None, None)
    data, norm_manifest = backbone_inputs(cfg, manifest, card)
    keys = cell["keys"]
    n_selected, per_step = sum(len(k) for k in keys.values()), world * data.batch_size
    # an epoch is a pass over the selected samples, or at least one batch per rank (tiny fractions)
    per_epoch = ft.steps * per_step if ft.steps else max(n_selected, per_step)
    data = data.model_copy(update={"seed": ft.seed, "samples_per_epoch": per_epoch})
    epochs = 1 if ft.steps else ft.epochs
    total_steps = max(1, epochs * (per_epoch // per_step) // cfg.deepspeed.grad_accum)  # optimizer steps
    s1_chans = len(data.s1_bands or manifest.bands.s1)
    s2_chans = len(data.s2_bands or manifest.bands.s2 or [])
    torch.manual_seed(ft.seed)  # the same head (and scratch backbones) on every rank
    model = build_finetune_model(ft, cfg.model, s1_chans, s2_chans, M.N_CLASSES, data.crop_size, pretrained)
    # the groups carry their own lr and weight decay; the schedule runs over this cell's steps
    engine, dtype = build_engine(model, model.param_groups(ft.lr, ft.backbone_lr_scale, ft.weight_decay),
                                 OptimConfig(lr=ft.lr, max_steps=total_steps), cfg.deepspeed, data.batch_size)
    client = None
    if rank == 0:
        from dsl.runtime.tracking import client as mlflow_client

        client = mlflow_client(cfg.mlflow.tracking_uri)
    # per-epoch points are best-effort (a tracking outage must not stop the ranks mid-epoch);
    # the cell's result, logged once at the end, is not
    logger = MetricLogger(cfg, cell["run_id"] if rank == 0 else None)
    t0 = time.perf_counter()
    budget = BadSampleBudget(data.max_bad_fraction, per_epoch)
    for epoch in range(epochs):
        engine.train()
        total, n = 0.0, 0
        for batch in make_loader(data, rank, world, epoch=epoch, labels=True, keys=keys, manifest=norm_manifest):
            budget.add(batch)
            logits = engine(batch["s1"].to(device, dtype), batch["s2"].to(device, dtype))
            loss = _loss(ft.task, logits, batch)
            engine.backward(loss)
            engine.step()
            total, n = total + loss.item(), n + 1
        # every rank sums the same counts, so all stop at the same epoch or none does
        planned, bad, skipped = all_reduce(torch.tensor(budget.counts(), dtype=torch.float64)).tolist()
        logger.log({"train_loss": mean_across_ranks(total / max(n, 1)), "data_bad_samples": bad,
                    "data_skipped_samples": skipped}, epoch)
        budget.check(planned, bad, skipped)
    logger.close()
    train_s = time.perf_counter() - t0
    counts = test_counts(engine, data, norm_manifest, ft, rank, world, device, dtype, (s1_chans, s2_chans))
    result = M.single_label_metrics(counts) if ft.task == "single" else M.multi_label_metrics(counts)
    metrics = {f"test_{k}": v for k, v in result["metrics"].items()}
    if client is not None:
        _log_result(client, cell["run_id"], metrics, result, counts,
                    {"train_steps": total_steps, "train_samples": n_selected, "train_seconds": train_s,
                     "test_samples": int(counts.sum() if ft.task == "single" else counts[0].sum())})
    del engine, model
    gc.collect()
    return metrics


def _log_result(client, run_id: str, metrics: dict, result: dict, counts: np.ndarray, extra: dict) -> None:
    rows = {**metrics, **extra, **{f"test_f1_{r['class']}": r["f1"] for r in result["per_class"]}}
    log_metrics(client, run_id, rows, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "per_class.md").write_text(M.per_class_markdown(result["per_class"]))
        lines = ["class,support,predicted,precision,recall,f1"]
        lines += [f"{r['class']},{r['support']},{r['predicted']},{r['precision']:.6f},{r['recall']:.6f},{r['f1']:.6f}"
                  for r in result["per_class"]]
        (Path(tmp) / "per_class.csv").write_text("\n".join(lines) + "\n")
        (Path(tmp) / "metrics.json").write_text(json.dumps({**result, "counts": counts.tolist()}, indent=1))
        client.log_artifacts(run_id, tmp, "test")
    client.set_terminated(run_id, status="FINISHED")


def finetune_loop(config: dict) -> None:
    """Ray Train entry point: run every cell not yet finished, reporting each to Ray's storage.

    Args:
        config: ``{"cfg": resolved tree, "cells": [{"ft", "run_id", "keys", "backbone"}]}``.
    """
    import ray.train

    cfg = Config.model_validate(config["cfg"])
    rank, world, device = setup_worker(cfg)
    manifest = read_manifest(cfg.data.shards)
    done: list[str] = []
    cache: dict = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with local_copy(checkpoint) as d:
            done = load_state(Path(d))["done"]
    for i, cell in enumerate(config["cells"]):
        if cell["run_id"] in done:
            continue
        metrics = run_cell(cfg, manifest, cell, rank, world, device, cache)
        done.append(cell["run_id"])
        with tempfile.TemporaryDirectory() as tmp:
            save_state(Path(tmp), {"done": done})
            ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report({"cell": i, **metrics}, checkpoint=ckpt)
