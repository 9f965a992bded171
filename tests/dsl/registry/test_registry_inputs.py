"""Crafted registry content: every bad ``model.json`` and ``model.safetensors`` is one clear error.

Each case is a model version folder with one thing wrong, loaded through the real load path
(:func:`dsl.registry.load_backbones` on a ``file://`` URI: MLflow's download into a temporary
``dsl-model-*`` copy, which must be gone afterwards), some through a real sqlite MLflow registry
and some through the ``dsl`` CLI (one line, exit 2, no traceback). The error is a ``ValueError``
naming the model URI and what is wrong, raised before the model is built.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsl.contracts.config import LossConfig, ModelConfig
from dsl.contracts.model_card import MAX_CARD_BYTES, MODEL_CARD, WEIGHTS, ModelCard, save_weights
from dsl.models.dual import build_model
from dsl.registry import load_backbones, register_backbones

S2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
TRACKING = "sqlite:///unused.db"  # file:// URIs never reach the tracking store
MODEL = ModelConfig(backbone="test_resnet", norm="group")


def _card(**changes) -> dict:
    card = {"model": MODEL.model_dump(mode="json"), "loss": LossConfig().model_dump(mode="json"),
            "s1_chans": 2, "s2_chans": 13, "img_size": 32, "s1_bands": None, "s2_bands": None,
            "band_names": {"s1": ["VV", "VH"], "s2": S2}, "normalisation": "manifest",
            "stats": {"s1": {b: {"mean": 0.0, "std": 1.0} for b in ("VV", "VH")},
                      "s2": {b: {"mean": 0.0, "std": 1.0} for b in S2}}}
    return {**card, **changes}


def _state(s1_chans: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(MODEL, LossConfig(), s1_chans, 13, img_size=32).state_dict()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "backbone"
    folder.mkdir()
    save_weights(folder, _state(), ModelCard.model_validate(_card()))
    return folder


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _header_file(header: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if claimed is None else claimed) + header


def _f32(state: dict) -> dict:
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def _safetensors(state: dict) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, f"{tmp}/w")
        return Path(f"{tmp}/w").read_bytes()


def _poisoned(value: float) -> bytes:
    state = _f32(_state())
    state["s2_head.net.0.weight"].view(-1)[7] = value
    return _safetensors(state)


def _card_text(**changes) -> str:
    return json.dumps(_card(**changes))


def _model(**changes) -> dict:
    return {**MODEL.model_dump(mode="json"), **changes}


# (id, model.json text or None to keep the good one, what the error says)
CARDS: list[tuple[str, str | bytes, str]] = [
    ("s1_chans_200000", _card_text(s1_chans=200_000), r"s1_chans: Input should be less than or equal to 64"),
    ("s1_chans_1e7", _card_text(s1_chans=10_000_000), r"s1_chans: Input should be less than or equal to 64"),
    ("s2_chans_0", _card_text(s2_chans=0), r"s2_chans: Input should be greater than or equal to 1"),
    ("img_size_huge", _card_text(img_size=1_000_000), r"img_size: Input should be less than or equal to 2048"),
    ("proj_dim_huge", _card_text(model=_model(proj_dim=10**6)), r"model.proj_dim 1000000 is above 65536"),
    ("proj_hidden_huge", _card_text(model=_model(proj_hidden_dim=2**40)), r"model.proj_hidden_dim \d+ is above"),
    ("unknown_backbone", _card_text(model=_model(backbone="resnet_9000")),
     r"model.backbone 'resnet_9000' is not a model DSL can build"),
    ("hub_backbone", _card_text(model=_model(s1_backbone="hf-hub:timm/resnet18.a1_in1k")),
     r"model.s1_backbone 'hf-hub:timm/resnet18.a1_in1k' is not a model DSL can build"),
    ("top_level_list", "[1, 2, 3]", r"top level must be an object, got list"),
    ("top_level_string", '"model"', r"top level must be an object, got str"),
    ("top_level_null", "null", r"top level must be an object, got NoneType"),
    ("string_for_chans", _card_text(s1_chans="2"), r"s1_chans: Input should be a valid integer"),
    ("string_for_img_size", _card_text(img_size="32"), r"img_size: Input should be a valid integer"),
    ("string_for_proj_dim", _card_text(model=_model(proj_dim="128")), r"model.proj_dim: Input should be a valid"),
    ("string_for_temperature", _card_text(loss={**LossConfig().model_dump(mode="json"), "temperature": "0.07"}),
     r"loss.temperature: Input should be a valid number"),
    ("float_for_chans", _card_text(s1_chans=2.5), r"s1_chans: Input should be a valid integer"),
    ("bool_for_chans", _card_text(s1_chans=True), r"s1_chans: Input should be a valid integer"),
    ("nested_top_level", _nested(100_000), r"JSON nested too deeply to parse"),
    ("nested_in_key", '{"stats": ' + _nested(50_000) + "}", r"JSON nested too deeply to parse"),
    ("nested_shallow_extra_key", _card_text(extra=json.loads(_nested(500))), r"extra: Extra inputs are not permitted"),
    ("not_json", '{"s1_chans": 2', r"not valid JSON"),
    ("not_utf8", b"\xff\xfe{}", r"model.json is not UTF-8 text"),
    ("oversize_card", _card_text(pad="x" * MAX_CARD_BYTES), r"model.json is over 1048576 bytes"),
    ("huge_int_digits", _card_text(s1_chans=2).replace('"s1_chans": 2', '"s1_chans": 1' + "0" * 5000),
     r"not valid JSON \(Exceeds the limit"),
    ("nan_stats", _card_text(stats={"s1": {"VV": {"mean": float("nan"), "std": 1.0}}, "s2": {}}),
     r"stats.s1.VV: mean and std must be finite"),
    ("inf_temperature", _card_text(loss={**LossConfig().model_dump(mode="json"), "temperature": float("inf")}),
     r"loss.temperature: Input should be a finite number \(got inf\)"),
    ("chans_disagree_with_bands", _card_text(s1_chans=3), r"s1_chans is 3 but the card names 2 s1 bands"),
    ("band_index_outside", _card_text(s2_chans=2, s2_bands=[0, 13]), r"s2_bands \[0, 13\] select outside the 13"),
    ("future_version", _card_text(format_version=99), r"format_version 99 is not one this DSL reads"),
    ("missing_key", json.dumps({k: v for k, v in _card().items() if k != "img_size"}), r"missing key 'img_size'"),
]

# (id, model.safetensors content, or a function of the good one, what the error says)
WEIGHTS_CASES: list[tuple[str, bytes | Callable[[bytes], bytes], str]] = [
    ("pickle_as_safetensors", lambda good: pickle.dumps(load_file_from_bytes(good)),
     r"model.safetensors: header of \d+ bytes, over the"),
    ("torch_save_zip", lambda good: _torch_save(load_file_from_bytes(good)), r"model.safetensors: header of \d+ bytes"),
    ("huge_header", _header_file(b"{}", claimed=2**40), r"header of 1099511627776 bytes, over the 8388608"),
    ("header_past_end", _header_file(b'{"a": 1}', claimed=4096), r"header of 4096 bytes but the file ends after 8"),
    ("header_not_json", _header_file(b"\x80not json"), r"header is not JSON"),
    ("header_nested", _header_file(_nested(100_000).encode()), r"header is not JSON \(RecursionError\)"),
    ("header_list", _header_file(b"[1]"), r"header is a JSON list, not an object"),
    ("header_malformed_entry", _header_file(b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}'),
     r"tensor 'w': malformed header entry"),
    ("empty_file", b"", r"model.safetensors: 0 bytes, shorter than a safetensors header"),
    ("float64", lambda good: _safetensors({k: v.double() for k, v in load_file_from_bytes(good).items()}),
     r"is 'F64', DSL weights are all F32"),
    ("int64", lambda good: _safetensors({k: v.long() for k, v in load_file_from_bytes(good).items()}),
     r"is 'I64', DSL weights are all F32"),
    ("bool", lambda good: _safetensors({k: v > 0 for k, v in load_file_from_bytes(good).items()}),
     r"is 'BOOL', DSL weights are all F32"),
    ("truncated", lambda good: good[: len(good) // 2], r"tensors end at byte \d+ of a \d+-byte file \(truncated\?\)"),
    ("shapes_of_other_model", lambda good: _safetensors(_f32(_state(s1_chans=3))),
     r"weights do not fit the model its model.json describes: misshapen \['s1_backbone.conv1.0.weight \[16, 3, 3, 3\] \(model: \[16, 2, 3, 3\]\)'\]"),
    ("missing_tensor", lambda good: _safetensors({k: v for k, v in load_file_from_bytes(good).items()
                                                  if k != "s2_head.net.0.weight"}),
     r"missing \['s2_head.net.0.weight'\]"),
    ("unexpected_tensor", lambda good: _safetensors({**load_file_from_bytes(good), "evil": torch.zeros(10**6)}),
     r"unexpected \['evil'\]"),
    ("nan_weight", lambda good: _poisoned(float("nan")),
     r"tensor 's2_head.net.0.weight' is not finite \(1 of \d+ values NaN/inf\); a registered version never"),
    ("inf_weight", lambda good: _poisoned(float("-inf")), r"tensor 's2_head.net.0.weight' is not finite"),
]


def load_file_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        Path(f"{tmp}/w").write_bytes(data)
        return load_file(f"{tmp}/w")


def _torch_save(state: dict) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, f"{tmp}/w")
        return Path(f"{tmp}/w").read_bytes()


def _variant(good: Path, root: Path, card: str | bytes | None = None, weights=None) -> Path:
    folder = root / "version"
    folder.mkdir()
    card = (good / MODEL_CARD).read_text() if card is None else card
    (folder / MODEL_CARD).write_bytes(card.encode() if isinstance(card, str) else card)
    data = (good / WEIGHTS).read_bytes()
    if weights is not None:
        data = weights(data) if callable(weights) else weights
    (folder / WEIGHTS).write_bytes(data)
    return folder


def _refused(uri: str, message: str, temp: Path, tracking: str = TRACKING) -> None:
    with pytest.raises(ValueError, match=message) as e:
        load_backbones(uri, tracking)
    text = str(e.value)
    assert text.startswith(f"{uri}: ") and "\n" not in text and len(text) < 1000, text
    assert sorted(temp.glob("dsl-model-*")) == []  # the downloaded copy is gone


def test_good_version_loads(good, temp):
    model, card = load_backbones(good.as_uri(), TRACKING)
    assert card.s2_chans == 13 and not model.training
    assert sorted(temp.glob("dsl-model-*")) == []


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in CARDS], ids=[c[0] for c in CARDS])
def test_crafted_card_is_refused_before_building(good, temp, tmp_path, monkeypatch, text, message):
    import dsl.registry

    def never(*_a, **_k):
        raise AssertionError("a model was built from a card that is not valid")

    monkeypatch.setattr(dsl.registry, "build_model", never)
    folder = _variant(good, tmp_path, card=text)
    _refused(folder.as_uri(), message, temp)


@pytest.mark.parametrize(("weights", "message"), [c[1:] for c in WEIGHTS_CASES], ids=[c[0] for c in WEIGHTS_CASES])
def test_crafted_weights_are_refused(good, temp, tmp_path, weights, message):
    folder = _variant(good, tmp_path, weights=weights)
    _refused(folder.as_uri(), message, temp)


def test_local_folder_errors_name_the_folder(good, tmp_path):
    folder = _variant(good, tmp_path, card=_card_text(s1_chans=200_000))
    with pytest.raises(ValueError, match=rf"^{folder}: model.json: s1_chans: .*less than or equal to 64"):
        load_backbones(str(folder), TRACKING)
    (folder / MODEL_CARD).unlink()
    with pytest.raises(ValueError, match=rf"^{folder}: not a DSL weights folder"):
        load_backbones(str(folder), TRACKING)
    assert not (folder / MODEL_CARD).exists() and (folder / WEIGHTS).exists()  # a user's folder is never deleted


def test_save_weights_refuses_non_finite_and_writes_nothing(tmp_path):
    state = _state()
    state["s1_backbone.conv1.0.weight"].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 's1_backbone.conv1.0.weight' is not finite \(1 of"):
        save_weights(tmp_path, state, ModelCard.model_validate(_card()))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def registry(tmp_path) -> tuple[str, str]:
    """A sqlite MLflow registry (tracking URI, run id) with experiment ``pretrain``."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("pretrain", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client.create_run(exp).info.run_id


