"""Promotion gate, rollback and concurrent promotions on a sqlite MLflow registry.

The registry holds bare model versions (promotion never reads weights) and fine-tuning runs
tagged as ``dsl finetune`` tags them; each test works on its own copy of a template database.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures.registry import copy_registry, make_registry
from fixtures.services import REPO
from mlflow import MlflowClient

import dsl.registry.promote as promote_mod
from dsl.cli import main as cli_main
from dsl.contracts.config import PromoteConfig
from dsl.registry.promote import PromotionError, promote, read_history, rollback

pytestmark = pytest.mark.slow  # MLflow registry stores

NAME = "dsl-dual-backbone"
VERSIONS = 6


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_registry(tmp_path_factory.mktemp("promote-template"), NAME, VERSIONS)


@pytest.fixture
def uri(template, tmp_path) -> str:
    return copy_registry(template, tmp_path)


def finetuned(uri: str, version: int, *scores: float, task="single", fraction="0.1", method="dual",
              status="FINISHED", metric="test_average_accuracy") -> None:
    """One fine-tuning run per score, tagged as the fine-tuning job tags them."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("finetune").experiment_id
    for seed, s in enumerate(scores):
        run = client.create_run(exp, tags={
            "dsl.backbone_name": NAME, "dsl.backbone_version": str(version), "dsl.task": task,
            "dsl.label_fraction": fraction, "dsl.method": method, "dsl.seed": str(seed)})
        client.log_metric(run.info.run_id, metric, s)
        client.set_terminated(run.info.run_id, status=status)


def alias(uri: str, version: int, name: str = "candidate") -> None:
    MlflowClient(uri).set_registered_model_alias(NAME, name, str(version))


def champion(uri: str) -> str | None:
    version = MlflowClient(uri).get_registered_model(NAME).aliases.get("champion")
    return None if version is None else str(version)


def tags(uri: str, version: int) -> dict:
    t = MlflowClient(uri).get_model_version(NAME, str(version)).tags
    return {k.removeprefix("dsl.promotion."): v for k, v in t.items() if k.startswith("dsl.promotion.")}


def test_gate_promotes_better_and_rejects_worse_or_within_margin(uri):
    cfg = PromoteConfig(margin=0.02)
    finetuned(uri, 1, 0.60, 0.62)                       # score 0.61
    finetuned(uri, 1, 0.99, fraction="1.0")             # other fraction: ignored
    finetuned(uri, 1, 0.99, method="s2")                # other method: ignored
    finetuned(uri, 1, 0.99, status="FAILED")            # unfinished: ignored
    alias(uri, 1)
    first = promote(cfg, NAME, uri)                      # no champion yet
    assert first["decision"] == "promoted" and first["champion_score"] is None
    assert first["candidate_score"] == pytest.approx(0.61) and first["candidate_runs"] == 2
    assert champion(uri) == "1"
    t = tags(uri, 1)
    assert t["decision"] == "promoted" and t["previous_champion"] == "none" and t["champion_score"] == "none"
    assert json.loads(t["gate"]) == {"metric": "average_accuracy", "task": "single", "fraction": 0.1,
                                     "margin": 0.02, "method": "dual"}

    finetuned(uri, 2, 0.62)                              # +0.01: inside the margin
    alias(uri, 2)
    out = promote(cfg, NAME, uri)
    assert out["decision"] == "rejected" and champion(uri) == "1"
    t = tags(uri, 2)
    assert t["decision"] == "rejected" and t["previous_champion"] == "1"
    assert float(t["candidate_score"]) == pytest.approx(0.62) and float(t["champion_score"]) == pytest.approx(0.61)

    finetuned(uri, 3, 0.50)                              # worse
    alias(uri, 3)
    assert promote(cfg, NAME, uri)["decision"] == "rejected" and champion(uri) == "1"

    finetuned(uri, 4, 0.70, 0.64)                        # +0.06: beats the margin
    alias(uri, 4)
    out = promote(cfg, NAME, uri)
    assert out["decision"] == "promoted" and champion(uri) == "4" and out["previous_champion"] == "1"
    assert tags(uri, 4)["previous_champion"] == "1"
    assert promote(cfg, NAME, uri)["decision"] == "unchanged"  # already champion: nothing recorded again
    log = read_history(MlflowClient(uri), NAME, "champion")
    assert log["stack"] == ["1", "4"] and [e["action"] for e in log["log"]] == ["promote", "promote"]


