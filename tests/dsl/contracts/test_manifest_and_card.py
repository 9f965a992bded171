"""The typed on-disk contracts: manifest.json and model.json, their versions and their errors."""

from __future__ import annotations

import json

import pytest

from dsl.contracts.config import LossConfig, ModelConfig
from dsl.contracts.manifest import Manifest, parse_manifest, read_manifest
from dsl.contracts.model_card import CARD_VERSION, ModelCard, load_card, parse_card
from dsl.contracts.shard_format import FORMAT_VERSION, MANIFEST

MANIFEST_DOC = {
    "format_version": FORMAT_VERSION,
    "shards": [{"name": "pairs-000000.tar", "split": None, "samples": 3, "bytes": 10, "sha256": "ab"}],
    "bands": {"s1": ["VV", "VH"], "s2": ["B2"]},
    "stats": {"s1": {"VV": {"mean": -10.0, "std": 2.0}, "VH": {"mean": -17.0, "std": 3.0}},
              "s2": {"B2": {"mean": 900.0, "std": 100.0, "p99": 2000.0}}},
    "samples": 3,
    "a_later_field": {"kept": True},
}


def test_manifest_round_trip_keeps_unknown_fields(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps(MANIFEST_DOC))
    m = read_manifest(str(tmp_path))
    assert isinstance(m, Manifest) and m.shards[0].samples == 3 and m.stats.s2["B2"].p99 == 2000.0
    assert json.loads(m.to_json())["a_later_field"] == {"kept": True}


@pytest.mark.parametrize("version, message", [
    (FORMAT_VERSION + 1, f"format_version {FORMAT_VERSION + 1} is newer than this DSL reads"),
    (0, "format_version 0 is not a DSL shard format"),
])
def test_manifest_of_unknown_version_is_refused(version, message):
    with pytest.raises(ValueError, match=f"s3://b/manifest.json: .*{message}"):
        parse_manifest(json.dumps({**MANIFEST_DOC, "format_version": version}), "s3://b/manifest.json")


def test_manifest_errors_name_the_key():
    doc = {**MANIFEST_DOC, "shards": [{"name": "a.tar", "split": None, "samples": "many"}]}
    with pytest.raises(ValueError, match=r"m.json: shards.0.samples: .*'many'"):
        parse_manifest(json.dumps(doc), "m.json")
    with pytest.raises(ValueError, match="m.json: missing key 'format_version'"):
        parse_manifest(json.dumps({k: v for k, v in MANIFEST_DOC.items() if k != "format_version"}), "m.json")


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "a/../../b.tar", "./a.tar", "a\\b.tar", "a//b.tar"])
def test_shard_names_outside_the_dataset_are_refused(name):
    doc = {**MANIFEST_DOC, "shards": [{"name": name, "split": None, "samples": 1}]}
    with pytest.raises(ValueError, match=r"m.json: shards.0.name: .*is not a relative path inside the dataset"):
        parse_manifest(json.dumps(doc), "m.json")
    ok = {**MANIFEST_DOC, "shards": [{"name": "ab12/pairs-000001.tar", "split": None, "samples": 1}]}
    assert parse_manifest(json.dumps(ok), "m.json").shards[0].name == "ab12/pairs-000001.tar"  # hashed folder


def _card(**changes) -> dict:
    card = ModelCard(model=ModelConfig(), loss=LossConfig(), s1_chans=2, s2_chans=1, img_size=32,
                     band_names={"s1": ["VV", "VH"], "s2": ["B2"]}, normalisation="manifest",
                     stats=MANIFEST_DOC["stats"]).model_dump(mode="json")
    return {**card, **changes}


def test_model_card_versions(tmp_path):
    assert parse_card(json.dumps(_card()), "x").format_version == CARD_VERSION
    legacy = _card()
    del legacy["format_version"]  # cards written before the field existed are version 1
    assert parse_card(json.dumps(legacy), "x").format_version == 1
    with pytest.raises(ValueError, match=r"model.json: format_version: .*upgrade DSL"):
        parse_card(json.dumps(_card(format_version=CARD_VERSION + 1)), "model.json")
    (tmp_path / "model.json").write_text(json.dumps(_card(s1_chans="two")))
    with pytest.raises(ValueError, match=r"model.json: s1_chans: "):
        load_card(tmp_path)
    with pytest.raises(ValueError, match="not a DSL weights folder"):
        load_card(tmp_path / "nowhere")
