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
"""

from __future__ import annotations

import json
import math
import time

from dsl.contracts.config import Config, PromoteConfig
from dsl.contracts.errors import JobFailed
from dsl.registry.lock import promotion_lock

TAG = "dsl.promotion."
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

    A move interrupted before its log entry was written is recorded the same way.
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


def promote(cfg: PromoteConfig, name: str, tracking_uri: str) -> dict:
    """Move ``cfg.to_alias`` to the ``cfg.from_alias`` version if it passes the gate.

    Returns:
        The decision: ``decision`` (promoted, rejected or unchanged when the candidate already
        holds the alias), ``candidate``, ``candidate_score``, ``previous_champion``,
        ``champion_score`` (None without a champion), ``gate``, ``timestamp``.

    Raises:
        PromotionError: An alias is missing or a version has no score under the gate.
        LockTimeout: Another promotion held the lock for the whole timeout.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    with _lock(client, cfg, tracking_uri, name) as lock:
        candidate = _version(client, name, cfg.from_alias)
        champion = _version(client, name, cfg.to_alias, required=False)
        hist = _reconcile(client, name, cfg.to_alias, champion)
        out = {"model": name, "candidate": candidate, "previous_champion": champion,
               "candidate_score": None, "champion_score": None, "gate": _gate(cfg), "timestamp": _now()}
        if candidate == champion:
            return {**out, "decision": "unchanged"}
        out["candidate_score"], out["candidate_runs"] = score(client, name, candidate, cfg)
        if champion is not None:
            out["champion_score"], out["champion_runs"] = score(client, name, champion, cfg)
        won = champion is None or out["candidate_score"] > out["champion_score"] + cfg.margin
        out["decision"] = "promoted" if won else "rejected"
        lock.check()
        if won:  # alias first: a crash before the log is picked up by _reconcile next time
            client.set_registered_model_alias(name, cfg.to_alias, candidate)
            hist["stack"].append(candidate)
            hist["log"].append({"action": "promote", "version": candidate, "previous": champion,
                                "time": out["timestamp"]})
            _write_history(client, name, cfg.to_alias, hist)
        tags = {"decision": out["decision"], "candidate_score": out["candidate_score"],
                "champion_score": "none" if champion is None else out["champion_score"],
                "previous_champion": champion or "none", "alias": cfg.to_alias,
                "gate": json.dumps(out["gate"]), "timestamp": out["timestamp"]}
        for k, v in tags.items():
            client.set_model_version_tag(name, candidate, TAG + k, str(v))
    return out


def rollback(cfg: PromoteConfig, name: str, tracking_uri: str) -> dict:
    """Give ``cfg.to_alias`` back to the version that held it before the current one.

    Returns:
        ``{"model", "alias", "restored", "demoted", "timestamp"}``.

    Raises:
        PromotionError: The alias is unset or has no earlier holder in its history.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    with _lock(client, cfg, tracking_uri, name) as lock:
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
        lock.check()
        client.set_registered_model_alias(name, cfg.to_alias, restored)
        hist["stack"].pop()
        now = _now()
        hist["log"].append({"action": "rollback", "version": restored, "previous": current, "time": now})
        _write_history(client, name, cfg.to_alias, hist)
        client.set_model_version_tag(name, current, TAG + "rolled_back", json.dumps(
            {"alias": cfg.to_alias, "restored": restored, "timestamp": now}))
        client.set_model_version_tag(name, restored, TAG + "restored", json.dumps(
            {"alias": cfg.to_alias, "replaced": current, "timestamp": now}))
    return {"model": name, "alias": cfg.to_alias, "restored": restored, "demoted": current, "timestamp": now}


def _print(out: dict) -> None:
    print(json.dumps(out, indent=1, default=str))


def promote_command(cfg: Config, args) -> int:
    """``dsl promote``: apply the gate of ``cfg.promote`` to ``mlflow.registered_model``."""
    _print(promote(cfg.promote, cfg.mlflow.registered_model, cfg.mlflow.tracking_uri))
    return 0


def rollback_command(cfg: Config, args) -> int:
    """``dsl rollback``: give ``promote.to_alias`` back to its previous holder."""
    _print(rollback(cfg.promote, cfg.mlflow.registered_model, cfg.mlflow.tracking_uri))
    return 0
