"""Promotion gate and rollback: move an alias (``candidate`` -> ``champion``) on evidence only.

A version's score is the mean of ``test_<metric>`` over its finished fine-tuning runs tagged
``dsl.backbone_name``/``dsl.backbone_version`` with the gate's ``dsl.task``,
``dsl.label_fraction`` and ``dsl.method``. The candidate takes the alias when there is no
champion yet, or when its score beats the champion's by more than the margin.

Every decision is recorded on the candidate version (``dsl.promotion.*`` tags), and every alias
move in the registered-model tag ``dsl.alias_history.<alias>``: JSON ``{"stack": [versions],
"log": [entries]}``. A promotion pushes onto the stack, a rollback pops it, so repeated
rollbacks walk back through earlier champions. The read-decide-write runs under
:func:`dsl.registry.lock.promotion_lock`, so concurrent promotions cannot lose an update.

A decision is written as one recoverable transaction (write-ahead), in this order:

1. ``pending``: the registered-model tag ``dsl.promotion.pending.<alias>`` with every write to
   come (decision tags, history entry, alias move) and the tag values they replace;
2. ``tag:<key>`` each decision tag, then ``tags``; 3. ``history``; 4. ``alias``;
5. the pending tag is deleted.

A promotion or rollback killed anywhere in between leaves the pending tag; the next ``dsl
promote`` or ``dsl rollback`` of that alias finds it (under the lock) before anything else and
completes it (every step is idempotent) while the alias is still held by the version it was
taken from or already by the new one, else (the alias was moved by hand meanwhile, or the new
version is gone) rolls it back: the history entry and the decision tags are undone. Either way
it says so in one line. Every registry call is retried while the store is busy or unreachable
(:func:`dsl.registry.lock.store_call`, for at most ``promote.lock_timeout_s``).

Test-only fault hook: with ``DSL_TEST_CRASH_AT=<step>`` (a step name above, e.g. ``history``)
the process ends with ``os._exit(CRASH_EXIT)`` right after that write, as a kill would end it.
Nothing but ``tests/dsl/registry/test_promote_crash.py`` sets it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from dsl.contracts.config import Config, PromoteConfig
from dsl.contracts.errors import JobFailed
from dsl.registry.lock import promotion_lock, store_call

TAG = "dsl.promotion."
PENDING = "dsl.promotion.pending."
CRASH_ENV = "DSL_TEST_CRASH_AT"  # test-only fault hook (module docstring)
CRASH_EXIT = 86
LOG_CHARS = 4000  # the sqlite store keeps registered-model tag values up to 5000 characters
STACK = 100


class PromotionError(JobFailed):
    """A promotion or rollback cannot be decided; the message says what is missing."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _version(client, name: str, alias: str, required: bool = True) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if not required and e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise PromotionError(f"registered model '{name}' has no version with alias '{alias}': {e.message}") from None


