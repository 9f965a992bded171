"""The write-ahead transaction of ``dsl.registry.promote``, fast: killed at every write, in memory.

test_promote_crash.py kills real ``dsl promote`` processes on a sqlite store (slow); this file
does the same on :class:`fixtures.fake_registry.FakeRegistry`, with the crash hook's
``os._exit`` replaced by an exception, so every step, every recovery branch and every line said
is pinned in milliseconds (what ``make mutate`` needs).
"""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import mlflow
import pytest
from fixtures.fake_registry import NAME, URI, FakeRegistry

import dsl.registry.lock as L
import dsl.registry.promote as P
from dsl.contracts.config import PromoteConfig

PENDING = "dsl.promotion.pending.champion"
HIST = "dsl.alias_history.champion"


class Crash(BaseException):
    """The process ending at a crash point (``os._exit``), with its exit code."""


@pytest.fixture
def reg(monkeypatch) -> FakeRegistry:
    monkeypatch.setattr(mlflow, "MlflowClient", FakeRegistry)
    FakeRegistry.registries.clear()
    return FakeRegistry.create()


@pytest.fixture
def crash_at(monkeypatch):
    """``crash_at(step)``: the next write named ``step`` ends the "process" (raises Crash)."""
    env = {}

    def _exit(code):
        raise Crash(code)

    monkeypatch.setattr(P, "os", SimpleNamespace(environ=env, _exit=_exit))

    def arm(step: str | None) -> None:
        env.clear()
        if step is not None:
            env[P.CRASH_ENV] = step

    return arm


def cfg(**kw) -> PromoteConfig:
    return PromoteConfig(**{"lock_settle_s": 0.0, "lock_timeout_s": 5.0, **kw})


def history(reg) -> tuple[list, list]:
    h = json.loads(reg.model_tags[HIST])
    return h["stack"], [(e["action"], e["version"], e["previous"]) for e in h["log"]]


def tags(reg, version: int) -> dict:
    return {k.removeprefix(P.TAG): v for k, v in reg.version_tags.get(version, {}).items()}


def decision(t: dict) -> dict:
    return {k: v for k, v in t.items() if k not in ("timestamp", "gate")}


def champion_then_candidate(reg) -> None:
    """Version 1 champion (0.5), version 2 the better candidate (0.8)."""
    reg.add_run(1, 0.5)
    reg.add_run(2, 0.8)
    reg.aliases["candidate"] = 1
    assert P.promote(cfg(), NAME, URI)["decision"] == "promoted"
    reg.aliases["candidate"] = 2


def killed(fn, *args, **kw) -> None:
    with pytest.raises(Crash) as e:
        fn(*args, **kw)
    assert e.value.args == (P.CRASH_EXIT,)


PROMOTED_2 = {"decision": "promoted", "candidate_score": "0.8", "champion_score": "0.5",
              "previous_champion": "1", "alias": "champion"}
# what each crash point has written when the process dies: (tags of v2, history written, alias moved)
PROMOTE_STEPS = {
    "pending": (set(), False, False),
    "tag:decision": ({"decision"}, False, False),
    "tag:candidate_score": ({"decision", "candidate_score"}, False, False),
    "tag:champion_score": ({"decision", "candidate_score", "champion_score"}, False, False),
    "tag:previous_champion": ({"decision", "candidate_score", "champion_score", "previous_champion"}, False,
                              False),
    "tag:alias": (set(PROMOTED_2), False, False),
    "tag:gate": (set(PROMOTED_2) | {"gate"}, False, False),
    "tag:timestamp": (set(PROMOTED_2) | {"gate", "timestamp"}, False, False),
    "tags": (set(PROMOTED_2) | {"gate", "timestamp"}, False, False),
    "history": (set(PROMOTED_2) | {"gate", "timestamp"}, True, False),
    "alias": (set(PROMOTED_2) | {"gate", "timestamp"}, True, True),
}


