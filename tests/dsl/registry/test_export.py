"""``dsl export``: a registered backbone as a timm state dict that gives the same features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from dsl.cli import main as cli_main
from dsl.contracts.config import LossConfig, ModelConfig
from dsl.contracts.model_card import ModelCard, save_weights
from dsl.models._timm import timm
from dsl.models.dual import build_model
from dsl.registry import load_backbones, register_backbones
from dsl.registry.export import export_backbone, load_exported, read_metadata

pytestmark = pytest.mark.slow  # an MLflow registry

S2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]


def _register(root: Path, uri: str, name: str, model_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(model_cfg, LossConfig(), 2, 13, img_size=32)
    for m in model.modules():  # non-trivial BatchNorm statistics: eval features depend on them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    info = {"model": model_cfg.model_dump(mode="json"), "loss": LossConfig().model_dump(mode="json"),
            "s1_chans": 2, "s2_chans": 13, "img_size": 32, "s1_bands": None, "s2_bands": None,
            "band_names": {"s1": ["VV", "VH"], "s2": S2}, "normalisation": "manifest",
            "stats": {"s1": {"VV": {"mean": -12.0, "std": 3.0}, "VH": {"mean": -19.0, "std": 0.0}},
                      "s2": {b: {"mean": 1000.0 + i, "std": 500.0} for i, b in enumerate(S2)}}}
    weights = root / name
    weights.mkdir()
    save_weights(weights, model.state_dict(), ModelCard.model_validate(info))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pretrain") or client.get_experiment(
        client.create_experiment("pretrain", artifact_location=(root / "artifacts").as_uri()))
    run = client.create_run(exp.experiment_id)
    register_backbones(weights, run.info.run_id, name, "candidate", {}, uri)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    _register(root, uri, "batchnorm", ModelConfig(backbone="test_resnet", s1_backbone="test_vit", norm="batch"))
    _register(root, uri, "groupnorm", ModelConfig(backbone="test_resnet", norm="group"))
    return uri


def _features(backbone: torch.nn.Module, chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, chans, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return backbone.eval()(x), x


@pytest.mark.parametrize("modality", ["s2", "s1"])
def test_export_loads_in_timm_with_same_features(registry, tmp_path, modality):
    out = tmp_path / f"{modality}.safetensors"
    uri = "models:/batchnorm@candidate"
    assert cli_main(["export", "--model", uri, "--modality", modality, "--out", str(out),
                     "--tracking-uri", registry]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta == read_metadata(out)
    chans = 13 if modality == "s2" else 2
    arch = "test_resnet" if modality == "s2" else "test_vit"
    assert (meta["arch"], meta["in_chans"], meta["norm"]) == (arch, chans, "batch")
    assert meta["input"]["bands"] == (S2 if modality == "s2" else ["VV", "VH"])
    if modality == "s1":
        assert meta["timm_kwargs"]["img_size"] == 32 and meta["input"]["std"] == [3.0, 1.0]

    # what a timm (or torchgeo) user does, with only the exported file and its metadata
    model = timm.create_model(meta["arch"], **meta["timm_kwargs"])
    state = load_file(str(out))
    assert set(state) == set(model.state_dict())  # exactly timm's names, no prefix, no head
    model.load_state_dict(state, strict=True)
    registered, _ = load_backbones(uri, registry)
    want, x = _features(getattr(registered, f"{modality}_backbone"), chans)
    with torch.no_grad():
        got = model.eval()(x)
    assert torch.allclose(got, want, atol=1e-6)
    fresh, _ = _features(timm.create_model(meta["arch"], **meta["timm_kwargs"]), chans)
    assert not torch.allclose(fresh, want, atol=1e-3)  # the weights, not chance, make them equal


def test_groupnorm_export_loads_through_make_backbone(registry, tmp_path):
    out = tmp_path / "gn.safetensors"
    meta = export_backbone("models:/groupnorm@candidate", "s2", out, registry)
    assert meta["norm"] == "group"
    state = load_file(str(out))
    assert not any("running_mean" in k for k in state)  # GroupNorm: no running statistics
    with pytest.raises(RuntimeError, match="running_mean"):  # stock timm builds BatchNorm
        timm.create_model(meta["arch"], **meta["timm_kwargs"]).load_state_dict(state, strict=True)
    model, _ = load_exported(out)
    registered, _ = load_backbones("models:/groupnorm@candidate", registry)
    want, x = _features(registered.s2_backbone, 13)
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-6)


def test_export_errors_name_the_problem(registry, tmp_path, capsys):
    with pytest.raises(ValueError, match="modality must be 's1' or 's2', got 's3'"):
        export_backbone("models:/batchnorm@candidate", "s3", tmp_path / "x.safetensors", registry)
    assert cli_main(["export", "--model", "models:/batchnorm@nope", "--modality", "s2",
                     "--out", str(tmp_path / "x.safetensors"), "--tracking-uri", registry]) == 2  # bad input
    assert "models:/batchnorm@nope" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
