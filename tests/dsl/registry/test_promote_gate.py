"""The promotion gate and rollback of ``dsl.registry.promote`` on an in-memory registry (fast).

``test_promote.py`` runs the same decisions on a real sqlite MLflow (slow); this file swaps
``mlflow.MlflowClient`` for :class:`fixtures.fake_registry.FakeRegistry` (MLflow's behaviour as
promote relies on it). So every branch, message and tag of the gate is pinned here in
milliseconds, which is what ``make mutate`` needs.
"""

from __future__ import annotations

import json
import re
import time

import mlflow
import pytest
from fixtures.fake_registry import NAME, URI, FakeRegistry
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    PERMISSION_DENIED,
)

import dsl.registry.promote as P
from dsl.contracts.config import Config, PromoteConfig
from dsl.registry.lock import LockTimeout

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture
def reg(monkeypatch) -> FakeRegistry:
    monkeypatch.setattr(mlflow, "MlflowClient", FakeRegistry)
    FakeRegistry.registries.clear()
    return FakeRegistry.create()


def cfg(**kw) -> PromoteConfig:
    return PromoteConfig(**{"lock_settle_s": 0.0, "lock_timeout_s": 5.0, **kw})


def history(reg: FakeRegistry, alias: str = "champion") -> dict:
    return json.loads(reg.model_tags[f"dsl.alias_history.{alias}"])


def vtags(reg: FakeRegistry, version: int) -> dict:
    return {k.removeprefix("dsl.promotion."): v for k, v in reg.version_tags.get(version, {}).items()}


# ---------------------------------------------------------------- the gate


def test_first_promotion_takes_the_alias_and_records_everything(reg):
    reg.add_run(1, 0.5)
    reg.add_run(1, 0.75, exp="2")  # runs of every experiment count, across pages
    reg.aliases["candidate"] = 1
    out = P.promote(cfg(), NAME, URI)
    assert STAMP.match(out.pop("timestamp"))
    assert out == {"model": NAME, "candidate": "1", "previous_champion": None, "candidate_score": 0.625,
                   "champion_score": None, "candidate_runs": 2, "decision": "promoted",
                   "gate": {"metric": "average_accuracy", "task": "single", "fraction": 0.1, "margin": 0.0,
                            "method": "dual"}}
    assert reg.aliases["champion"] == 1
    t = vtags(reg, 1)
    assert STAMP.match(t.pop("timestamp"))
    assert t == {"decision": "promoted", "candidate_score": "0.625", "champion_score": "none",
                 "previous_champion": "none", "alias": "champion",
                 "gate": json.dumps({"metric": "average_accuracy", "task": "single", "fraction": 0.1,
                                     "margin": 0.0, "method": "dual"})}
    hist = history(reg)
    assert hist["stack"] == ["1"] and len(hist["log"]) == 1
    entry = hist["log"][0]
    assert STAMP.match(entry.pop("time"))
    assert entry == {"action": "promote", "version": "1", "previous": None}
    assert "dsl.lock.champion" not in reg.model_tags  # the lease was released


def test_only_matching_finished_runs_count(reg):
    reg.add_run(1, 0.5)
    reg.add_run(1, 0.1, fraction="0.10")           # the same fraction written differently: counts
    reg.add_run(1, 0.9, fraction="1.0")            # another fraction
    reg.add_run(1, 0.9, fraction="0.1000002")      # close, but not within 1e-6
    reg.add_run(1, 0.3, fraction="0.10000005")     # within 1e-6: the same fraction
    reg.add_run(1, 0.9, fraction="lots")           # not a number
    reg.add_run(1, 0.9, fraction=None)             # no fraction tag
    reg.add_run(1, 0.9, method="s2")
    reg.add_run(1, 0.9, task="multi")
    reg.add_run(1, 0.9, status="FAILED")
    reg.add_run(1, 0.9, name="other-model")
    reg.add_run(2, 0.9)                            # another version
    reg.add_run(1, 0.9, metric="test_macro_f1")    # another metric: matches, logs nothing scored
    assert P.score(reg, NAME, "1", cfg()) == (pytest.approx(0.3), 3)
    assert P.score(reg, NAME, "1", cfg(metric="macro_f1")) == (0.9, 1)


def test_score_reads_one_experiment_when_named(reg):
    reg.add_run(1, 0.5, exp="1")
    reg.add_run(1, 0.25, exp="2")
    assert P.score(reg, NAME, "1", cfg(experiment="exp2")) == (0.25, 1)
    with pytest.raises(P.PromotionError) as e:
        P.score(reg, NAME, "1", cfg(experiment="exp0"))
    assert str(e.value) == ("no finished fine-tuning run of model 'dsl-dual-backbone' version 1 with task=single, "
                            "label_fraction=0.1, method=dual in experiment 'exp0': fine-tune and evaluate it first")
    with pytest.raises(P.PromotionError) as e:
        P.score(reg, NAME, "1", cfg(experiment="nope"))
    assert str(e.value) == "promote.experiment: no experiment named 'nope'"


