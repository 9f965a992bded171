"""Hypothesis fuzzing of the config loader (issue 10): ``configs/*.yaml`` plus ``key=value``.

Whatever the file or the overrides hold (any YAML document: nested mappings and lists, keys
that are ints, null or unicode, huge integers, NaN/inf, deep nesting, anchors and aliases up to
a "billion laughs" expansion), :func:`load_config` returns a :class:`Config` or raises a
:class:`ConfigError` (a ValueError, which every command reports as one line) naming the file or
override and the key; never another exception, never a hang (deadline 2 s), never a message of
unbounded size.

Reproducible for CI: ``derandomize=True``, no example database, ~200 examples per test.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import pytest
import yaml
from fixtures.hang import time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import event as _event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from dsl.contracts.config import Config, ConfigError, load_config

FUZZ = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# every dotted key of the tree, so generated documents reach validation, not only "unknown key"
SECTIONS = {name: list(field.annotation.model_fields) for name, field in Config.model_fields.items()}
KEYS = [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]
MAX_MESSAGE = 4000  # ten problems, each value cut to a line


def event(name: str) -> None:
    """Count an outcome in ``--hypothesis-show-statistics`` (outside a hypothesis test: nothing)."""
    try:
        _event(name)
    except InvalidArgument:
        pass


def _load(path: str | None, overrides: list[str]) -> Config | None:
    """load_config's outcome: the Config, or None for a clear ConfigError (asserted here)."""
    t0 = time.perf_counter()
    try:
        with time_limit(3, "loading"):
            cfg = load_config(path, overrides)
        event("Config")
        return cfg
    except ConfigError as e:  # any other exception type escapes and fails the test
        event("ConfigError")
        message = str(e)
        origins = [path] if path else []
        origins += [f"override '{o}'" for o in overrides]
        assert any(o in message for o in origins) or "<defaults>" in message, message
        assert 0 < len(message) < MAX_MESSAGE + sum(map(len, origins)), message[:500]
        return None
    finally:
        assert time.perf_counter() - t0 < 1.5


@pytest.fixture(scope="module")
def config_file():
    """One file rewritten per example (a module fixture: hypothesis reruns the test body)."""
    with tempfile.TemporaryDirectory(prefix="dsl-fuzz-config-") as d:
        path = os.path.join(d, "fuzz.yaml")

        def write(text: str | bytes) -> str:
            with open(path, "wb") as f:
                f.write(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
            return path
        yield write


# ----------------------------------------------------------------------------- values

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**30), 10**30), st.floats(),
    st.sampled_from([0, 1, -1, 8, 64, 2**63, -(2**63) - 1, 10**400, 1e308, float("inf"), float("-inf"), float("nan"),
                     "nan", ".nan", "inf", "-.inf", "1e400", "0x10", "0o17", "1_000", "", " ", "~", "null", "yes",
                     "s3://", "models:/m@a", "scratch", "dual", "fp16", "syncbatch", "train", "\0", "é" * 3]),
    st.text(max_size=20),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
WEIRD_KEYS = st.one_of(st.sampled_from(["", " ", "data.batch_size", "__class__", "model_config", "Data", "é"]),
                       st.integers(-2, 2), st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=6))


@st.composite
def documents(draw) -> object:
    """A config document: mostly the real sections and keys with any values, some weird keys."""
    doc: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([*SECTIONS, "data", "optim"]))
        body = doc.get(section)
        if not isinstance(body, dict):
            body = doc[section] = {}
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.one_of(st.sampled_from(SECTIONS[section]), st.sampled_from(SECTIONS[section]), WEIRD_KEYS))
            body[key] = draw(VALUES)
        if draw(st.integers(0, 9)) == 0:
            doc[section] = draw(VALUES)  # a section that is no mapping
    if draw(st.integers(0, 9)) == 0:
        doc[draw(WEIRD_KEYS)] = draw(VALUES)
    return doc if draw(st.integers(0, 19)) else draw(VALUES)  # sometimes no mapping at all


def _yaml(doc: object) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, default_flow_style=None)


def _override_value(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("\n...\n").strip()


OVERRIDE_KEYS = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"),
                          st.sampled_from([*SECTIONS, "", ".", "data.", ".data", "data..batch_size", "a.b.c.d.e"]),
                          st.text(max_size=12))