@pytest.mark.parametrize("step", list(PROMOTE_STEPS))
def test_a_promotion_killed_after_each_write_is_completed_by_the_next(reg, crash_at, step):
    champion_then_candidate(reg)
    crash_at(step)
    killed(P.promote, cfg(), NAME, URI)
    written, hist_written, alias_moved = PROMOTE_STEPS[step]
    assert set(tags(reg, 2)) == written
    assert history(reg)[0] == (["1", "2"] if hist_written else ["1"])
    assert reg.aliases["champion"] == (2 if alias_moved else 1)
    pending = json.loads(reg.model_tags[PENDING])
    assert (pending["action"], pending["version"], pending["previous"]) == ("promote", "2", "1")
    assert pending["before"] == {"2": {P.TAG + k: None for k in set(PROMOTED_2) | {"gate", "timestamp"}}}
    assert "dsl.lock.champion" not in reg.model_tags  # the lock went with the process

    crash_at(None)
    said = []
    out = P.promote(cfg(), NAME, URI, said.append)
    assert len(said) == 1 and said[0].startswith(
        "completed the interrupted promote of version 2 to 'champion' (decided "), said
    assert said[0].endswith("): tags, history and alias now agree")
    assert out["decision"] == "unchanged" and out["recovered"] == said[0]
    assert reg.aliases["champion"] == 2 and PENDING not in reg.model_tags
    assert history(reg) == (["1", "2"], [("promote", "1", None), ("promote", "2", "1")])
    assert decision(tags(reg, 2)) == PROMOTED_2
    entry_time = json.loads(reg.model_tags[HIST])["log"][-1]["time"]
    assert tags(reg, 2)["timestamp"] == entry_time and f"(decided {entry_time})" in said[0]


def test_an_uninterrupted_promotion_leaves_no_record_and_says_nothing(reg):
    champion_then_candidate(reg)
    said = []
    out = P.promote(cfg(), NAME, URI, said.append)
    assert out["decision"] == "promoted" and "recovered" not in out and said == []
    assert PENDING not in reg.model_tags
    assert P.recover(reg, NAME, "champion") is None


@pytest.mark.parametrize("step", ["pending", "tag:alias", "history", "alias"])
def test_a_promotion_killed_is_completed_by_the_next_rollback_then_rolled_back(reg, crash_at, step):
    champion_then_candidate(reg)
    crash_at(step)
    killed(P.promote, cfg(), NAME, URI)
    crash_at(None)
    said = []
    out = P.rollback(cfg(), NAME, URI, said.append)
    assert len(said) == 1 and said[0].startswith("completed the interrupted promote of version 2")
    assert (out["restored"], out["demoted"], out["recovered"]) == ("1", "2", said[0])
    assert reg.aliases["champion"] == 1 and PENDING not in reg.model_tags
    assert history(reg) == (["1"], [("promote", "1", None), ("promote", "2", "1"), ("rollback", "1", "2")])
    assert decision(tags(reg, 2)) == {**PROMOTED_2, "rolled_back": tags(reg, 2)["rolled_back"]}


def test_a_rejection_killed_midway_is_completed(reg, crash_at):
    champion_then_candidate(reg)
    crash_at("tag:champion_score")
    killed(P.promote, cfg(margin=0.5), NAME, URI)
    assert set(tags(reg, 2)) == {"decision", "candidate_score", "champion_score"}
    crash_at(None)
    said = []
    out = P.promote(cfg(margin=0.5), NAME, URI, said.append)
    assert len(said) == 1 and said[0].startswith("completed the interrupted 'rejected' decision on version 2 "
                                                 "(decided ")
    assert f"(decided {tags(reg, 2)['timestamp']})" in said[0]
    assert out["decision"] == "rejected"
    assert decision(tags(reg, 2)) == {**PROMOTED_2, "decision": "rejected"}
    assert reg.aliases["champion"] == 1 and history(reg) == (["1"], [("promote", "1", None)])
    assert PENDING not in reg.model_tags


ROLLBACK_STEPS = ["pending", "tag:rolled_back", "tag:restored", "tags", "history", "alias"]


