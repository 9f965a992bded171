"""The typed pipeline file ``configs/pipelines/<name>.yaml``: ``dsl`` stages run in order per slot.

A pipeline is a list of stages, each a ``dsl`` command line (the words after ``dsl``)::

    tracking_uri: http://mlflow.internal:5000    # where each slot's stages are recorded
    stages:
      - name: ingest
        command: [ingest, --config, configs/ingest/stac.yaml, --output, "s3://bucket/day-{slot}"]
      - name: pretrain
        command: [pretrain, --config, configs/pretrain/paper.yaml, "data.shards=s3://bucket/day-{slot}"]
      - name: finetune
        command: [finetune, --config, configs/finetune/dfc2020_paper.yaml,
                  "finetune.backbone=models:/dsl-resnet18-sen12ms/{pretrain.model_version}"]

Placeholders in a command's words: ``{slot}`` (the slot id), ``{pipeline}`` (the pipeline's
name) and ``{<stage>.<key>}``: a key of the JSON object an *earlier* stage printed last (``dsl
pretrain`` prints ``model_version``, ``dsl promote`` its decision). ``{{`` and ``}}`` are
literal braces (a YAML flow mapping in an override). Anything else in braces is an error at
load time naming the file, the stage and the word, so a typo never reaches a run.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dsl.contracts.config import ConfigError, read_yaml
from dsl.contracts.documents import describe

# Stage names end up in MLflow tag keys (dsl.pipeline.stage.<name>) and in placeholders.
STAGE_NAME = r"^[a-z][a-z0-9_]*$"
# Slot ids and pipeline names end up in run names, tag values searched for, and Ray submission
# ids: no quotes, spaces or slashes.
SLOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
BUILTINS = ("slot", "pipeline")
_OUTPUT_REF = re.compile(r"^([a-z][a-z0-9_]*)\.([A-Za-z0-9_]+)$")


class Stage(BaseModel):
    """One stage: a name (unique in the pipeline) and the ``dsl`` command line it runs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=STAGE_NAME, description="lower-case letters, digits, _")
    command: list[str] = Field(min_length=1, description="the dsl command line after 'dsl'")

    @field_validator("command", mode="before")
    @classmethod
    def _words(cls, value: Any) -> Any:
        # YAML reads `--locations, 2` as the int 2; a command line is words, so numbers are
        # taken as written (a bool is refused: `true` would come back as "True")
        if isinstance(value, list):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        return value


class Pipeline(BaseModel):
    """A pipeline file: where slots are recorded, the claim's timing and the stages."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    tracking_uri: str | None = Field(None, description="MLflow store of the slot records; "
                                     "`--tracking-uri` overrides it")
    experiment: str = Field("dsl-pipelines", min_length=1)
    claim_settle_s: float = Field(2.0, ge=0, description="wait between creating the slot's attempt run "
                                  "and reading the contenders back (longer than one MLflow request)")
    heartbeat_s: float = Field(30.0, gt=0, description="a running attempt refreshes its lease this often")
    lease_s: float = Field(600.0, gt=0, description="an attempt silent this long is dead: the slot is "
                           "retryable")
    stages: list[Stage] = Field(min_length=1)


def placeholders(word: str) -> list[str]:
    """The placeholder names in ``word`` (``{{``/``}}`` are literal braces).

    Raises:
        ValueError: Unbalanced braces, or a conversion/format spec (``{slot!r}``, ``{slot:>3}``).
    """
    names = []
    for _, field, spec, conversion in string.Formatter().parse(word):
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f"placeholder '{{{field}...}}' takes no format spec or conversion")
        names.append(field)
    return names


def substitute(word: str, values: dict[str, str]) -> str:
    """``word`` with each placeholder replaced by ``values[name]``.

    Raises:
        KeyError: A placeholder without a value (its name).
    """
    out = []
    for literal, field, _, _ in string.Formatter().parse(word):
        out.append(literal)
        if field is not None:
            out.append(values[field])
    return "".join(out)


def _check_placeholders(p: Pipeline, origin: str) -> None:
    earlier: set[str] = set()
    for i, stage in enumerate(p.stages):
        if stage.name in earlier:
            raise ConfigError(f"{origin}: stages[{i}].name: '{stage.name}' is used by an earlier stage")
        for j, word in enumerate(stage.command):
            where = f"{origin}: stages[{i}].command[{j}] ({stage.name}: {word!r})"
            try:
                names = placeholders(word)
            except ValueError as e:
                raise ConfigError(f"{where}: {e} (write {{{{ and }}}} for literal braces)") from None
            for name in names:
                ref = _OUTPUT_REF.match(name)
                if name in BUILTINS or (ref and ref.group(1) in earlier):
                    continue
                if ref:
                    raise ConfigError(f"{where}: '{{{name}}}' refers to stage '{ref.group(1)}', which is not "
                                      f"an earlier stage (earlier: {', '.join(sorted(earlier)) or 'none'})")
                raise ConfigError(f"{where}: unknown placeholder '{{{name}}}'; use {{slot}}, {{pipeline}}, "
                                  "{<earlier stage>.<key>} or {{ }} for literal braces")
        if stage.command[0] == "pipeline":
            raise ConfigError(f"{origin}: stages[{i}].command[0]: a stage cannot run a pipeline")
        earlier.add(stage.name)


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline file.

    Raises:
        ConfigError: Unreadable, not YAML, an unknown or missing key, a bad value, a duplicate stage
            name or a bad placeholder; one line naming the file and the key.
    """
    raw = read_yaml(path, "pipeline")  # the config files' safe reader (alias bombs, depth)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with 'stages'")
    try:
        p = Pipeline.model_validate(raw)
    except ValidationError as e:
        # "extra_forbidden" reads "Extra inputs are not permitted"; say which keys exist
        problems = describe(e).replace("Extra inputs are not permitted", "unknown key")
        raise ConfigError(f"{path}: {problems}") from None
    if p.lease_s <= 2 * p.heartbeat_s:
        raise ConfigError(f"{path}: lease_s ({p.lease_s:g}) must exceed 2 x heartbeat_s ({p.heartbeat_s:g}), "
                          "else a live attempt looks dead between two heartbeats")
    _check_placeholders(p, str(path))
    return p


def check_id(value: str, what: str) -> str:
    """``value`` if it is a valid slot id / pipeline name, else a :class:`ConfigError` naming ``what``."""
    if not SLOT_ID.match(value):
        raise ConfigError(f"{what} {value!r}: use letters, digits, '.', '_' and '-' (at most 100, not "
                          "starting with a punctuation mark)")
    return value