OVERRIDE_VALUES = st.one_of(
    VALUES.map(_override_value), st.text(max_size=30),
    st.sampled_from(["[", "{a: 1", "]", "'", '"', "&a [*a]", "*a", "!!python/object/apply:os.system ['true']",
                     "!!binary AAAA", "!!set {a, b}", "!!timestamp 2020-01-01", "? [a, b]: 1", "{[1]: 2}",
                     "1" * 5000, "-" + "9" * 4400, "[" * 5000 + "]" * 5000, "{a: " * 2000 + "1" + "}" * 2000,
                     "%YAML 1.1\n---\n1", "a\nb: c", "---\n---", "\t", "\x00", "\ud800"]))


@FUZZ
@given(overrides=st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", OVERRIDE_KEYS, OVERRIDE_VALUES),
                                    st.text(max_size=40)), max_size=4))
def test_arbitrary_overrides_give_a_config_or_a_config_error(overrides):
    cfg = _load(None, overrides)
    if cfg is not None:
        assert isinstance(cfg, Config)


@FUZZ
@given(doc=documents(), overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", OVERRIDE_KEYS, OVERRIDE_VALUES),
                                           max_size=2))
def test_arbitrary_documents_give_a_config_or_a_config_error(config_file, doc, overrides):
    path = config_file(_yaml(doc))
    cfg = _load(path, overrides)
    if cfg is not None and not overrides and isinstance(doc, dict):
        # every key the file sets lands as given (after pydantic's coercion), nothing silently dropped
        for section, body in doc.items():
            if isinstance(body, dict):
                for key in body:
                    assert hasattr(getattr(cfg, section), key)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_arbitrary_file_bytes_give_a_config_or_a_config_error(config_file, text):
    _load(config_file(text), [])


def _bomb(levels: int, width: int, where: str) -> str:
    """A "billion laughs" document: ``width ** levels`` leaves through aliases, at ``where``."""
    anchors = [f"&l0 [{', '.join(['lol'] * width)}]"]
    anchors += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    section, key = where.split(".")
    return f"{section}:\n  {key}: [{', '.join(anchors)}]\n"


@pytest.mark.parametrize("where", ["evaluate.label_fractions", "ingest.input", "data.s1_bands", "data.s1_range",
                                   "evaluate.methods", "finetune.backbone"])
def test_alias_bombs_are_refused_in_bounded_time(config_file, where):
    """9**9 (387 million) leaves behind aliases: validation sees the shared lists, and the
    error quotes each value cut to a line, instead of expanding it (a hang before the fix)."""
    _load(config_file(_bomb(9, 9, where)), [])
    _load(None, [f"{where}={_bomb(9, 9, where).split(': ', 1)[1].strip()}"])


def test_many_bad_items_are_summarised(config_file):
    """A 20,000-item list of bad values: ten problems listed, then how many more."""
    with pytest.raises(ConfigError) as e:
        load_config(config_file("evaluate:\n  seeds: [" + ", ".join(["x"] * 20_000) + "]\n"))
    lines = str(e.value).splitlines()
    assert len(lines) == 12 and lines[-1] == "  ... and 19990 more", lines[-2:]


@pytest.mark.parametrize("text,override,message", [
    ("1: 2\n", None, "unknown key '1'"),
    ("data: {~: 2}\n", None, "unknown key 'data.None'"),
    (b"\xff\xfe: 1\n", None, "not UTF-8 text (byte 0)"),
    ("data: 5\n", "data.batch_size=3", "'data' is a section, but the config gives it 5"),
    ("data: ab\n", "data.batch_size=3", "'data' is a section, but the config gives it 'ab'"),
    ("{}\n", "data.batch_size=" + "1" * 5000, "override 'data.batch_size=111"),
    ("{}\n", "data.s1_bands=" + "[" * 3000 + "]" * 3000, "value is not valid YAML: brackets nested 3000 deep"),
])
def test_inputs_that_raised_other_exceptions(config_file, text, override, message):
    """What this fuzzing found (TypeError, UnicodeDecodeError, plain ValueError, RecursionError
    before the fixes in load_config): each is now a ConfigError naming the file or override."""
    with pytest.raises(ConfigError) as e:
        load_config(config_file(text), [override] if override else [])
    assert message in str(e.value)