def test_exactly_the_margin_is_not_enough(uri):
    """The candidate must beat the champion by MORE than the margin (binary-exact scores)."""
    cfg = PromoteConfig(margin=0.25)
    finetuned(uri, 1, 0.25, 0.75)  # mean 0.5
    alias(uri, 1)
    assert promote(cfg, NAME, uri)["decision"] == "promoted"
    finetuned(uri, 2, 0.75)  # exactly champion + margin: 0.5 + 0.25 == 0.75 in binary
    alias(uri, 2)
    out = promote(cfg, NAME, uri)
    assert (out["candidate_score"], out["champion_score"]) == (0.75, 0.5)
    assert out["decision"] == "rejected" and champion(uri) == "1"
    finetuned(uri, 3, 0.75, 0.7578125)  # mean 0.75390625: above it by 2**-8
    alias(uri, 3)
    assert promote(cfg, NAME, uri)["decision"] == "promoted" and champion(uri) == "3"


def test_missing_scores_and_aliases_are_clear_errors(uri):
    alias(uri, 1)
    with pytest.raises(PromotionError, match="no finished fine-tuning run of model .* version 1 with task=single"):
        promote(PromoteConfig(), NAME, uri)
    finetuned(uri, 1, 0.5)
    with pytest.raises(PromotionError, match="none logged metric 'test_macro_f1'"):
        promote(PromoteConfig(metric="macro_f1"), NAME, uri)
    with pytest.raises(PromotionError, match="no version with alias 'nightly'"):
        promote(PromoteConfig(from_alias="nightly"), NAME, uri)
    with pytest.raises(PromotionError, match="no experiment named 'nope'"):
        promote(PromoteConfig(experiment="nope"), NAME, uri)
    promote(PromoteConfig(), NAME, uri)
    alias(uri, 2)  # a champion without runs under a new gate cannot be compared
    finetuned(uri, 2, 0.9, task="multi")
    with pytest.raises(PromotionError, match="version 1 with task=multi"):
        promote(PromoteConfig(task="multi"), NAME, uri)


def test_rollback_walks_back_through_champions(uri):
    cfg = PromoteConfig()
    with pytest.raises(PromotionError, match="no version with alias 'champion'"):
        rollback(cfg, NAME, uri)
    for v, s in [(1, 0.5), (2, 0.6), (3, 0.7)]:
        finetuned(uri, v, s)
        alias(uri, v)
        assert promote(cfg, NAME, uri)["decision"] == "promoted"
    out = rollback(cfg, NAME, uri)
    assert out["restored"] == "2" and out["demoted"] == "3" and champion(uri) == "2"
    assert json.loads(tags(uri, 3)["rolled_back"])["restored"] == "2"
    assert json.loads(tags(uri, 2)["restored"])["replaced"] == "3"
    assert rollback(cfg, NAME, uri)["restored"] == "1" and champion(uri) == "1"
    with pytest.raises(PromotionError, match="no previous holder to roll back to"):
        rollback(cfg, NAME, uri)
    log = read_history(MlflowClient(uri), NAME, "champion")["log"]
    assert [(e["action"], e["version"], e["previous"]) for e in log][-2:] == [
        ("rollback", "2", "3"), ("rollback", "1", "2")]
    # an alias moved by hand is recorded, not lost, and a rollback returns from it
    MlflowClient(uri).set_registered_model_alias(NAME, "champion", "5")
    assert rollback(cfg, NAME, uri)["restored"] == "1"
    assert read_history(MlflowClient(uri), NAME, "champion")["log"][-2]["action"] == "external"