@pytest.mark.slow  # an MLflow registry
def test_registry_never_takes_non_finite_weights(good, registry, tmp_path):
    from mlflow import MlflowClient

    uri, run_id = registry
    register_backbones(good, run_id, "dual", "candidate", {}, uri)
    nan = _variant(good, tmp_path, weights=lambda _: _poisoned(float("nan")))
    with pytest.raises(ValueError, match=rf"not registering {nan} \(run {run_id}\): tensor 's2_head.net.0.weight' "
                                         r"is not finite"):
        register_backbones(nan, run_id, "dual", "candidate", {}, uri)
    client = MlflowClient(uri)
    assert [str(v.version) for v in client.search_model_versions("name='dual'")] == ["1"]
    assert str(client.get_model_version_by_alias("dual", "candidate").version) == "1"


@pytest.mark.slow  # an MLflow registry
def test_crafted_version_in_a_real_registry_is_refused(good, registry, tmp_path, temp):
    """Written past register_backbones (another writer): loading by models:/ URI still refuses it."""
    from mlflow import MlflowClient

    uri, run_id = registry
    client = MlflowClient(uri)
    cases = {"chans": (_card_text(s1_chans=200_000), None, r"s1_chans: Input should be less than or equal to 64"),
             "pickle": (None, lambda good: pickle.dumps(load_file_from_bytes(good)), r"header of \d+ bytes")}
    for i, (name, (card, weights, message)) in enumerate(cases.items()):
        (tmp_path / name).mkdir()
        folder = _variant(good, tmp_path / name, card=card, weights=weights)
        client.log_artifacts(run_id, str(folder), f"crafted{i}")
        client.create_registered_model(name)
        client.create_model_version(name, f"runs:/{run_id}/crafted{i}", run_id)
        _refused(f"models:/{name}/1", message, temp, uri)