def test_score_errors_name_what_is_missing(reg):
    with pytest.raises(P.PromotionError) as e:
        P.score(reg, NAME, "3", cfg(task="multi", label_fraction=0.5, method="s1"))
    assert str(e.value) == ("no finished fine-tuning run of model 'dsl-dual-backbone' version 3 with task=multi, "
                            "label_fraction=0.5, method=s1 in any experiment: fine-tune and evaluate it first")
    reg.add_run(3, None)
    reg.add_run(3, 0.5, metric="test_micro_f1")
    with pytest.raises(P.PromotionError) as e:
        P.score(reg, NAME, "3", cfg())
    assert str(e.value) == ("2 matching run(s) of model 'dsl-dual-backbone' version 3 but none logged metric "
                            "'test_average_accuracy' (promote.metric=average_accuracy)")
    with pytest.raises(P.PromotionError) as e:
        P.score(reg, "it's", "1", cfg())
    assert str(e.value) == "registered model name \"it's\" contains a quote; rename it to promote"
    reg.experiments.clear()  # no experiment at all: nothing to search, no run
    with pytest.raises(P.PromotionError, match="^no finished fine-tuning run"):
        P.score(reg, NAME, "3", cfg())


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "decision"),
    [(0.75, 0.5, 0.25, "rejected"),    # exactly the margin is not more than it
     (0.75, 0.5, 0.125, "promoted"),
     (0.5, 0.5, 0.0, "rejected"),      # a tie never takes the alias
     (0.625, 0.5, 0.0, "promoted"),
     (0.375, 0.5, 0.0, "rejected"),
     (0.5, 0.625, 0.25, "rejected")],  # worse, and a margin that a wrong sign would turn around
)
def test_the_candidate_must_beat_the_champion_by_more_than_the_margin(reg, candidate, champion, margin, decision):
    reg.add_run(4, champion)
    reg.add_run(5, candidate)
    reg.aliases.update(champion=4, candidate=5)
    reg.model_tags["dsl.alias_history.champion"] = json.dumps({"stack": ["4"], "log": []})
    out = P.promote(cfg(margin=margin), NAME, URI)
    assert (out["decision"], out["previous_champion"], out["candidate_score"], out["champion_score"]) == (
        decision, "4", candidate, champion)
    assert out["candidate_runs"] == out["champion_runs"] == 1
    assert reg.aliases["champion"] == (5 if decision == "promoted" else 4)
    t = vtags(reg, 5)
    assert (t["decision"], t["previous_champion"], t["candidate_score"], t["champion_score"]) == (
        decision, "4", str(candidate), str(champion))
    hist = history(reg)
    if decision == "promoted":
        assert hist["stack"] == ["4", "5"] and [(e["action"], e["version"], e["previous"]) for e in hist["log"]] == [
            ("promote", "5", "4")]
    else:
        assert hist == {"stack": ["4"], "log": []}
        assert reg.tag_writes.count("dsl.alias_history.champion") == 0  # nothing moved: nothing logged


def test_holding_the_alias_already_is_unchanged_and_writes_nothing(reg):
    reg.aliases.update(champion=2, candidate=2)
    reg.model_tags["dsl.alias_history.champion"] = json.dumps({"stack": ["2"], "log": []})
    out = P.promote(cfg(), NAME, URI)  # no run at all: nothing is scored
    assert STAMP.match(out.pop("timestamp"))
    assert out == {"model": NAME, "candidate": "2", "previous_champion": "2", "candidate_score": None,
                   "champion_score": None, "decision": "unchanged",
                   "gate": {"metric": "average_accuracy", "task": "single", "fraction": 0.1, "margin": 0.0,
                            "method": "dual"}}
    assert reg.version_tags == {} and history(reg) == {"stack": ["2"], "log": []}


def test_missing_aliases_are_clear_errors(reg):
    with pytest.raises(P.PromotionError) as e:
        P.promote(cfg(from_alias="nightly"), NAME, URI)
    assert str(e.value) == ("registered model 'dsl-dual-backbone' has no version with alias 'nightly': "
                            "Registered model alias nightly not found.")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(P.PromotionError) as e:
        P.rollback(cfg(), NAME, URI)
    assert str(e.value) == ("registered model 'dsl-dual-backbone' has no version with alias 'champion': "
                            "Registered model alias champion not found.")