def _experiments(client, cfg: PromoteConfig) -> list[str]:
    if cfg.experiment:
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise PromotionError(f"promote.experiment: no experiment named '{cfg.experiment}'")
        return [exp.experiment_id]
    ids, token = [], None
    while True:
        page = client.search_experiments(page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def score(client, name: str, version: str, cfg: PromoteConfig) -> tuple[float, int]:
    """Mean ``test_<metric>`` of the version's matching finished runs, and how many there are.

    Raises:
        PromotionError: No finished run matches the gate, or none logged the metric.
    """
    filt = (f"tags.`dsl.backbone_name` = '{name}' and tags.`dsl.backbone_version` = '{version}' "
            f"and tags.`dsl.task` = '{cfg.task}' and tags.`dsl.method` = '{cfg.method}' "
            "and attributes.status = 'FINISHED'")
    if "'" in name:  # it goes into a quoted filter string
        raise PromotionError(f"registered model name {name!r} contains a quote; rename it to promote")
    experiments = _experiments(client, cfg)
    runs, token = [], None
    while experiments:
        page = client.search_runs(experiments, filt, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break

    def fraction(run) -> float:
        try:
            return float(run.data.tags.get("dsl.label_fraction", "nan"))
        except ValueError:
            return math.nan

    # compared as numbers: "0.1" and "0.10" are the same fraction
    runs = [r for r in runs if math.isclose(fraction(r), cfg.label_fraction, rel_tol=1e-6)]
    key = f"test_{cfg.metric}"
    values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
    where = f"experiment '{cfg.experiment}'" if cfg.experiment else "any experiment"
    if not runs:
        raise PromotionError(
            f"no finished fine-tuning run of model '{name}' version {version} with task={cfg.task}, "
            f"label_fraction={cfg.label_fraction}, method={cfg.method} in {where}: fine-tune and "
            "evaluate it first")
    if not values:
        raise PromotionError(f"{len(runs)} matching run(s) of model '{name}' version {version} but none "
                             f"logged metric '{key}' (promote.metric={cfg.metric})")
    return sum(values) / len(values), len(values)


def _history_key(alias: str) -> str:
    return f"dsl.alias_history.{alias}"


def read_history(client, name: str, alias: str) -> dict:
    """``{"stack": [...], "log": [...]}`` of ``alias`` (empty when it never moved)."""
    value = client.get_registered_model(name).tags.get(_history_key(alias))
    if not value:
        return {"stack": [], "log": []}
    try:
        hist = json.loads(value)
    except ValueError:
        hist = None
    if not (isinstance(hist, dict) and isinstance(hist.get("stack"), list) and isinstance(hist.get("log"), list)):
        raise PromotionError(f"model '{name}': tag '{_history_key(alias)}' is not a history "
                             f"({{'stack', 'log'}}): {value[:200]!r}")
    return hist


def _write_history(client, name: str, alias: str, hist: dict) -> None:
    # the log is for people: drop its oldest entries so the tag fits the store's limit; a
    # rollback never needs to go back further than STACK champions
    hist["stack"] = hist["stack"][-STACK:]
    while len(json.dumps(hist)) > LOG_CHARS and hist["log"]:
        hist["log"].pop(0)
    client.set_registered_model_tag(name, _history_key(alias), json.dumps(hist))


def _reconcile(client, name: str, alias: str, holder: str | None) -> dict:
    """Return the alias history, recording a move made outside promote/rollback as ``external``.

    A transaction's own move is never seen here: :func:`recover` finishes it first.
    """
    hist = read_history(client, name, alias)
    top = hist["stack"][-1] if hist["stack"] else None
    if holder != top:
        hist["log"].append({"action": "external", "version": holder, "previous": top, "time": _now()})
        hist["stack"] = hist["stack"] + [holder] if holder is not None else []
        _write_history(client, name, alias, hist)
    return hist


def _gate(cfg: PromoteConfig) -> dict:
    return {"metric": cfg.metric, "task": cfg.task, "fraction": cfg.label_fraction,
            "margin": cfg.margin, "method": cfg.method}


def _lock(client, cfg: PromoteConfig, tracking_uri: str, name: str):
    return promotion_lock(client, tracking_uri, name, cfg.to_alias, cfg.lock, cfg.lock_timeout_s,
                          cfg.lock_ttl_s, cfg.lock_settle_s)


def _crash_point(step: str) -> None:
    """Test-only: end the process here, as a kill would, when ``DSL_TEST_CRASH_AT`` names ``step``."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(CRASH_EXIT)


class _Store:
    """An ``MlflowClient`` whose every call is retried while the store is busy or unreachable."""

    def __init__(self, client, tracking_uri: str, bound_s: float, say=None):
        self._client, self._uri, self._bound, self._say = client, tracking_uri, bound_s, say

    def __getattr__(self, attr: str):
        fn = getattr(self._client, attr)

        def call(*args, **kwargs):
            return store_call(lambda: fn(*args, **kwargs), self._uri, self._bound, attr, self._say)

        return call


def _connect(cfg: PromoteConfig, tracking_uri: str, say) -> tuple[object, _Store]:
    """The plain client (for the lock) and the retrying one (for everything else)."""
    from mlflow import MlflowClient

    # opening a sqlite store reads its schema: that too waits while another writer holds it
    client = store_call(lambda: MlflowClient(tracking_uri), tracking_uri, cfg.lock_timeout_s,
                        "opening the store", say)
    return client, _Store(client, tracking_uri, cfg.lock_timeout_s, say)


# ---------------------------------------------------------------- the transaction


def _pending_key(alias: str) -> str:
    return PENDING + alias


def _txn(client, name: str, alias: str, action: str, version: str, previous: str | None,
         tags: dict[str, dict[str, str]], entry: dict | None) -> dict:
    """The pending record of a decision: what it writes and the tag values it replaces."""
    before = {}
    for v, kv in tags.items():
        old = client.get_model_version(name, v).tags
        before[v] = {k: old.get(k) for k in kv}
    return {"action": action, "alias": alias, "version": version, "previous": previous,
            "tags": tags, "before": before, "entry": entry}


def _history_step(hist: dict, txn: dict) -> dict:
    """``hist`` with the transaction's entry applied (it is applied at most once)."""
    if hist["log"] and hist["log"][-1] == txn["entry"]:
        return hist
    if txn["action"] == "promote":
        hist["stack"].append(txn["version"])
    elif hist["stack"]:
        hist["stack"].pop()
    hist["log"].append(txn["entry"])
    return hist


def _forward(client, name: str, txn: dict) -> None:
    """Write the transaction's decision tags, history entry and alias; clear its record.

    Each step writes fixed values, so running it again after a crash changes nothing.
    """
    alias = txn["alias"]
    for v, kv in txn["tags"].items():
        for k, value in kv.items():
            client.set_model_version_tag(name, v, k, value)
            _crash_point(f"tag:{k.removeprefix(TAG)}")
    _crash_point("tags")
    if txn["entry"] is not None:
        _write_history(client, name, alias, _history_step(read_history(client, name, alias), txn))
        _crash_point("history")
        client.set_registered_model_alias(name, alias, txn["version"])
        _crash_point("alias")
    client.delete_registered_model_tag(name, _pending_key(alias))


def _commit(client, name: str, txn: dict) -> None:
    """Write-ahead: the pending record first, then every write it names."""
    client.set_registered_model_tag(name, _pending_key(txn["alias"]), json.dumps(txn))
    _crash_point("pending")
    _forward(client, name, txn)


def _backward(client, name: str, txn: dict) -> None:
    """Undo what the transaction wrote (history entry, decision tags) and clear its record."""
    alias = txn["alias"]
    hist = read_history(client, name, alias)
    if txn["entry"] is not None and hist["log"] and hist["log"][-1] == txn["entry"]:
        hist["log"].pop()
        if txn["action"] == "promote":
            if hist["stack"] and hist["stack"][-1] == txn["version"]:
                hist["stack"].pop()
        elif txn["previous"] is not None:
            hist["stack"].append(txn["previous"])
        _write_history(client, name, alias, hist)
    for v, kv in txn["before"].items():
        if not _exists(client, name, v):
            continue  # deleted: nothing of it left to undo
        for k, old in kv.items():
            if old is not None:
                client.set_model_version_tag(name, v, k, old)
            elif k in client.get_model_version(name, v).tags:
                client.delete_model_version_tag(name, v, k)
    client.delete_registered_model_tag(name, _pending_key(alias))


def _exists(client, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _read_pending(client, name: str, alias: str) -> dict | None:
    value = client.get_registered_model(name).tags.get(_pending_key(alias))
    if not value:
        return None
    try:
        txn = json.loads(value)
    except ValueError:
        txn = None
    keys = {"action", "alias", "version", "previous", "tags", "before", "entry"}
    if not (isinstance(txn, dict) and keys <= txn.keys() and txn["action"] in ("promote", "rollback")
            and txn["alias"] == alias and isinstance(txn["tags"], dict) and isinstance(txn["before"], dict)):
        raise PromotionError(f"model '{name}': tag '{_pending_key(alias)}' is not a pending promotion "
                             f"record: {value[:200]!r}; check the alias and its history, then delete the tag")
    return txn


def recover(client, name: str, alias: str) -> str | None:
    """Complete or roll back an interrupted promotion/rollback of ``alias``; one line on what.

    Completed while the alias is held by the version it was taken from, or already by the new
    one (the move is still the decision made under the lock); rolled back when it was moved
    elsewhere meanwhile or the new version is gone. Runs under the promotion lock.

    Returns:
        What was done, or None when nothing was pending.

    Raises:
        PromotionError: The pending tag is not a record written by this module.
    """
    txn = _read_pending(client, name, alias)
    if txn is None:
        return None
    holder = _version(client, name, alias, required=False)
    what = (f"{txn['action']} of version {txn['version']} to '{alias}'" if txn["entry"] is not None
            else f"'{txn['tags'][txn['version']].get(TAG + 'decision')}' decision on version {txn['version']}")
    when = txn["entry"]["time"] if txn["entry"] else txn["tags"][txn["version"]].get(TAG + "timestamp")
    moves = txn["entry"] is not None
    if (not moves or holder in (txn["previous"], txn["version"])) and _exists(client, name, txn["version"]):
        _forward(client, name, txn)
        return f"completed the interrupted {what} (decided {when}): tags, history and alias now agree"
    _backward(client, name, txn)
    why = (f"'{alias}' is now held by version {holder}, neither {txn['previous']} nor {txn['version']}"
           if _exists(client, name, txn["version"]) else f"version {txn['version']} no longer exists")
    return f"rolled back the interrupted {what} (decided {when}): {why}; its tags and history entry undone"


# ---------------------------------------------------------------- promote and rollback


def promote(cfg: PromoteConfig, name: str, tracking_uri: str, say=None) -> dict:
    """Move ``cfg.to_alias`` to the ``cfg.from_alias`` version if it passes the gate.

    Args:
        cfg: The gate, aliases and lock.
        name: Registered model.
        tracking_uri: MLflow tracking URI.
        say: Called with one line for an interrupted transaction found and finished, and before
            each wait for a busy store (None: quiet).

    Returns:
        The decision: ``decision`` (promoted, rejected or unchanged when the candidate already
        holds the alias), ``candidate``, ``candidate_score``, ``previous_champion``,
        ``champion_score`` (None without a champion), ``gate``, ``timestamp``; ``recovered``
        (the line said) when an interrupted transaction was finished first.

    Raises:
        PromotionError: An alias is missing or a version has no score under the gate.
        LockTimeout: Another promotion held the lock for the whole timeout.
        StoreUnavailable: The store stayed busy or unreachable for ``cfg.lock_timeout_s``.
        StoreReadOnly: The store refused a write.
    """
    raw, client = _connect(cfg, tracking_uri, say)
    with _lock(raw, cfg, tracking_uri, name) as lock:
        recovered = recover(client, name, cfg.to_alias)
        if recovered and say is not None:
            say(recovered)
        candidate = _version(client, name, cfg.from_alias)
        champion = _version(client, name, cfg.to_alias, required=False)
        _reconcile(client, name, cfg.to_alias, champion)
        out = {"model": name, "candidate": candidate, "previous_champion": champion,
               "candidate_score": None, "champion_score": None, "gate": _gate(cfg), "timestamp": _now()}
        if recovered:
            out["recovered"] = recovered
        if candidate == champion:
            return {**out, "decision": "unchanged"}
        out["candidate_score"], out["candidate_runs"] = score(client, name, candidate, cfg)
        if champion is not None:
            out["champion_score"], out["champion_runs"] = score(client, name, champion, cfg)
        won = champion is None or out["candidate_score"] > out["champion_score"] + cfg.margin
        out["decision"] = "promoted" if won else "rejected"
        tags = {"decision": out["decision"], "candidate_score": out["candidate_score"],
                "champion_score": "none" if champion is None else out["champion_score"],
                "previous_champion": champion or "none", "alias": cfg.to_alias,
                "gate": json.dumps(out["gate"]), "timestamp": out["timestamp"]}
        entry = None
        if won:
            entry = {"action": "promote", "version": candidate, "previous": champion,
                     "time": out["timestamp"]}
        txn = _txn(client, name, cfg.to_alias, "promote", candidate, champion,
                   {candidate: {TAG + k: str(v) for k, v in tags.items()}}, entry)
        lock.check()
        _commit(client, name, txn)
    return out


def rollback(cfg: PromoteConfig, name: str, tracking_uri: str, say=None) -> dict:
    """Give ``cfg.to_alias`` back to the version that held it before the current one.

    Args:
        cfg: The aliases and lock.
        name: Registered model.
        tracking_uri: MLflow tracking URI.
        say: As for :func:`promote`.

    Returns:
        ``{"model", "alias", "restored", "demoted", "timestamp"}``, and ``recovered`` as for
        :func:`promote`.

    Raises:
        PromotionError: The alias is unset or has no earlier holder in its history.
    """
    raw, client = _connect(cfg, tracking_uri, say)
    with _lock(raw, cfg, tracking_uri, name) as lock:
        recovered = recover(client, name, cfg.to_alias)
        if recovered and say is not None:
            say(recovered)
        current = _version(client, name, cfg.to_alias)
        hist = _reconcile(client, name, cfg.to_alias, current)
        if len(hist["stack"]) < 2:
            raise PromotionError(f"model '{name}': alias '{cfg.to_alias}' (version {current}) has no "
                                 f"previous holder to roll back to (history: {hist['stack']})")
        restored = hist["stack"][-2]
        try:
            client.get_model_version(name, restored)
        except Exception as e:  # deleted since it was champion
            raise PromotionError(f"model '{name}': cannot restore version {restored} to alias "
                                 f"'{cfg.to_alias}': {e}") from None
        now = _now()
        tags = {current: {TAG + "rolled_back": json.dumps(
                    {"alias": cfg.to_alias, "restored": restored, "timestamp": now})},
                restored: {TAG + "restored": json.dumps(
                    {"alias": cfg.to_alias, "replaced": current, "timestamp": now})}}
        entry = {"action": "rollback", "version": restored, "previous": current, "time": now}
        txn = _txn(client, name, cfg.to_alias, "rollback", restored, current, tags, entry)
        lock.check()
        _commit(client, name, txn)
    out = {"model": name, "alias": cfg.to_alias, "restored": restored, "demoted": current, "timestamp": now}
    return {**out, "recovered": recovered} if recovered else out


def _print(out: dict) -> None:
    print(json.dumps(out, indent=1, default=str))


def _say(command: str):
    # the sqlite store logs a full traceback for every busy or read-only answer before it
    # raises; the command reports it in one line (or waits it out) instead
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

    def say(line: str) -> None:
        print(f"dsl {command}: {line}", file=sys.stderr, flush=True)

    return say


def promote_command(cfg: Config, args) -> int:
    """``dsl promote``: apply the gate of ``cfg.promote`` to ``mlflow.registered_model``."""
    _print(promote(cfg.promote, cfg.mlflow.registered_model, cfg.mlflow.tracking_uri, _say("promote")))
    return 0


def rollback_command(cfg: Config, args) -> int:
    """``dsl rollback``: give ``promote.to_alias`` back to its previous holder."""
    _print(rollback(cfg.promote, cfg.mlflow.registered_model, cfg.mlflow.tracking_uri, _say("rollback")))
    return 0