@pytest.mark.parametrize("step", ROLLBACK_STEPS)
def test_a_rollback_killed_after_each_write_is_completed(reg, crash_at, step):
    champion_then_candidate(reg)
    assert P.promote(cfg(), NAME, URI)["decision"] == "promoted"  # 2 is champion
    crash_at(step)
    killed(P.rollback, cfg(), NAME, URI)
    assert reg.aliases["champion"] == (1 if step == "alias" else 2)
    assert ("rolled_back" in tags(reg, 2)) == (step not in ("pending",))
    assert ("restored" in tags(reg, 1)) == (step not in ("pending", "tag:rolled_back"))
    crash_at(None)
    reg.aliases["candidate"] = 1
    said = []
    assert P.promote(cfg(), NAME, URI, said.append)["decision"] == "unchanged"
    assert len(said) == 1 and said[0].startswith("completed the interrupted rollback of version 1 to 'champion'")
    assert reg.aliases["champion"] == 1 and PENDING not in reg.model_tags
    assert history(reg) == (["1"], [("promote", "1", None), ("promote", "2", "1"), ("rollback", "1", "2")])
    rolled, restored = json.loads(tags(reg, 2)["rolled_back"]), json.loads(tags(reg, 1)["restored"])
    assert (rolled["alias"], rolled["restored"]) == ("champion", "1")
    assert (restored["alias"], restored["replaced"]) == ("champion", "2")
    assert rolled["timestamp"] == restored["timestamp"] == json.loads(reg.model_tags[HIST])["log"][-1]["time"]


def test_an_interrupted_promotion_is_rolled_back_when_the_alias_moved_meanwhile(reg, crash_at):
    champion_then_candidate(reg)
    assert P.promote(cfg(margin=0.5), NAME, URI)["decision"] == "rejected"
    rejected = tags(reg, 2)
    reg.version_tags[2]["unrelated"] = "kept"
    crash_at("history")
    killed(P.promote, cfg(), NAME, URI)
    assert tags(reg, 2)["decision"] == "promoted" and history(reg)[0] == ["1", "2"]
    reg.aliases["champion"] = 5  # moved by hand while the record was pending
    crash_at(None)
    said = []
    out = P.rollback(cfg(), NAME, URI, said.append)
    assert len(said) == 1 and said[0].startswith("rolled back the interrupted promote of version 2 to 'champion' "
                                                 "(decided ")
    assert said[0].endswith("'champion' is now held by version 5, neither 1 nor 2; its tags and history "
                            "entry undone")
    assert tags(reg, 2) == {**rejected, "unrelated": "kept"}
    assert (out["restored"], out["demoted"]) == ("1", "5") and reg.aliases["champion"] == 1
    assert history(reg) == (["1"], [("promote", "1", None), ("external", "5", "1"), ("rollback", "1", "5")])


def test_an_undone_first_decision_removes_its_tags(reg, crash_at):
    champion_then_candidate(reg)
    reg.version_tags[2] = {"unrelated": "kept"}
    crash_at("alias")
    killed(P.promote, cfg(), NAME, URI)
    assert set(tags(reg, 2)) == set(PROMOTED_2) | {"gate", "timestamp", "unrelated"}
    reg.aliases["champion"] = 4  # moved by hand
    crash_at(None)
    line = P.recover(reg, NAME, "champion")
    assert line.startswith("rolled back the interrupted promote of version 2") and "held by version 4" in line
    # tags the decision added are deleted (they had no earlier value); others stay
    assert tags(reg, 2) == {"unrelated": "kept"} and PENDING not in reg.model_tags
    assert history(reg) == (["1"], [("promote", "1", None)])


def test_an_interrupted_promotion_of_a_deleted_version_is_rolled_back(reg, crash_at):
    champion_then_candidate(reg)
    crash_at("tags")
    killed(P.promote, cfg(), NAME, URI)
    reg.delete_model_version(NAME, 2)
    crash_at(None)
    line = P.recover(reg, NAME, "champion")
    assert line.startswith("rolled back the interrupted promote of version 2 to 'champion' (decided ")
    assert line.endswith("version 2 no longer exists; its tags and history entry undone")
    assert PENDING not in reg.model_tags and reg.aliases["champion"] == 1
    assert history(reg) == (["1"], [("promote", "1", None)])


