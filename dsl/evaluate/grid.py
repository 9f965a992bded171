"""``dsl evaluate``: the methods x label fractions x seeds grid, its table and its plot.

Every cell is an ordinary fine-tuning run (same tags and metrics as ``dsl finetune``), a child
of one ``evaluate`` MLflow run; all cells run in one Ray Train job. The parent run gets
``results.md`` / ``results.csv`` (mean +- std over seeds, in %), ``runs.csv`` (every cell) and
``label_fraction.png`` (the plotted metric against the label fraction, one line per method).
"""

from __future__ import annotations

import argparse
import csv
import time
import uuid
from pathlib import Path

import numpy as np

from dsl.contracts.config import Config, FinetuneConfig
from dsl.finetune.metrics import METRICS
from dsl.finetune.runner import Cell

NAMES = {"average_accuracy": "AA", "overall_accuracy": "OA", "macro_f1": "macro-F1", "micro_f1": "micro-F1"}


def grid(cfg: Config) -> list[Cell]:
    """One cell per method x fraction x seed; everything else from ``cfg.finetune``."""
    base = cfg.finetune.model_dump()
    return [
        Cell(m.name, FinetuneConfig.model_validate({**base, "method": m.method, "backbone": m.backbone,
                                                    "mode": m.mode, "label_fraction": f, "seed": s}))
        for m in cfg.evaluate.methods for f in cfg.evaluate.label_fractions for s in cfg.evaluate.seeds
    ]


def summarise(results: list[dict]) -> list[dict]:
    """Aggregate the cells' test metrics over seeds, one row per method x label fraction.

    Rows are ``{"method", "label_fraction", "n", "<metric>_mean", "<metric>_std"}`` in grid
    order (std over seeds with ddof=1; 0 for a single seed).
    """
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        groups.setdefault((r["name"], r["label_fraction"]), []).append(r["metrics"])
    rows = []
    for (name, fraction), runs in groups.items():
        row = {"method": name, "label_fraction": fraction, "n": len(runs)}
        for m in METRICS:
            v = np.array([r[m] for r in runs])
            row[f"{m}_mean"], row[f"{m}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict], task: str) -> str:
    """Render the summary rows as a markdown table of mean ± std per metric, in %."""
    head = f"| method | labels | seeds | {' | '.join(NAMES[m] for m in METRICS)} |"
    lines = [f"Test metrics ({task}-label), mean ± std over seeds, in %.", "", head,
             "|---|---:|---:|" + "---:|" * len(METRICS)]
    for r in rows:
        cells = " | ".join(f"{100 * r[f'{m}_mean']:.1f} ± {100 * r[f'{m}_std']:.1f}" for m in METRICS)
        lines.append(f"| {r['method']} | {100 * r['label_fraction']:g}% | {r['n']} | {cells} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write dict rows to a CSV file, with the first row's keys as the header."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], metric: str, path: Path) -> None:
    """The metric (%) against the label fraction (log axis), one line per method, seed std as bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=120)
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["label_fraction"])
        x = [r["label_fraction"] for r in rs]
        ax.errorbar(x, [100 * r[f"{metric}_mean"] for r in rs], yerr=[100 * r[f"{metric}_std"] for r in rs],
                    marker="o", capsize=3, label=name)
    fractions = sorted({r["label_fraction"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labelled fraction of the training split")
    ax.set_ylabel(f"{NAMES[metric]} (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")  # off the lines
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(cfg: Config) -> dict:
    """Run the grid, write table and plot to ``evaluate.output`` and log them to MLflow.

    Returns:
        ``{"run_id", "job", "table" (markdown), "paths": {name: local path}, "results": [...]}``.
    """
    from dsl.finetune.runner import run_cells
    from dsl.runtime.tracking import client as mlflow_client
    from dsl.runtime.tracking import experiment_id, log_config
    from dsl.runtime.trainer import resolve_paths

    cfg = resolve_paths(cfg)
    cells = grid(cfg)
    job = f"{cfg.scale.name}-eval-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    client = mlflow_client(cfg.mlflow.tracking_uri)
    parent = client.create_run(experiment_id(client, cfg), tags={
        "dsl.kind": "evaluate", "dsl.job": job, "dsl.task": cfg.finetune.task, "mlflow.runName": job}).info.run_id
    log_config(client, parent, cfg)
    try:
        results = run_cells(cfg, cells, job, parent_run_id=parent)
    except Exception:
        client.set_terminated(parent, status="FAILED")
        raise
    rows = summarise(results)
    out = Path(cfg.evaluate.output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results.md": out / "results.md", "results.csv": out / "results.csv", "runs.csv": out / "runs.csv",
             "label_fraction.png": out / "label_fraction.png"}
    table = markdown(rows, cfg.finetune.task)
    paths["results.md"].write_text(table)
    write_csv(paths["results.csv"], rows)
    write_csv(paths["runs.csv"], [{k: v for k, v in r.items() if k != "metrics"} | r["metrics"] for r in results])
    plot(rows, cfg.evaluate.metric, paths["label_fraction.png"])
    for p in paths.values():
        client.log_artifact(parent, str(p))
    client.set_terminated(parent, status="FINISHED")
    return {"run_id": parent, "job": job, "table": table, "paths": {k: str(v) for k, v in paths.items()},
            "results": results}


def command(cfg: Config, args: argparse.Namespace) -> int:
    """``dsl evaluate``: run the grid; prints the table, the MLflow run and the files written."""
    out = evaluate(cfg)
    print(out["table"])
    print(f"MLflow run {out['run_id']} ({len(out['results'])} fine-tuning runs)")
    for path in out["paths"].values():
        print(path)
    return 0
