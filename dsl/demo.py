"""``dsl demo`` (what ``make demo`` runs): the whole pipeline on embedded defaults.

Local folder as the object store, a local Ray, a sqlite MLflow store, all under ``--work``:
synthesise -> ingest -> pretrain (2 CPU Ray workers, DeepSpeed ZeRO-2) -> register ->
fine-tune from ``models:/<name>@candidate`` and evaluate against a baseline -> promote to
``champion`` if the candidate wins the gate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dsl.cli import resolve
from dsl.contracts.config import Config, IngestConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def command(_: Config, args: argparse.Namespace) -> int:
    """Run every stage in order under ``--work``, printing what each produced."""
    work = Path(args.work).resolve()
    t0 = time.time()

    from dsl.train.pretrain import pretrain

    # the data side, reached the way the command table reaches it (dsl never imports ingest)
    ingest, synthesise = resolve("ingest.run:ingest"), resolve("ingest.synth:synthesise")

    raw = work / "raw" / "sen12ms"
    if not raw.exists():
        print(f"[1/6] synthesising {args.locations} SEN12MS-layout locations -> {raw}", flush=True)
        synthesise(raw, "sen12ms", args.locations, seed=0, size=64)
    shards = work / "shards" / "sen12ms"
    print(f"[2/6] ingesting {raw} -> {shards} (local Ray, 2 workers)", flush=True)
    m = ingest(IngestConfig(source="sen12ms", input=str(raw), output=str(shards), workers=2,
                            shard_size_mb=4, val_fraction=0.1, progress=False))
    print(f"      {m.samples} pairs in {len(m.shards)} shards {m.samples_by_split}, "
          f"{m.bad} quarantined; manifest: {shards / 'manifest.json'}", flush=True)

    db = work / "mlflow.db"
    cfg = load_config(REPO / "configs" / "pretrain" / "tiny.yaml", [
        f"data.shards={shards}", f"scale.storage_path={work / 'ray_results'}",
        f"mlflow.tracking_uri=sqlite:///{db}", "optim.max_steps=150", "scale.checkpoint_every=50",
    ])
    print(f"[3/6] pretraining Dual-SimCLR: {cfg.scale.num_workers} Ray workers, DeepSpeed ZeRO-"
          f"{cfg.deepspeed.zero_stage}, {cfg.optim.max_steps} steps", flush=True)
    out = pretrain(cfg)
    metrics = out["metrics"]
    print(f"      step {out['step']}: loss {metrics.get('loss', float('nan')):.3f}, in-batch retrieval "
          f"S1->S2 {metrics.get('retrieval_s1_to_s2', 0):.0%} (chance {1 / cfg.data.batch_size:.0%})")
    print(f"      registered models:/{cfg.mlflow.registered_model}@{cfg.mlflow.alias} "
          f"(version {out['model_version']}, run {out['run_id']})")

    dfc_raw, dfc = work / "raw" / "dfc2020", work / "shards" / "dfc2020"
    if not dfc_raw.exists():
        synthesise(dfc_raw, "dfc2020", args.labelled, seed=1, size=64)
    print(f"[4/6] labelled DFC2020-layout data: {args.labelled} locations -> {dfc}", flush=True)
    m = ingest(IngestConfig(source="dfc2020", input=str(dfc_raw), output=str(dfc), workers=2, shard_size_mb=4,
                            progress=False))
    print(f"      {m.samples_by_split}", flush=True)

    from dsl.evaluate.grid import evaluate

    ev = load_config(REPO / "configs" / "evaluate" / "tiny.yaml", [
        f"data.shards={dfc}", f"scale.storage_path={work / 'ray_results'}", f"mlflow.tracking_uri=sqlite:///{db}",
        f"evaluate.output={work / 'evaluate'}",
    ])
    print(f"[5/6] fine-tuning from models:/{cfg.mlflow.registered_model}@{cfg.mlflow.alias} against "
          f"scratch baselines: {len(ev.evaluate.methods)} methods x fractions {ev.evaluate.label_fractions} x "
          f"seeds {ev.evaluate.seeds}", flush=True)
    report = evaluate(ev)
    print("\n" + report["table"])
    for name, path in report["paths"].items():
        print(f"      {name}: {path}")

    from dsl.registry.promote import promote

    gate = load_config(REPO / "configs" / "promote" / "gate.yaml", [f"mlflow.tracking_uri=sqlite:///{db}"])
    decision = promote(gate.promote, gate.mlflow.registered_model, gate.mlflow.tracking_uri)
    print(f"[6/6] promotion {gate.promote.from_alias} -> {gate.promote.to_alias}: {decision['decision']} "
          f"(candidate {decision['candidate_score']:.3f}, champion {decision['champion_score']})")
    print(f"\nMLflow store: {db}\n  open its UI with: .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} "
          f"--host 127.0.0.1 --port 5000")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0