def test_an_interrupted_rollback_is_undone_when_the_alias_moved(reg, crash_at):
    champion_then_candidate(reg)
    assert P.promote(cfg(), NAME, URI)["decision"] == "promoted"  # stack [1, 2]
    crash_at("history")
    killed(P.rollback, cfg(), NAME, URI)
    assert history(reg)[0] == ["1"]
    reg.aliases["champion"] = 3
    crash_at(None)
    line = P.recover(reg, NAME, "champion")
    assert "rolled back the interrupted rollback of version 1" in line and "held by version 3, neither 2 nor 1" in line
    # the rollback's entry undone: the demoted version is back on the stack
    assert history(reg) == (["1", "2"], [("promote", "1", None), ("promote", "2", "1")])
    assert "rolled_back" not in tags(reg, 2) and "restored" not in tags(reg, 1)


def test_undoing_twice_changes_nothing_more(reg, crash_at):
    champion_then_candidate(reg)
    crash_at("history")
    killed(P.promote, cfg(), NAME, URI)
    txn = json.loads(reg.model_tags[PENDING])
    P._backward(reg, NAME, txn)
    after = (dict(reg.model_tags), {v: dict(t) for v, t in reg.version_tags.items()})
    reg.model_tags[PENDING] = json.dumps(txn)
    P._backward(reg, NAME, txn)
    assert (dict(reg.model_tags), {v: dict(t) for v, t in reg.version_tags.items()}) == after
    assert history(reg) == (["1"], [("promote", "1", None)])


def test_undoing_a_promotion_leaves_a_stack_moved_by_others_alone(reg):
    entry = {"action": "promote", "version": "2", "previous": "1", "time": "t"}
    reg.model_tags[HIST] = json.dumps({"stack": ["1", "3"], "log": [entry]})
    txn = {"action": "promote", "alias": "champion", "version": "2", "previous": "1", "tags": {},
           "before": {}, "entry": entry}
    reg.model_tags[PENDING] = "x"
    P._backward(reg, NAME, txn)
    assert json.loads(reg.model_tags[HIST]) == {"stack": ["1", "3"], "log": []}


def test_history_step_applies_an_entry_once():
    entry = {"action": "promote", "version": "2", "previous": "1", "time": "t"}
    txn = {"action": "promote", "version": "2", "entry": entry}
    hist = P._history_step({"stack": ["1"], "log": []}, txn)
    assert hist == {"stack": ["1", "2"], "log": [entry]}
    assert P._history_step(hist, txn) == {"stack": ["1", "2"], "log": [entry]}
    back = {"action": "rollback", "version": "1", "entry": {**entry, "action": "rollback"}}
    assert P._history_step({"stack": ["1", "2"], "log": [entry]}, back)["stack"] == ["1"]
    assert P._history_step({"stack": [], "log": []}, back) == {"stack": [], "log": [back["entry"]]}


def good_record(**kw) -> dict:
    return {"action": "promote", "alias": "champion", "version": "2", "previous": "1", "tags": {}, "before": {},
            "entry": None, **kw}


@pytest.mark.parametrize("value", [
    "{not json", "[1, 2]", "3", json.dumps({"action": "promote"}),
    json.dumps(good_record(action="delete")), json.dumps(good_record(alias="gold")),
    json.dumps(good_record(tags=[])), json.dumps(good_record(before="x")),
    json.dumps({k: v for k, v in good_record().items() if k != "entry"}),
    "{" + "x" * 300,  # the message quotes the first 200 characters
])
def test_a_garbled_pending_record_is_one_clear_error(reg, value):
    reg.model_tags[PENDING] = value
    with pytest.raises(P.PromotionError) as e:
        P.recover(reg, NAME, "champion")
    assert str(e.value) == (f"model '{NAME}': tag '{PENDING}' is not a pending promotion record: "
                            f"{value[:200]!r}; check the alias and its history, then delete the tag")