def check_chain(uri: str, candidates: list[int]) -> list[dict]:
    """Aliases agree with the history, and every decision saw the champion the history names."""
    client = MlflowClient(uri)
    hist = read_history(client, NAME, "champion")
    log = hist["log"]
    assert champion(uri) == log[-1]["version"] == hist["stack"][-1]
    prev = None
    for entry in log:  # each promotion replaced exactly the previous one's version
        assert entry["action"] == "promote" and entry["previous"] == prev, log
        assert tags(uri, int(entry["version"]))["previous_champion"] == (prev or "none")
        prev = entry["version"]
    assert hist["stack"] == [e["version"] for e in log]
    decisions = {v: tags(uri, v) for v in candidates}
    assert all(d["decision"] in ("promoted", "rejected") for d in decisions.values()), decisions
    promoted = [str(v) for v, d in decisions.items() if d["decision"] == "promoted"]
    assert sorted(promoted) == sorted(hist["stack"])
    for d in decisions.values():  # a rejection was judged against a champion that held then
        if d["decision"] == "rejected":
            assert d["previous_champion"] in hist["stack"]
            assert float(d["candidate_score"]) <= float(d["champion_score"])
    return log


def slow_scoring(monkeypatch, delay: float) -> None:
    """Widen the read-decide-write window so unserialised promotions would interleave."""
    original = promote_mod.score

    def slow(*args, **kwargs):
        time.sleep(delay)
        return original(*args, **kwargs)

    monkeypatch.setattr(promote_mod, "score", slow)


@pytest.mark.parametrize("lock", ["file", "registry"])
def test_concurrent_promotions_in_threads(uri, monkeypatch, lock):
    candidates = [1, 2, 3, 4, 5]
    for v in candidates:  # version v scores v/10 (the order in which they run decides the chain)
        finetuned(uri, v, v / 10)
        alias(uri, v, f"cand{v}")
    slow_scoring(monkeypatch, 0.1)
    barrier, errors = threading.Barrier(len(candidates)), []

    def run(v: int) -> None:
        cfg = PromoteConfig(from_alias=f"cand{v}", lock=lock, lock_settle_s=0.2, lock_timeout_s=60)
        barrier.wait()
        try:
            promote(cfg, NAME, uri)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(v,)) for v in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    log = check_chain(uri, candidates)
    assert log[0]["previous"] is None and champion(uri) == "5"  # the best wins in any order
    assert "dsl.lock.champion" not in MlflowClient(uri).get_registered_model(NAME).tags  # released


WORKER = """
import sys, time
from pathlib import Path
import dsl.registry.promote as p
original = p.score
def slow(*a, **k):
    time.sleep(0.5)
    return original(*a, **k)
p.score = slow
from dsl.cli import main
ready, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(ready / me).touch()
while len(list(ready.iterdir())) < n:  # start together: both decide while the other does
    time.sleep(0.01)
sys.exit(main(sys.argv[4:]))
"""


def test_concurrent_promotions_in_processes(uri, tmp_path):
    for v, s in [(1, 0.3), (2, 0.5)]:
        finetuned(uri, v, s)
        alias(uri, v, f"cand{v}")
    (tmp_path / "ready").mkdir()
    config = tmp_path / "gate.yaml"
    config.write_text(f"promote: {{margin: 0.0}}\nmlflow: {{tracking_uri: '{uri}', registered_model: {NAME}}}\n")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "ready"), str(v), "2", "promote",
                               "--config", str(config), f"promote.from_alias=cand{v}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for v in (1, 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(json.loads(o)["candidate"] for o, _ in outs) == ["1", "2"]
    check_chain(uri, [1, 2])
    # version 2 is the better: whatever the order, it ends as champion
    assert champion(uri) == "2"
    assert (Path(uri.removeprefix("sqlite:///") + ".dsl-promote.lock")).exists()


def test_cli_promote_and_rollback(uri, tmp_path, capsys):
    config = tmp_path / "gate.yaml"
    text = (REPO / "configs" / "promote" / "gate.yaml").read_text()
    config.write_text(text.replace("sqlite:///work/mlflow.db", uri))
    finetuned(uri, 1, 0.5)
    finetuned(uri, 2, 0.8)
    alias(uri, 1)
    assert cli_main(["promote", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "promoted"
    alias(uri, 2)
    assert cli_main(["promote", "--config", str(config), "promote.margin=0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "rejected"
    assert cli_main(["promote", "--config", str(config)]) == 0 and champion(uri) == "2"
    assert cli_main(["rollback", "--config", str(config)]) == 0 and champion(uri) == "1"
    assert cli_main(["rollback", "--config", str(config)]) == 1
    assert "no previous holder" in capsys.readouterr().err
    assert cli_main(["promote", "--config", str(config), "promote.marg=1"]) == 2
    assert "did you mean 'margin'" in capsys.readouterr().err
