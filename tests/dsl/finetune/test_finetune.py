"""Fine-tuning and evaluation end to end: a backbone pretrained and registered here (sqlite
store, artifacts on moto's S3 server), fine-tuned on Ray Train + DeepSpeed (2 CPU workers) from
``models:/<name>@<alias>``, with lineage tags and test metrics; the evaluation grid's table and plot.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import s3fs
from fixtures.services import REPO, make_bucket
from mlflow import MlflowClient

from dsl.cli import BY_NAME, build_parser, load
from dsl.contracts.config import ConfigError, IngestConfig, load_config
from dsl.evaluate.grid import evaluate
from dsl.finetune.labels import class_counts, read_labels
from dsl.finetune.runner import finetune
from dsl.train.pretrain import pretrain
from ingest.run import ingest
from ingest.synth import synthesise

pytestmark = pytest.mark.slow  # Ray Train + DeepSpeed jobs and MLflow

MODEL = "dsl-dual-backbone"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, ray_session, s3_server):
    """Labelled DFC2020-layout shards and a tiny backbone pretrained on them for a few steps."""
    root = tmp_path_factory.mktemp("finetune")
    make_bucket("dsl-finetune")
    # 81 'validation' (trained on), 80 'test' (held out): the splits differ in size and in their
    # class counts, so metrics computed on the wrong split are visible
    synthesise(root / "raw", "dfc2020", 161, seed=21, size=64)
    ingest(IngestConfig(source="dfc2020", input=str(root / "raw"), output=str(root / "shards"),
                        shard_size_mb=0.5, progress=False))
    common = [f"data.shards={root / 'shards'}", f"scale.storage_path={root / 'runs'}",
              f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", "mlflow.artifact_location=s3://dsl-finetune/mlflow"]
    out = pretrain(load_config(REPO / "configs/pretrain/tiny.yaml", [
        *common, "data.split=validation", "optim.max_steps=4", "scale.checkpoint_every=4", "scale.log_every=2"]))
    assert out["model_version"] == "1"
    return root, common


def test_finetune_from_registered_model(registered):
    root, common = registered
    cfg = load_config(REPO / "configs/finetune/tiny.yaml", [*common, "finetune.label_fraction=0.5",
                                                            "finetune.epochs=3", "finetune.seed=4"])
    out = finetune(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["dsl.backbone_uri"], tags["dsl.backbone_name"], tags["dsl.backbone_version"]) == (
        f"models:/{MODEL}@candidate", MODEL, "1")
    assert tags["dsl.backbone_run_id"] == client.get_model_version(MODEL, "1").run_id
    assert (tags["dsl.method"], tags["dsl.task"], tags["dsl.label_fraction"], tags["dsl.seed"]) == ("dual", "single", "0.5", "4")
    for m in ("average_accuracy", "overall_accuracy", "macro_f1", "micro_f1"):
        assert 0 <= run.data.metrics[f"test_{m}"] <= 1
        assert out["metrics"][m] == run.data.metrics[f"test_{m}"]
    assert run.data.metrics["test_micro_f1"] == pytest.approx(run.data.metrics["test_overall_accuracy"])
    assert run.data.metrics["test_samples"] == 80 and len(client.get_metric_history(out["run_id"], "train_loss")) == 3
    assert run.data.params["finetune.label_fraction"] == "0.5"
    # artifacts went to the S3 artifact store
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    base = f"dsl-finetune/mlflow/{out['run_id']}/artifacts"
    with fs.open(f"{base}/test/per_class.csv") as f:
        rows = list(csv.DictReader(line.decode() for line in f))
    assert [r["class"] for r in rows][:2] == ["Forest", "Shrubland"] and sum(int(r["support"]) for r in rows) == 80
    # the supports are the test split's class counts, not the training split's
    test_counts = class_counts(read_labels(str(root / "shards"), "test"))
    assert {i: int(r["support"]) for i, r in enumerate(rows)} == {i: test_counts.get(i, 0) for i in range(8)}
    assert test_counts != class_counts(read_labels(str(root / "shards"), "validation"))
    selection = json.loads(fs.cat(f"{base}/selection.json"))
    assert sum(map(len, selection["keys"].values())) == run.data.metrics["train_samples"] == sum(selection["classes"].values())


def test_bad_backbone_and_method_fail_before_training(registered):
    root, common = registered
    cfg = load_config(REPO / "configs/finetune/tiny.yaml", [*common, f"finetune.backbone=models:/{MODEL}@nope"])
    with pytest.raises(ValueError, match=f"finetune.backbone: cannot resolve 'models:/{MODEL}@nope'"):
        finetune(cfg)
    args = build_parser().parse_args(["finetune", "--config", str(REPO / "configs/finetune/tiny.yaml"),
                                      "finetune.method=s2"])
    with pytest.raises(ConfigError, match="method 's2' is a supervised baseline trained from scratch"):
        load(BY_NAME["finetune"], args)


def test_evaluate_grid_writes_table_and_plot(registered, tmp_path):
    root, common = registered
    cfg = load_config(REPO / "configs/evaluate/tiny.yaml", [
        *common, f"evaluate.output={tmp_path / 'report'}", "evaluate.label_fractions=[0.25,1.0]",
        "evaluate.seeds=[0,1]", "finetune.epochs=2",
        f"evaluate.methods=[{{name: dual-simclr, method: dual, backbone: 'models:/{MODEL}/1'}},"
        "{name: s2, method: s2}]"])
    out = evaluate(cfg)
    assert len(out["results"]) == 8
    rows = list(csv.DictReader(open(out["paths"]["results.csv"])))
    assert [(r["method"], float(r["label_fraction"]), int(r["n"])) for r in rows] == [
        ("dual-simclr", 0.25, 2), ("dual-simclr", 1.0, 2), ("s2", 0.25, 2), ("s2", 1.0, 2)]
    table = Path(out["paths"]["results.md"]).read_text()
    assert "| dual-simclr | 25% | 2 |" in table and " ± " in table
    assert Path(out["paths"]["label_fraction.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.DictReader(open(out["paths"]["runs.csv"])))) == 8
    client = MlflowClient(cfg.mlflow.tracking_uri)
    logged = {a.path for a in client.list_artifacts(out["run_id"])}
    assert logged == {"results.md", "results.csv", "runs.csv", "label_fraction.png"}
    child = client.get_run(out["results"][0]["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == out["run_id"] and child.data.tags["dsl.backbone_version"] == "1"
    assert client.get_run(out["results"][-1]["run_id"]).data.tags["dsl.backbone_uri"] == "scratch"


def test_multilabel_baselines_and_linear_probe(registered, tmp_path):
    """The README's other settings: the multi-label task, a linear probe of the registered
    backbone, and the S1, early- and late-fusion baselines, in one evaluation grid."""
    root, common = registered
    cfg = load_config(REPO / "configs/evaluate/tiny.yaml", [
        *common, f"evaluate.output={tmp_path / 'report'}", "evaluate.label_fractions=[1.0]", "evaluate.seeds=[0]",
        "finetune.task=multi", "finetune.epochs=1", "evaluate.metric=micro_f1",
        f"evaluate.methods=[{{name: probe, method: dual, mode: linear, backbone: 'models:/{MODEL}/1'}},"
        "{name: s1, method: s1}, {name: early, method: early_fusion}, {name: late, method: late_fusion}]"])
    out = evaluate(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert [r["name"] for r in out["results"]] == ["probe", "s1", "early", "late"]
    for r in out["results"]:
        run = client.get_run(r["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["dsl.task"] == "multi"
        assert all(0 <= run.data.metrics[f"test_{m}"] <= 1 for m in ("micro_f1", "macro_f1", "overall_accuracy"))
        local = client.download_artifacts(r["run_id"], "test/metrics.json", str(tmp_path / r["name"]))
        counts = json.loads(Path(local).read_text())["counts"]
        assert len(counts) == 8 and all(len(c) == 4 for c in counts)  # per class: tp, fp, fn, tn
        assert sum(counts[0]) == 80  # every test sample decided once per class
    assert client.get_run(out["results"][0]["run_id"]).data.tags["dsl.mode"] == "linear"