def test_a_good_record_is_read_back_as_written(reg):
    for action in ("promote", "rollback"):
        reg.model_tags[PENDING] = json.dumps(good_record(action=action, extra=1))
        assert P._read_pending(reg, NAME, "champion") == good_record(action=action, extra=1)
    reg.model_tags[PENDING] = ""
    assert P._read_pending(reg, NAME, "champion") is None


def test_the_record_holds_the_values_it_replaces(reg):
    reg.version_tags[2] = {"a": "old", "other": "x"}
    txn = P._txn(reg, NAME, "champion", "promote", "2", "1", {"2": {"a": "new", "b": "new"}}, None)
    assert txn == {"action": "promote", "alias": "champion", "version": "2", "previous": "1",
                   "tags": {"2": {"a": "new", "b": "new"}}, "before": {"2": {"a": "old", "b": None}}, "entry": None}
    assert P._pending_key("gold") == "dsl.promotion.pending.gold"


def test_exists_tells_a_missing_version_from_other_errors(reg):
    assert P._exists(reg, NAME, "2") and not P._exists(reg, NAME, "99")

    class Denied(FakeRegistry):
        def get_model_version(self, name, version):
            raise mlflow.exceptions.MlflowException("no", mlflow.protos.databricks_pb2.PERMISSION_DENIED)

    with pytest.raises(mlflow.exceptions.MlflowException, match="no"):
        P._exists(object.__new__(Denied), NAME, "1")


def test_the_crash_hook_fires_only_at_its_step(monkeypatch):
    calls = []
    monkeypatch.setattr(P, "os", SimpleNamespace(environ={P.CRASH_ENV: "history"}, _exit=calls.append))
    P._crash_point("alias")
    assert calls == []
    P._crash_point("history")
    assert calls == [86] and P.CRASH_EXIT == 86
    assert P.os is not os


# ---------------------------------------------------------------- a busy store, and the commands' lines


def test_every_store_call_of_a_promotion_waits_out_a_busy_store(reg, monkeypatch):
    monkeypatch.setattr(L, "RETRY_FIRST_S", 0.001)
    champion_then_candidate(reg)
    busy = {"n": 0}
    real = FakeRegistry.set_registered_model_alias

    def sometimes_busy(self, *a):
        busy["n"] += 1
        if busy["n"] <= 2:
            raise RuntimeError("database is locked")
        return real(self, *a)

    monkeypatch.setattr(FakeRegistry, "set_registered_model_alias", sometimes_busy)
    said = []
    assert P.promote(cfg(), NAME, URI, said.append)["decision"] == "promoted"
    assert reg.aliases["champion"] == 2 and busy["n"] == 3
    assert len(said) == 2 and all("retrying set_registered_model_alias in" in s for s in said)
    assert said[0].startswith(f"tracking store {URI} busy or unreachable (database is locked)")


def test_a_store_that_stays_busy_ends_the_promotion_with_one_line(reg, monkeypatch):
    monkeypatch.setattr(L, "RETRY_FIRST_S", 0.01)
    champion_then_candidate(reg)

    def always_busy(self, *a):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(FakeRegistry, "get_model_version_by_alias", always_busy)
    with pytest.raises(L.StoreUnavailable, match=r"limit 0.05s; get_model_version_by_alias: database is locked"):
        P.promote(cfg(lock_timeout_s=0.05), NAME, URI)


def busy_at_first_open(monkeypatch) -> dict:
    """Opening the store fails once as busy, then works; returns the count of openings."""
    monkeypatch.setattr(L, "RETRY_FIRST_S", 0.001)
    opened = {"n": 0}

    def opening(uri):
        opened["n"] += 1
        if opened["n"] == 1:
            raise RuntimeError("database is locked")
        return FakeRegistry.registries[uri]

    monkeypatch.setattr(mlflow, "MlflowClient", opening)
    return opened


