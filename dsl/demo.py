"""``make demo``: the whole pipeline on embedded defaults.

Local folder as the object store, a local Ray, a sqlite MLflow store, all under ``--work``:
synthesise -> ingest -> pretrain (2 CPU Ray workers, DeepSpeed ZeRO-2) -> register.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dsl.config import IngestConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="work", help="folder for data, shards, runs and the MLflow store")
    p.add_argument("--locations", type=int, default=2048, help="synthetic unlabelled locations")
    args = p.parse_args()
    work = Path(args.work).resolve()
    t0 = time.time()

    from dsl.train.pretrain import pretrain
    from ingest.run import ingest
    from ingest.synth import synthesise

    raw = work / "raw" / "sen12ms"
    if not raw.exists():
        print(f"[1/3] synthesising {args.locations} SEN12MS-layout locations -> {raw}", flush=True)
        synthesise(raw, "sen12ms", args.locations, seed=0, size=64)
    shards = work / "shards" / "sen12ms"
    print(f"[2/3] ingesting {raw} -> {shards} (local Ray, 2 workers)", flush=True)
    m = ingest(IngestConfig(source="sen12ms", input=str(raw), output=str(shards), workers=2,
                            shard_size_mb=4, val_fraction=0.1, progress=False))
    print(f"      {m['samples']} pairs in {len(m['shards'])} shards {m['samples_by_split']}, "
          f"{m['bad']} quarantined; manifest: {shards / 'manifest.json'}", flush=True)

    db = work / "mlflow.db"
    cfg = load_config(REPO / "configs" / "pretrain" / "tiny.yaml", [
        f"data.shards={shards}", f"scale.storage_path={work / 'ray_results'}",
        f"mlflow.tracking_uri=sqlite:///{db}", "optim.max_steps=150", "scale.checkpoint_every=50",
    ])
    print(f"[3/3] pretraining Dual-SimCLR: {cfg.scale.num_workers} Ray workers, DeepSpeed ZeRO-"
          f"{cfg.deepspeed.zero_stage}, {cfg.optim.max_steps} steps", flush=True)
    out = pretrain(cfg)
    metrics = out["metrics"]
    print(f"      step {out['step']}: loss {metrics.get('loss', float('nan')):.3f}, in-batch retrieval "
          f"S1->S2 {metrics.get('retrieval_s1_to_s2', 0):.0%} (chance {1 / cfg.data.batch_size:.0%})")
    print(f"      registered models:/{cfg.mlflow.registered_model}@{cfg.mlflow.alias} "
          f"(version {out['model_version']}, run {out['run_id']})")
    print(f"\nMLflow store: {db}\n  open its UI with: .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} "
          f"--host 127.0.0.1 --port 5000")
    print(f"demo finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
