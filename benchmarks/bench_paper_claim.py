"""The paper's claim on synthetic data: Dual-SimCLR pretrained, fine-tuned on few labels, against
the supervised baselines from scratch.

    python benchmarks/bench_paper_claim.py [--work DIR] [--pairs 4000] [--labelled 1000]
        [--pretrain-steps 200 1500] [--steps 200] [--seeds 0 1 2] [--fractions 0.1 1.0]

1. ``dsl synth`` + ingest: ``--pairs`` unlabelled SEN12MS-layout pairs (5% held out) and
   ``--labelled`` DFC2020-layout locations (half 'validation' = the labelled training split,
   half 'test'); one synthetic world, so land cover is what S1, S2 and labels share.
2. Dual-SimCLR pretraining (configs/pretrain/tiny.yaml), one registered model per
   ``--pretrain-steps`` value (each its own full cosine schedule).
3. One ``dsl evaluate`` grid (configs/evaluate/tiny.yaml): each pretrained pair fine-tuned end to
   end (``ssl<steps>``) and as a linear probe (``ssl<steps>-linear``), and the four scratch
   baselines, at each label fraction and seed; every run takes ``--steps`` optimizer steps
   whatever its fraction (the same compute for all).

Everything is cached under ``--work`` (default: a new temp folder): a rerun reuses the data and
the registered model. Prints one JSON object (grid, claim checks, timings) and the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This folder holds a file named like the `ingest` package; keep it off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parents[1]
MODEL = "claim-dual-simclr"


def data(work: Path, pairs: int, labelled: int) -> tuple[Path, Path]:
    from dsl.contracts.config import IngestConfig
    from ingest.run import ingest
    from ingest.synth import synthesise

    out = []
    for layout, n, seed, val in (("sen12ms", pairs, 1, 0.05), ("dfc2020", labelled, 2, 0.0)):
        shards = work / f"{layout}-{n}"
        if not (shards / "manifest.json").exists():
            synthesise(work / f"raw-{layout}-{n}", layout, n, seed=seed, size=64)
            ingest(IngestConfig(source=layout, input=str(work / f"raw-{layout}-{n}"), output=str(shards),
                                shard_size_mb=4, val_fraction=val, progress=False))
        out.append(shards)
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--labelled", type=int, default=1000)
    p.add_argument("--pretrain-steps", type=int, nargs="+", default=[200, 1500])
    p.add_argument("--steps", type=int, default=200, help="fine-tuning optimizer steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from dsl.contracts.config import load_config
    from dsl.evaluate.grid import evaluate
    from dsl.train.pretrain import pretrain

    work = (args.work or Path(tempfile.mkdtemp(prefix="dsl-claim-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = [f"scale.storage_path={work / 'runs'}", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
              "mlflow.system_metrics=false"]
    t0 = time.time()
    unlabelled, labelled = data(work, args.pairs, args.labelled)
    t_data = time.time()
    methods, pretrained = [], {}
    for steps in args.pretrain_steps:  # a rerun finds the finished job and registers nothing new
        name = f"{MODEL}-{args.pairs}-{steps}"
        pre = pretrain(load_config(REPO / "configs/pretrain/tiny.yaml", [
            *common, f"data.shards={unlabelled}", f"optim.max_steps={steps}", "optim.warmup_steps=50",
            "scale.log_every=50", "scale.checkpoint_every=500", f"scale.name={name}", f"mlflow.registered_model={name}"]))
        backbone = pretrained[f"ssl{steps}"] = f"models:/{name}/{pre['model_version']}"
        methods += [f"{{name: ssl{steps}, method: dual, backbone: '{backbone}'}}",
                    f"{{name: ssl{steps}-linear, method: dual, backbone: '{backbone}', mode: linear}}"]
    t_pre = time.time()
    methods += ["{name: late_fusion, method: late_fusion}", "{name: early_fusion, method: early_fusion}",
                "{name: s1, method: s1}", "{name: s2, method: s2}"]
    out = evaluate(load_config(REPO / "configs/evaluate/tiny.yaml", [
        *common, f"data.shards={labelled}", f"evaluate.methods=[{', '.join(methods)}]",
        f"evaluate.seeds={json.dumps(args.seeds)}", f"evaluate.label_fractions={json.dumps(args.fractions)}",
        f"finetune.steps={args.steps}", f"evaluate.output={work / 'report'}", "scale.name=claim"]))
    t_eval = time.time()

    def aa(method: str, fraction: float) -> list[float]:
        return [r["metrics"]["average_accuracy"] for r in out["results"]
                if r["name"] == method and abs(r["label_fraction"] - fraction) < 1e-9]

    # average accuracy of SSL at each fraction < 1 against the same two-backbone model from
    # scratch at that fraction, and against the best scratch baseline with all labels
    best = max(("late_fusion", "early_fusion", "s1", "s2"), key=lambda m: statistics.mean(aa(m, 1.0))) \
        if 1.0 in args.fractions else None
    checks = {}
    for f in (f for f in args.fractions if f < 1):
        for method in (m for k in pretrained for m in (k, f"{k}-linear")):
            ssl, scratch = aa(method, f), aa("late_fusion", f)
            checks[f"{method}@{f:g}"] = {
                "ssl": round(statistics.mean(ssl), 4), "late_fusion_same_labels": round(statistics.mean(scratch), 4),
                "beats_it_on_seeds": sum(a > b for a, b in zip(ssl, scratch, strict=True)),
                **({f"{best}@1": round(statistics.mean(aa(best, 1.0)), 4)} if best else {})}
    print(json.dumps({
        "benchmark": "paper_claim",
        "command": "python benchmarks/bench_paper_claim.py " + " ".join(sys.argv[1:]),
        "work": str(work), "pretrained": pretrained, "seeds": args.seeds, "checks": checks,
        "seconds": {"data": round(t_data - t0), "pretrain": round(t_pre - t_data), "evaluate": round(t_eval - t_pre)},
        "report": out["paths"],
    }, indent=1))
    print(out["table"])


if __name__ == "__main__":
    main()