def test_opening_the_store_waits_out_a_busy_one(reg, monkeypatch):
    opened = busy_at_first_open(monkeypatch)
    said = []
    raw, client = P._connect(cfg(), URI, said.append)
    assert raw is reg and opened["n"] == 2 and "retrying opening the store" in said[0]
    assert said[0].startswith(f"tracking store {URI} busy or unreachable")
    assert isinstance(client, P._Store) and client.get_registered_model(NAME).tags == {}


def test_the_commands_say_their_name_and_quiet_the_store_s_tracebacks(capsys):
    logger = logging.getLogger("mlflow.store.db.utils")
    before = logger.level
    try:
        P._say("rollback")("one line")
        assert capsys.readouterr().err == "dsl rollback: one line\n"
        assert logger.level == logging.CRITICAL
    finally:
        logger.setLevel(before)


@pytest.mark.parametrize("command", ["promote", "rollback"])
def test_the_commands_print_the_result_and_say_a_recovery_on_stderr(reg, crash_at, capsys, command):
    from dsl.contracts.config import load_config

    champion_then_candidate(reg)
    crash_at("history")
    killed(P.promote, cfg(), NAME, URI)
    crash_at(None)
    capsys.readouterr()
    config = load_config(None, [f"mlflow.tracking_uri={URI}", f"mlflow.registered_model={NAME}",
                                "promote.lock_settle_s=0"])
    run = P.promote_command if command == "promote" else P.rollback_command
    assert run(config, None) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert err.splitlines() == [f"dsl {command}: {result['recovered']}"]
    assert result["recovered"].startswith("completed the interrupted promote of version 2")
    assert reg.aliases["champion"] == (2 if command == "promote" else 1)


def test_undoing_a_promotion_pops_only_its_own_version_off_a_longer_stack(reg):
    entry = {"action": "promote", "version": "3", "previous": "2", "time": "t"}
    reg.model_tags[HIST] = json.dumps({"stack": ["1", "2", "3"], "log": [entry]})
    txn = {"action": "promote", "alias": "champion", "version": "3", "previous": "2", "tags": {},
           "before": {}, "entry": entry}
    reg.model_tags[PENDING] = "x"
    P._backward(reg, NAME, txn)
    assert json.loads(reg.model_tags[HIST]) == {"stack": ["1", "2"], "log": []}


def test_a_promotion_records_a_move_made_by_hand_before_deciding(reg):
    champion_then_candidate(reg)
    reg.add_run(3, 0.1)
    reg.aliases["champion"] = 3  # moved by hand, outside promote/rollback
    assert P.promote(cfg(), NAME, URI)["decision"] == "promoted"
    assert history(reg) == (["1", "3", "2"], [("promote", "1", None), ("external", "3", "1"), ("promote", "2", "3")])
    assert not [k for k in reg.model_tags if k.startswith("dsl.alias_history.") and k != HIST]


def test_a_rollback_says_nothing_unless_it_recovered_and_says_its_waits(reg, monkeypatch):
    champion_then_candidate(reg)
    assert P.promote(cfg(), NAME, URI)["decision"] == "promoted"
    busy_at_first_open(monkeypatch)
    said = []
    out = P.rollback(cfg(), NAME, URI, said.append)
    assert (out["restored"], out["demoted"]) == ("1", "2") and "recovered" not in out
    assert len(said) == 1 and "retrying opening the store" in said[0]


@pytest.mark.parametrize("step", ["pending", "tags", "history"])
def test_a_first_promotion_killed_before_the_alias_existed_is_completed(reg, crash_at, step):
    reg.add_run(1, 0.5)
    reg.aliases["candidate"] = 1
    crash_at(step)
    killed(P.promote, cfg(), NAME, URI)
    assert "champion" not in reg.aliases
    crash_at(None)
    line = P.recover(reg, NAME, "champion")
    assert line.startswith("completed the interrupted promote of version 1 to 'champion'")
    assert reg.aliases["champion"] == 1 and PENDING not in reg.model_tags
    assert history(reg) == (["1"], [("promote", "1", None)])