def _dsl(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsl.cli", *argv], capture_output=True, text=True)


@pytest.mark.slow  # one interpreter per case
@pytest.mark.parametrize("case", ["s1_chans_1e7", "nested_top_level", "top_level_list", "string_for_chans",
                                  "pickle_as_safetensors", "nan_weight", "float64"])
def test_cli_prints_one_line(good, tmp_path, case):
    cards, weights = {c[0]: c[1] for c in CARDS}, {c[0]: c[1] for c in WEIGHTS_CASES}
    folder = _variant(good, tmp_path, card=cards.get(case), weights=weights.get(case))
    p = _dsl("export", "--model", str(folder), "--modality", "s1", "--out", str(tmp_path / "out.safetensors"),
             "--tracking-uri", TRACKING)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"dsl export: error: {folder}: "), p.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.slow  # a fresh interpreter, for its peak RSS
def test_big_architecture_with_small_weights_allocates_nothing(good, tmp_path):
    """A valid card naming a 1.0 B-parameter ViT (two towers: ~8 GB) beside test_resnet's 4 MB of
    weights: the model is built on the meta device and refused on the header, before any real one."""
    folder = _variant(good, tmp_path, card=_card_text(model=_model(backbone="vit_giant_patch14_224")))
    code = ("import resource, sys\nfrom dsl.registry import load_backbones\n"
            "try:\n    load_backbones(sys.argv[1], 'sqlite:///unused.db')\nexcept ValueError as e:\n    print(e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    p = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    message, peak_kb = p.stdout.strip().splitlines()
    assert message.startswith(f"{folder}: weights do not fit the model its model.json describes: missing [")
    assert int(peak_kb) < 1_500_000  # the imports alone are ~350 MB


def test_interrupted_download_leaves_no_copy(good, temp, monkeypatch):
    import mlflow.artifacts

    def interrupted(**kwargs):
        (Path(kwargs["dst_path"]) / "partial").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_backbones(good.as_uri(), TRACKING)
    assert sorted(temp.glob("dsl-model-*")) == []
