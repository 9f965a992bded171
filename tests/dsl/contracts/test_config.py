"""The typed config tree: files, overrides, and errors that name the key."""

from __future__ import annotations

import pytest
from fixtures.services import REPO

from dsl.contracts.config import ConfigError, dump_config, flatten, load_config

# the config tree's files; configs/pipelines/ holds pipeline files (tests/dsl/test_pipeline.py)
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "pipelines" not in p.parts)


def test_defaults_and_typed_overrides():
    cfg = load_config(None, ["data.batch_size=32", "model.s1_backbone=resnet50", "data.s2_bands=[1,2,3]",
                             "scale.address=null", "ingest.output=s3://bucket/x"])
    assert cfg.data.batch_size == 32 and cfg.model.s1_backbone == "resnet50"
    assert cfg.data.s2_bands == [1, 2, 3] and cfg.scale.address is None
    assert cfg.ingest.output == "s3://bucket/x"
    assert flatten(dump_config(cfg))["data.batch_size"] == 32


def test_file_then_overrides(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("data:\n  batch_size: 16\n  crop_size: 64\nloss:\n  temperature: 0.2\n")
    cfg = load_config(f, ["loss.temperature=0.5"])
    assert (cfg.data.batch_size, cfg.data.crop_size, cfg.loss.temperature) == (16, 64, 0.5)


@pytest.mark.parametrize(
    "text,match",
    [
        ("data:\n  batch_sise: 4\n", r"x.yaml: unknown key 'data.batch_sise' \(did you mean 'batch_size'\?\)"),
        ("dat:\n  batch_size: 4\n", r"unknown key 'dat' \(did you mean 'data'\?\)"),
        ("data:\n  batch_size: -4\n", r"data.batch_size: Input should be greater than or equal to 1"),
        ("loss:\n  name: simsiam\n", r"loss.name: Input should be"),
        ("data:\n  crop_size: 100\n", r"crop_size must be a multiple of 8"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("data: [\n", r"not valid YAML"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, text, match):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f)


@pytest.mark.parametrize("override,match", [("data.nope=1", "unknown key 'data.nope'"), ("batch_size", "not of the form"),
                                            ("optim.lr=abc", "optim.lr")])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_is_valid(path):
    load_config(path)


def test_fp16_on_cpu_is_refused_before_any_worker_starts():
    with pytest.raises(ConfigError, match="deepspeed.precision fp16 needs GPUs"):
        load_config(None, ["deepspeed.precision=fp16"])
    assert load_config(None, ["deepspeed.precision=fp16", "scale.use_gpu=true"]).deepspeed.precision == "fp16"
    assert load_config(None, ["deepspeed.precision=bf16"]).deepspeed.precision == "bf16"


def test_syncbatch_needs_gpus():
    with pytest.raises(ConfigError, match="model.norm syncbatch needs GPUs"):
        load_config(None, ["model.norm=syncbatch"])
    assert load_config(None, ["model.norm=syncbatch", "scale.use_gpu=true"]).model.norm == "syncbatch"


@pytest.mark.parametrize("text, expected", [
    ("https://user:tok@host:5000/x", "https://user:***@host:5000/x"),
    ("postgresql+psycopg2://ml:p%40ss@db/mlflow", "postgresql+psycopg2://ml:***@db/mlflow"),
    ("['s3://a/b', 'https://u:p@h/s']", "['s3://a/b', 'https://u:***@h/s']"),
    ("https://user@host/x", "https://user@host/x"),
    ("http://127.0.0.1:5000/api", "http://127.0.0.1:5000/api"),
    ("sqlite:///tmp/a:b@c.db", "sqlite:///tmp/a:b@c.db"),
])
def test_url_passwords_are_redacted(text, expected):
    from dsl.contracts.config import redact_credentials

    assert redact_credentials(text) == expected