def test_version_lookup_tolerates_only_a_missing_alias_or_model(reg):
    reg.aliases["candidate"] = 3
    assert P._version(reg, NAME, "candidate") == "3"
    assert P._version(reg, NAME, "champion", required=False) is None            # INVALID_PARAMETER_VALUE
    assert P._version(reg, "gone", "champion", required=False) is None          # RESOURCE_DOES_NOT_EXIST

    class Denied:
        def get_model_version_by_alias(self, name, alias):
            raise MlflowException("not allowed", PERMISSION_DENIED)

    with pytest.raises(P.PromotionError) as e:
        P._version(Denied(), NAME, "champion", required=False)
    assert str(e.value) == "registered model 'dsl-dual-backbone' has no version with alias 'champion': not allowed"


def test_timestamps_are_utc(monkeypatch):
    monkeypatch.setattr(time, "gmtime", lambda *_: time.struct_time((2001, 2, 3, 4, 5, 6, 5, 34, 0)))
    assert P._now() == "2001-02-03T04:05:06Z"


def test_experiments_follow_every_page(reg):
    assert P._experiments(reg, cfg()) == ["0", "1", "2"]
    assert P._experiments(reg, cfg(experiment="exp1")) == ["1"]


# ---------------------------------------------------------------- history and rollback


def test_rollback_walks_back_and_tags_both_versions(reg):
    for v, s in [(1, 0.5), (2, 0.625), (3, 0.75)]:
        reg.add_run(v, s)
        reg.aliases["candidate"] = v
        assert P.promote(cfg(), NAME, URI)["decision"] == "promoted"
    out = P.rollback(cfg(), NAME, URI)
    assert STAMP.match(out["timestamp"])
    assert out == {"model": NAME, "alias": "champion", "restored": "2", "demoted": "3", "timestamp": out["timestamp"]}
    assert reg.aliases["champion"] == 2
    assert json.loads(vtags(reg, 3)["rolled_back"]) == {"alias": "champion", "restored": "2",
                                                        "timestamp": out["timestamp"]}
    assert json.loads(vtags(reg, 2)["restored"]) == {"alias": "champion", "replaced": "3",
                                                     "timestamp": out["timestamp"]}
    hist = history(reg)
    assert hist["stack"] == ["1", "2"]
    assert hist["log"][-1] == {"action": "rollback", "version": "2", "previous": "3", "time": out["timestamp"]}
    assert P.rollback(cfg(), NAME, URI)["restored"] == "1"  # exactly two on the stack: one more step
    with pytest.raises(P.PromotionError) as e:
        P.rollback(cfg(), NAME, URI)
    assert str(e.value) == ("model 'dsl-dual-backbone': alias 'champion' (version 1) has no previous holder to "
                            "roll back to (history: ['1'])")
    assert "dsl.lock.champion" not in reg.model_tags


def test_rollback_to_a_deleted_version_is_refused(reg):
    reg.aliases["champion"] = 2
    reg.model_tags["dsl.alias_history.champion"] = json.dumps({"stack": ["6", "2"], "log": []})
    reg.versions.discard(6)
    with pytest.raises(P.PromotionError) as e:
        P.rollback(cfg(), NAME, URI)
    assert str(e.value) == ("model 'dsl-dual-backbone': cannot restore version 6 to alias 'champion': "
                            "Model Version (name=dsl-dual-backbone, version=6) not found")
    assert reg.aliases["champion"] == 2 and history(reg)["stack"] == ["6", "2"]


def test_read_history_accepts_only_a_stack_and_a_log(reg):
    assert P.read_history(reg, NAME, "champion") == {"stack": [], "log": []}
    reg.model_tags["dsl.alias_history.champion"] = ""
    assert P.read_history(reg, NAME, "champion") == {"stack": [], "log": []}
    good = {"stack": ["1"], "log": [{"action": "promote"}]}
    reg.model_tags["dsl.alias_history.champion"] = json.dumps(good)
    assert P.read_history(reg, NAME, "champion") == good
    for bad in ["x" * 300, "[1, 2]", '{"stack": [], "log": {}}', '{"stack": 1, "log": []}', '{"log": []}',
                '{"stack": []}']:
        reg.model_tags["dsl.alias_history.champion"] = bad
        with pytest.raises(P.PromotionError) as e:
            P.read_history(reg, NAME, "champion")
        assert str(e.value) == ("model 'dsl-dual-backbone': tag 'dsl.alias_history.champion' is not a history "
                                f"({{'stack', 'log'}}): {bad[:200]!r}")


def test_reconcile_records_moves_made_elsewhere(reg):
    assert P._reconcile(reg, NAME, "champion", None) == {"stack": [], "log": []}
    assert reg.tag_writes == []  # nothing held, nothing known: nothing to record
    hist = P._reconcile(reg, NAME, "champion", "3")  # set by hand
    assert hist["stack"] == ["3"] and history(reg) == hist
    assert [(e["action"], e["version"], e["previous"]) for e in hist["log"]] == [("external", "3", None)]
    assert STAMP.match(hist["log"][0]["time"])
    assert P._reconcile(reg, NAME, "champion", "3") == hist and len(reg.tag_writes) == 1  # in step
    hist = P._reconcile(reg, NAME, "champion", None)  # alias deleted by hand: the stack is void
    assert hist["stack"] == [] and hist["log"][-1]["action"] == "external"
    assert (hist["log"][-1]["version"], hist["log"][-1]["previous"]) == (None, "3")


