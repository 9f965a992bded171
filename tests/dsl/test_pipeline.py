"""``dsl pipeline run``: the pipeline file, placeholders, and each slot's stages run once.

Fast: the file's validation, substitution, the stage output parser and the claim's decisions on
plain records. Slow: a sqlite MLflow store with real ``dsl synth`` stages (skips, retry from
the failed stage, two runners of one slot), and a real Ray head with an ``mlflow server``
(the same slot submitted twice, and again under another id).
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fixtures.services import REPO

from dsl.contracts.config import ConfigError
from dsl.contracts.errors import JobFailed
from dsl.contracts.pipeline import load_pipeline, substitute
from dsl.pipeline import (
    DONE,
    HEARTBEAT,
    KEY,
    OUTPUT,
    STAGE,
    STATE,
    Slot,
    command,
    finished,
    last_json,
    live,
    run_pipeline,
    run_stage,
    winner,
)


def write(tmp_path: Path, doc, name: str = "p") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def synth(out: Path | str) -> list[str]:
    return ["synth", "--out", str(out), "--locations", "1", "--size", "16"]


# ---------------------------------------------------------------- the pipeline file (fast)

@pytest.mark.parametrize("doc, message", [
    ({"stages": [{"name": "a", "cmd": ["synth"]}]}, "stages.0.cmd: unknown key"),
    ({"stages": []}, "stages: List should have at least 1 item"),
    ({"stages": [{"name": "a", "command": []}]}, "stages.0.command: List should have at least 1 item"),
    ({"stage": [{"name": "a", "command": ["synth"]}]}, "stage: unknown key"),
    ({"stages": [{"name": "A b", "command": ["synth"]}]}, "stages.0.name: String should match"),
    ({"stages": [{"name": "a", "command": ["synth", True]}]}, "stages.0.command.1: Input should be a valid string"),
    ({"stages": [{"name": "a", "command": ["synth", "--out", "x/{slto}"]}]},
     "stages[0].command[2] (a: 'x/{slto}'): unknown placeholder '{slto}'"),
    ({"stages": [{"name": "a", "command": ["synth", "{b.version}"]}, {"name": "b", "command": ["synth"]}]},
     "stages[0].command[1] (a: '{b.version}'): '{b.version}' refers to stage 'b', which is not an earlier stage"),
    ({"stages": [{"name": "a", "command": ["synth", "{slot:>4}"]}]}, "stages[0].command[1]"),
    ({"stages": [{"name": "a", "command": ["synth", "x={y"]}]}, "stages[0].command[1] (a: 'x={y'): "),
    ({"stages": [{"name": "a", "command": ["synth"]}, {"name": "a", "command": ["synth"]}]},
     "stages[1].name: 'a' is used by an earlier stage"),
    ({"stages": [{"name": "a", "command": ["pipeline", "run", "x"]}]}, "a stage cannot run a pipeline"),
    ({"heartbeat_s": 30, "lease_s": 60, "stages": [{"name": "a", "command": ["synth"]}]}, "lease_s (60) must exceed"),
    ("- just a list", "top level must be a mapping"),
    ("stages: [", "not valid YAML"),
])
def test_bad_pipeline_files_are_one_line_errors_naming_file_and_key(tmp_path, doc, message):
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    text = str(e.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text, text


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read pipeline .*nope\.yaml"):
        load_pipeline(tmp_path / "nope.yaml")


def test_repository_pipelines_load():
    for name in ("nightly", "demo"):
        p = load_pipeline(REPO / "configs" / "pipelines" / f"{name}.yaml")
        assert p.stages[-1].name == "promote"
    nightly = load_pipeline(REPO / "configs" / "pipelines" / "nightly.yaml")
    assert [s.name for s in nightly.stages] == ["ingest", "pretrain", "finetune", "promote"]


def test_numbers_in_a_command_are_words(tmp_path):
    p = load_pipeline(write(tmp_path, {"stages": [{"name": "a", "command": ["synth", "--locations", 2, 0.5]}]}))
    assert p.stages[0].command == ["synth", "--locations", "2", "0.5"]


def test_substitution():
    values = {"slot": "2026-11-30", "pipeline": "nightly", "pretrain.model_version": "7"}
    assert substitute("s3://b/{pipeline}/{slot}", values) == "s3://b/nightly/2026-11-30"
    assert substitute("finetune.backbone=models:/m/{pretrain.model_version}", values).endswith("models:/m/7")
    assert substitute("evaluate.methods=[{{name: a}}]", values) == "evaluate.methods=[{name: a}]"
    with pytest.raises(KeyError):
        substitute("{finetune.score}", values)


def test_stage_output_is_the_last_json_object():
    out = 'step 10\n{\n "old": 1\n}\nmore\n{\n "run_id": "abc",\n "model_version": "3",\n "step": 40,\n' \
          ' "nested": {"a": 1},\n "none": null\n}\n(raylet) a log line after it\n'
    assert last_json(out) == {"run_id": "abc", "model_version": "3", "step": "40"}
    assert last_json("wrote 3 synthetic sen12ms locations\n") == {}


def attempt(run_id: str, start: int, status: str = "RUNNING", beat: float | None = None, **tags: str):
    tags = {**tags, **({HEARTBEAT: str(beat)} if beat is not None else {})}
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, start_time=start, status=status),
                           data=SimpleNamespace(tags=tags))


def test_claim_decisions_on_plain_records():
    now = 1000.0
    runs = [attempt("old", 1, beat=now - 700), attempt("failed", 2, "FAILED", beat=now),
            attempt("b", 5, beat=now), attempt("a", 5, beat=now - 10), attempt("c", 9, beat=now)]
    alive = live(runs, now, lease_s=600)
    assert [r.info.run_id for r in alive] == ["b", "a", "c"]  # expired lease and FAILED are not live
    assert winner(alive) == "a"  # earliest start, then run id: every contender picks the same one
    assert winner([]) is None
    done = finished([attempt("x", 1, "FAILED", **{STAGE + "a": DONE, OUTPUT + "a.version": "7",
                                                  STAGE + "b": "failed"}),
                     attempt("y", 2, **{STAGE + "b": "running"})])
    assert done == {"a": {"version": "7"}}


def ns(name, slot=None, tracking_uri=None):
    return argparse.Namespace(action="run", name=str(name), slot=slot, tracking_uri=tracking_uri)


def test_command_refuses_bad_slot_and_missing_store(tmp_path):
    path = write(tmp_path, {"stages": [{"name": "a", "command": synth(tmp_path / "s")}]})
    with pytest.raises(ConfigError, match="--slot 'a b'"):
        command(None, ns(path, slot="a b", tracking_uri="sqlite:///x.db"))
    with pytest.raises(ConfigError, match="no tracking_uri"):
        command(None, ns(path, slot="s1"))
    with pytest.raises(ConfigError, match="cannot read pipeline .*configs/pipelines/absent.yaml"):
        command(None, ns("absent", slot="s1", tracking_uri="sqlite:///x.db"))


# ---------------------------------------------------------------- a slot in MLflow (slow)

@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An empty sqlite MLflow store, created once (its tables take seconds) and copied per test."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("pipeline-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def uri(template, tmp_path) -> str:
    shutil.copy(template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def attempts(uri: str, key: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return Slot(client, "dsl-pipelines", *key.split("-", 1)).attempts()


class Counting:
    """The real stage runner, counting each stage's executions (by the stage's command word)."""

    def __init__(self, fake: dict[str, str] | None = None):
        self.argvs: list[list[str]] = []
        self.fake = fake or {}
        self.lock = threading.Lock()

    def __call__(self, argv, beat, every_s):
        with self.lock:
            self.argvs.append(argv)
        if argv[0] in self.fake:  # a stand-in for a stage that prints JSON (pretrain, promote)
            return 0, self.fake[argv[0]]
        return run_stage(argv, beat, every_s)


@pytest.mark.slow
def test_a_finished_slot_runs_nothing_again(tmp_path, uri):
    path = write(tmp_path, {"claim_settle_s": 0, "stages": [
        {"name": "one", "command": synth(tmp_path / "{slot}" / "one")},
        {"name": "two", "command": synth(tmp_path / "{slot}" / "two")}]})
    rc = command(None, ns(path, slot="s1", tracking_uri=uri))
    assert rc == 0 and (tmp_path / "s1" / "one").is_dir() and (tmp_path / "s1" / "two").is_dir()
    [run] = attempts(uri, "p-s1")
    assert run.info.status == "FINISHED" and run.data.tags[STATE] == DONE
    assert run.data.tags[STAGE + "one"] == run.data.tags[STAGE + "two"] == DONE
    assert run.data.tags["mlflow.runName"] == "pipeline-p-s1"

    shutil.rmtree(tmp_path / "s1")
    again = Counting()
    out = run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=again)
    assert out["status"] == "skipped" and again.argvs == [] and not (tmp_path / "s1").exists()
    assert len(attempts(uri, "p-s1")) == 1  # a finished slot is not even attempted
    # another slot of the same pipeline is its own
    assert run_pipeline(str(path), "s2", uri, say=lambda _: None)["ran"] == ["one", "two"]


@pytest.mark.slow
def test_a_failed_stage_stops_the_pipeline_and_the_retry_resumes_there(tmp_path, uri):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where stage two wants a folder")
    path = write(tmp_path, {"claim_settle_s": 0, "stages": [
        {"name": "one", "command": synth(tmp_path / "one")},
        {"name": "two", "command": synth(blocker / "two")},
        {"name": "three", "command": synth(tmp_path / "three")}]})
    first = Counting()
    with pytest.raises(JobFailed, match=r"slot p-s1: stage two failed \(exit 2\).*retry from this stage"):
        run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=first)
    assert [a[0] for a in first.argvs] == ["synth", "synth"] and not (tmp_path / "three").exists()
    [run] = attempts(uri, "p-s1")
    assert run.info.status == "FAILED"  # retryable at once, not after the lease
    assert run.data.tags[STAGE + "one"] == DONE and run.data.tags[STAGE + "two"] == "failed"

    shutil.rmtree(tmp_path / "one")
    blocker.unlink()
    retry = Counting()
    out = run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=retry)
    assert out["ran"] == ["two", "three"] and out["skipped"] == ["one"]
    assert not (tmp_path / "one").exists()  # stage one did not run again
    assert (blocker / "two").is_dir() and (tmp_path / "three").is_dir()
    runs = attempts(uri, "p-s1")
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]


@pytest.mark.slow
def test_outputs_are_recorded_and_reused_by_a_retry(tmp_path, uri):
    """A stage's printed JSON (pretrain's model_version) feeds a later stage, also after a retry."""
    blocker = tmp_path / "blocked"
    blocker.write_text("")
    path = write(tmp_path, {"claim_settle_s": 0, "stages": [
        {"name": "pretrain", "command": ["pretrain", "--config", "x.yaml"]},
        {"name": "use", "command": synth(str(blocker / "v{pretrain.model_version}"))}]})
    fake = Counting({"pretrain": 'log line\n{\n "run_id": "r",\n "model_version": "7"\n}\n'})
    with pytest.raises(JobFailed):
        run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=fake)
    [run] = attempts(uri, "p-s1")
    assert run.data.tags[OUTPUT + "pretrain.model_version"] == "7"
    blocker.unlink()
    retry = Counting({"pretrain": '{"model_version": "8"}'})  # would print another version: must not run
    out = run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=retry)
    assert [a[0] for a in retry.argvs] == ["synth"] and retry.argvs[0][2].endswith("v7")
    assert out["outputs"]["pretrain"] == {"run_id": "r", "model_version": "7"} and (blocker / "v7").is_dir()


@pytest.mark.slow
def test_an_output_a_stage_did_not_print_fails_that_stage(tmp_path, uri):
    path = write(tmp_path, {"claim_settle_s": 0, "stages": [
        {"name": "one", "command": ["pretrain", "--config", "x.yaml"]},
        {"name": "two", "command": ["synth", "--out", "{one.model_version}"]}]})
    with pytest.raises(JobFailed, match=r"stage two: \{one.model_version\} has no value"):
        run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=Counting({"pretrain": "no json"}))


@pytest.mark.slow
def test_two_runners_of_one_slot_run_its_stages_once(tmp_path, uri):
    path = write(tmp_path, {"claim_settle_s": 0.5, "stages": [
        {"name": "one", "command": synth(tmp_path / "one")},
        {"name": "two", "command": synth(tmp_path / "two")}]})
    counting, barrier, results, errors = Counting(), threading.Barrier(2), [], []

    def runner():
        try:
            barrier.wait()
            results.append(run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=counting))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=runner) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(a[2] for a in counting.argvs) == [str(tmp_path / "one"), str(tmp_path / "two")]
    assert sorted(r["status"] for r in results)[0] == "done"
    assert sorted(r["status"] for r in results)[1] in ("taken", "skipped")


@pytest.mark.slow
def test_a_contender_that_created_its_attempt_first_wins(tmp_path, uri, monkeypatch):
    """The decision after creating: an earlier live attempt, however it got there, holds the slot."""
    from mlflow import MlflowClient

    path = write(tmp_path, {"claim_settle_s": 0, "stages": [{"name": "one", "command": synth(tmp_path / "one")}]})
    create = Slot.create
    rival: list[str] = []

    def race(self):  # a rival's create lands between our search and ours, with an earlier start
        run = self.client.create_run(self.experiment_id, start_time=int(time.time() * 1000) - 5000,
                                     tags={KEY: self.key, HEARTBEAT: str(time.time())})
        rival.append(run.info.run_id)
        return create(self)

    monkeypatch.setattr(Slot, "create", race)
    counting = Counting()
    out = run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=counting)
    assert out["status"] == "taken" and out["run_id"] == rival[0] and counting.argvs == []
    mine = [r for r in attempts(uri, "p-s1") if r.info.run_id != rival[0]]
    assert [r.info.status for r in mine] == ["KILLED"]

    monkeypatch.setattr(Slot, "create", create)
    # the rival is live: a new runner leaves before creating anything
    assert run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=counting)["status"] == "taken"
    assert len(attempts(uri, "p-s1")) == 2 and counting.argvs == []
    # the rival's lease runs out (it died without a word): the slot is retryable
    MlflowClient(uri).set_tag(rival[0], HEARTBEAT, str(time.time() - 601))
    out = run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=counting)
    assert out["status"] == "done" and out["ran"] == ["one"] and len(counting.argvs) == 1


# ---------------------------------------------------------------- on a Ray cluster (slow)

@pytest.mark.slow
def test_a_submitted_slot_runs_once(ray_two_nodes, mlflow_server, tmp_path):
    """Submitted with the slot as its id to a two-node cluster: a second submission is refused by
    Ray; one under another id skips every stage (MLflow), and the champion alias moved once."""
    from mlflow import MlflowClient

    from cluster import jobs
    from dsl.cli import BY_NAME
    from dsl.registry.promote import read_history

    assert "pipeline" in BY_NAME, "dsl/cli.py needs the `pipeline` Command"
    uri, model = mlflow_server.uri, "dsl-dual-backbone"
    client = MlflowClient(uri)
    exp = client.create_experiment("finetune")
    scored = client.create_run(exp, tags={"dsl.backbone_name": model, "dsl.backbone_version": "1",
                                          "dsl.task": "single", "dsl.label_fraction": "0.1", "dsl.method": "dual"})
    client.log_metric(scored.info.run_id, "test_average_accuracy", 0.5)
    client.set_terminated(scored.info.run_id)
    client.create_registered_model(model)
    client.create_model_version(model, source=f"runs:/{scored.info.run_id}/model", run_id=scored.info.run_id)
    client.set_registered_model_alias(model, "candidate", "1")

    name = f"p{os.getpid()}"
    path = write(tmp_path, {"tracking_uri": uri, "claim_settle_s": 0.5, "stages": [
        {"name": "synth", "command": ["synth", "--out", str(tmp_path / "{slot}" / "raw"), "--locations", "2",
                                      "--size", "16"]},
        {"name": "ingest", "command": ["ingest", "--source", "sen12ms", "--input", str(tmp_path / "{slot}" / "raw"),
                                       "--output", str(tmp_path / "{slot}" / "shards"), "--workers", "1",
                                       "--no-progress"]},
        {"name": "promote", "command": ["promote", "--config", "configs/promote/gate.yaml",
                                        f"mlflow.tracking_uri={uri}"]}]}, name)
    argv = ["pipeline", "run", str(path), "--slot", "s1"]
    ray_head = ray_two_nodes.dashboard
    sid = jobs.submit(ray_head, argv, submission_id=f"pipeline-{name}-s1")
    with pytest.raises(RuntimeError, match="already"):
        jobs.submit(ray_head, argv, submission_id=sid)
    assert jobs.wait(ray_head, sid, timeout_s=300, poll_s=0.5) == "SUCCEEDED", jobs.logs(ray_head, sid)[-3000:]
    assert (tmp_path / "s1" / "shards" / "manifest.json").is_file()
    again = jobs.submit(ray_head, argv, submission_id=f"pipeline-{name}-s1-again")
    assert jobs.wait(ray_head, again, timeout_s=300, poll_s=0.5) == "SUCCEEDED"
    assert "every stage done already" in jobs.logs(ray_head, again)

    [run] = attempts(uri, f"{name}-s1")
    assert run.data.tags["dsl.pipeline.submission_id"] == sid
    assert run.data.tags[OUTPUT + "promote.decision"] == "promoted", run.data.tags
    assert client.get_registered_model(model).aliases["champion"] == "1"
    assert len(read_history(client, model, "champion")["log"]) == 1  # moved once



@pytest.mark.slow
def test_stages_finished_while_claiming_are_not_run_again(tmp_path, uri, monkeypatch):
    """The stages done are read again after the claim: a dying attempt may have finished one meanwhile."""
    from mlflow import MlflowClient

    path = write(tmp_path, {"claim_settle_s": 0, "stages": [
        {"name": "one", "command": synth(tmp_path / "one")}, {"name": "two", "command": synth(tmp_path / "two")}]})
    create = Slot.create

    def late(self):  # between our first read and our claim, an old attempt records stage one and ends
        old = self.client.create_run(self.experiment_id, start_time=int(time.time() * 1000) - 5000,
                                     tags={KEY: self.key, STAGE + "one": DONE})
        self.client.set_terminated(old.info.run_id, status="FAILED")
        return create(self)

    monkeypatch.setattr(Slot, "create", late)
    counting = Counting()
    out = run_pipeline(str(path), "s1", uri, say=lambda _: None, stage_runner=counting)
    assert out["ran"] == ["two"] and out["skipped"] == ["one"] and len(counting.argvs) == 1
    assert MlflowClient(uri).get_run(out["run_id"]).data.tags[STATE] == DONE


def test_an_alias_bomb_in_a_pipeline_file_is_one_line(tmp_path):
    """The pipeline file goes through the config files' reader and bounded error messages: 9**8
    leaves behind aliases are refused as values, never expanded."""
    anchors = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    anchors += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("stages:\n  - name: a\n    command: [" + ", ".join(anchors) + "]\n")
    with pytest.raises(ConfigError) as e:  # expanded, it would not end (the suite's timeout)
        load_pipeline(path)
    assert len(str(e.value).splitlines()) == 1 and str(e.value).startswith(f"{path}: ")