def test_history_keeps_the_last_champions_and_the_newest_log_within_the_limit(reg):
    stack = [str(v) for v in range(150)]
    P._write_history(reg, NAME, "champion", {"stack": stack, "log": []})
    assert history(reg)["stack"] == stack[-100:]
    # a log that fits exactly in LOG_CHARS once its two oldest entries are dropped
    log = [{"n": i, "pad": ""} for i in range(60)]
    hist = {"stack": ["1"], "log": log}
    kept = {"stack": ["1"], "log": log[2:]}
    log[2]["pad"] = "x" * (P.LOG_CHARS - len(json.dumps(kept)))
    assert len(json.dumps(kept)) == P.LOG_CHARS
    P._write_history(reg, NAME, "champion", hist)
    assert history(reg) == kept
    big = {"stack": ["1"] * 1000, "log": []}  # nothing left to drop: the stack is still capped
    P._write_history(reg, NAME, "champion", big)
    assert history(reg) == {"stack": ["1"] * 100, "log": []}


# ---------------------------------------------------------------- locks and commands


def test_promotion_holds_the_registry_lock_of_its_alias_while_deciding(reg, monkeypatch):
    reg.add_run(1, 0.5)
    reg.aliases["candidate"] = 1
    seen = []
    score = P.score

    def spy(client, name, version, c):
        seen.append(json.loads(reg.model_tags["dsl.lock.gold"]))
        return score(client, name, version, c)

    monkeypatch.setattr(P, "score", spy)
    made, promotion_lock = [], P.promotion_lock

    def lock_spy(*args):
        made.append(args)
        return promotion_lock(*args)

    monkeypatch.setattr(P, "promotion_lock", lock_spy)
    t0 = time.time()
    assert P.promote(cfg(to_alias="gold", lock_ttl_s=30.0), NAME, URI)["decision"] == "promoted"
    assert made == [(reg, URI, NAME, "gold", "auto", 5.0, 30.0, 0.0)]
    assert len(seen) == 1 and seen[0]["owner"].count(":") == 2
    assert t0 + 29 < seen[0]["expires"] < t0 + 60
    assert reg.aliases["gold"] == 1 and "dsl.lock.gold" not in reg.model_tags


def test_a_promotion_that_lost_its_lease_writes_nothing(reg, monkeypatch):
    reg.add_run(1, 0.5)
    reg.aliases["candidate"] = 1
    score = P.score

    def taken_over(*args):
        reg.model_tags["dsl.lock.champion"] = json.dumps({"owner": "someone else", "expires": 1e12})
        return score(*args)

    monkeypatch.setattr(P, "score", taken_over)
    with pytest.raises(LockTimeout, match="someone else"):
        P.promote(cfg(), NAME, URI)
    assert "champion" not in reg.aliases and reg.version_tags == {}


def test_a_local_store_uses_the_file_lock(reg, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    FakeRegistry.registries[uri] = reg
    reg.add_run(1, 0.5)
    reg.aliases["candidate"] = 1
    assert P.promote(cfg(), NAME, uri)["decision"] == "promoted"
    assert (tmp_path / "mlflow.db.dsl-promote.lock").exists() and "dsl.lock.champion" not in reg.tag_writes
    with pytest.raises(ValueError, match="promote.lock=file needs a local sqlite or file store"):
        P.promote(cfg(lock="file"), NAME, URI)


def test_commands_print_the_decision_as_json(reg, capsys):
    reg.add_run(1, 0.5)
    reg.add_run(2, 0.75)
    reg.aliases["candidate"] = 1
    config = Config.model_validate({"mlflow": {"tracking_uri": URI, "registered_model": NAME},
                                    "promote": {"lock_settle_s": 0.0}})
    assert P.promote_command(config, None) == 0
    text = capsys.readouterr().out
    out = json.loads(text)
    assert out["decision"] == "promoted" and text == json.dumps(out, indent=1, default=str) + "\n"
    reg.aliases["candidate"] = 2
    assert P.promote_command(config, None) == 0
    assert json.loads(capsys.readouterr().out)["previous_champion"] == "1"
    assert P.rollback_command(config, None) == 0
    text = capsys.readouterr().out
    out = json.loads(text)
    assert (out["restored"], out["demoted"]) == ("1", "2") and text == json.dumps(out, indent=1) + "\n"
